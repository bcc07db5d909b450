"""One bsdiff of several target pieces against one window, cut into one patch per piece.

bsdiff's cost is the suffix sort of its old bytes (bsdiff4's qsufsort, about 0.17 µs per
byte on the project's machine), paid on every call. Diffing each 1 MiB piece of a changed
file against its own 2 MiB window sorts the old file about twice per piece; diffing all the
changed pieces of a file region against one shared window sorts it once. The one diff is a
sequence of bsdiff control triples (add x bytes of old + diff, insert y extra bytes, move the
old position by z) over the pieces joined; `diff_pieces` cuts it at the piece boundaries into
independent BSDIFF40 patches (bsdiff 4.3's format, what Debian's `bspatch` reads). Each
patch but the first starts with a triple `(0, 0, P)` that moves to the old position P where
its piece begins, so every piece's `bspatch` operation applies alone to the same window,
and the stream format is unchanged (docs/delta-format.md, section 7).

The diff itself is bsdiff's algorithm as detools implements it in C (`detools.bsdiff`), on a
suffix array built by libdivsufsort (`detools.suffix_array.divsufsort`), about 6 x faster
than bsdiff4's qsufsort on a 6 MiB window; its output (per match: diff bytes, extra bytes,
old position adjustment) is the same triples, read here into bsdiff 4.3's control stream.
bsdiff4 (`bsdiff4.patch`) checks every cut patch, independently of how it was made.
"""

from __future__ import annotations

import bz2
from collections.abc import Sequence

import bsdiff4
import bsdiff4.core
from detools.bsdiff import create_patch
from detools.suffix_array import divsufsort

from avobuild.delta.stream import BSDIFF_MAGIC
from avobuild.errors import BundleError

_TRIPLE = 24


def _number(value: int) -> bytes:
    """A BSDIFF40 number: 8 bytes little-endian, the top bit the sign."""
    return (abs(value) | (1 << 63 if value < 0 else 0)).to_bytes(8, "little")


class _Cutter:
    """Control triples, diff and extra bytes of one piece, built from the whole diff's."""

    def __init__(self) -> None:
        self.triples: list[list[int]] = []
        self.diff = bytearray()
        self.extra = bytearray()

    def add(self, data: bytes) -> None:
        if self.triples and not self.triples[-1][1] and not self.triples[-1][2]:
            self.triples[-1][0] += len(data)
        else:
            self.triples.append([len(data), 0, 0])
        self.diff += data

    def insert(self, data: bytes) -> None:
        if self.triples and not self.triples[-1][2]:
            self.triples[-1][1] += len(data)
        else:
            self.triples.append([0, len(data), 0])
        self.extra += data

    def seek(self, distance: int) -> None:
        if self.triples:
            self.triples[-1][2] += distance
        else:
            self.triples.append([0, 0, distance])

    def patch(self, length: int) -> bytes:
        control = bz2.compress(b"".join(_number(value) for row in self.triples for value in row))
        diff = bz2.compress(bytes(self.diff))
        return b"".join(
            [
                BSDIFF_MAGIC,
                _number(len(control)),
                _number(len(diff)),
                _number(length),
                control,
                diff,
                bz2.compress(bytes(self.extra)),
            ]
        )


def cut(control: bytes, diff: bytes, extra: bytes, lengths: Sequence[int]) -> list[bytes]:
    """The whole diff's (control, diff, extra) streams cut into one patch per piece."""
    patches: list[bytes] = []
    piece: _Cutter | None = None
    remaining = 0  # bytes of the current piece still to produce
    old = 0  # position in the old bytes
    diff_at = extra_at = 0
    pieces = iter(lengths)

    def open_piece() -> _Cutter:
        nonlocal remaining
        remaining = next(pieces)
        opened = _Cutter()
        if old:
            opened.seek(old)
        return opened

    for at in range(0, len(control), _TRIPLE):
        add = bsdiff4.core.decode_int64(control[at : at + 8])
        insert = bsdiff4.core.decode_int64(control[at + 8 : at + 16])
        while add:
            piece = piece or open_piece()
            step = min(add, remaining)
            piece.add(diff[diff_at : diff_at + step])
            diff_at += step
            old += step
            add -= step
            remaining -= step
            if not remaining:
                patches.append(piece.patch(lengths[len(patches)]))
                piece = None
        while insert:
            piece = piece or open_piece()
            step = min(insert, remaining)
            piece.insert(extra[extra_at : extra_at + step])
            extra_at += step
            insert -= step
            remaining -= step
            if not remaining:
                patches.append(piece.patch(lengths[len(patches)]))
                piece = None
        distance = bsdiff4.core.decode_int64(control[at + 16 : at + 24])
        old += distance
        if piece is not None:
            piece.seek(distance)
    if piece is not None or len(patches) != len(lengths):
        raise BundleError(f"bsdiff produced {len(patches)} of {len(lengths)} pieces")
    return patches


def _size(field: bytes) -> int:
    """A detools size: 6 bits, a sign bit and a continuation bit, then 7 bits a byte."""
    value = field[0] & 0x3F
    shift = 6
    for byte in field[1:]:
        value |= (byte & 0x7F) << shift
        shift += 7
    return -value if field[0] & 0x40 else value


def diff_streams(old: bytes, new: bytes) -> tuple[bytes, bytes, bytes]:
    """bsdiff's (control, diff, extra) streams turning `old` into `new`."""
    suffixes = bytearray(4 * (len(old) + 1))
    divsufsort(old, suffixes)
    chunks = create_patch(suffixes, old, new, bytearray(len(new) + 1))
    if len(chunks) % 5:
        raise BundleError(f"detools bsdiff returned {len(chunks)} chunks, not 5 per match")
    control = bytearray()
    for at in range(0, len(chunks), 5):
        add, insert = _size(chunks[at]), _size(chunks[at + 2])
        if add != len(chunks[at + 1]) or insert != len(chunks[at + 3]):
            raise BundleError("detools bsdiff returned a chunk of the wrong size")
        control += _number(add) + _number(insert) + _number(_size(chunks[at + 4]))
    diff = b"".join(chunks[at + 1] for at in range(0, len(chunks), 5))
    extra = b"".join(chunks[at + 3] for at in range(0, len(chunks), 5))
    return bytes(control), diff, extra


def diff_pieces(old: bytes, pieces: Sequence[bytes]) -> list[bytes]:
    """One BSDIFF40 patch per piece, each turning `old` into that piece: one suffix sort of
    `old` for all of them. Each patch is applied back and compared before it is returned."""
    control, diff, extra = diff_streams(old, b"".join(pieces))
    patches = cut(control, diff, extra, [len(piece) for piece in pieces])
    for piece, patch in zip(pieces, patches, strict=True):
        if bsdiff4.patch(old, patch) != piece:
            raise BundleError("a cut bsdiff patch does not reproduce its piece")
    return patches
