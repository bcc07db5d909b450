"""One bsdiff of several target pieces against one window, cut into one patch per piece.

bsdiff's cost is the suffix sort of its old bytes (bsdiff4's qsufsort, about 0.17 µs per
byte on the project's machine), paid on every call. Diffing each 1 MiB piece of a changed
file against its own 2 MiB window sorts the old file about twice per piece; diffing all the
changed pieces of a file region against one shared window sorts it once. The one diff is a
sequence of bsdiff control triples (add x bytes of old + diff, insert y extra bytes, move the
old position by z) over the pieces joined; `diff_pieces` cuts it at the piece boundaries into
independent patches. Each patch but the first starts with a triple `(0, 0, P)` that moves to
the old position P where its piece begins, so every piece's `bspatch` operation applies alone
to the same window (docs/delta-format.md, section 7).

A patch is bsdiff 4.3's layout with its three streams (control, diff, extra) each a raw LZMA2
stream instead of bzip2, under the magic `BSDIFFLZ` (section 7.5): on the Debian arm64
corpus LZMA2 makes the bspatch payloads about 13 % smaller than bzip2 does (the stream
38.13 -> 34.86 MB, docs/performance.md).
BSDIFF40 patches (bzip2, what Debian's `bspatch` reads) stay readable: `apply_patch` reads
both, and the device turns a BSDIFFLZ patch back into BSDIFF40 for its `bspatch` with `xz`
and busybox `bzip2`.

The diff itself is bsdiff's algorithm as detools implements it in C (`detools.bsdiff`), on a
suffix array built by libdivsufsort (`detools.suffix_array.divsufsort`), about 6 x faster
than bsdiff4's qsufsort on a 6 MiB window; its output (per match: diff bytes, extra bytes,
old position adjustment) is the same triples, read here into bsdiff 4.3's control stream.
Every cut patch is applied back by the applier's own reader (`delta.bspatch`, bsdiff4's C
patch loop) and compared, independently of how it was made.
"""

from __future__ import annotations

import lzma
from collections.abc import Sequence
from dataclasses import dataclass

import bsdiff4.core
from detools.bsdiff import create_patch
from detools.suffix_array import divsufsort

from avobuild.delta.bspatch import TRIPLE, apply_patch, control_limit
from avobuild.delta.stream import BSDIFF_LZMA_MAGIC, LZMA2_DICT
from avobuild.errors import BundleError

# What a patch's streams are packed with: raw LZMA2 at preset 6 (the best size per CPU-second
# measured on the corpora's patch streams; 9e saves 2.6 % more for twice the time) with no
# literal context and no position bits (lc 0, pb 0: 0.8 % smaller diff and extra streams on
# 150 seeded groups of the Debian amd64 corpus, same time), and the dictionary a decoder is
# told to allocate (a sliding window: a stream may be longer). LZMA2 carries lc and pb in its
# chunks, so a decoder needs only the dictionary size. Fast mode (preset 3, depth 500) packs
# the diff stream in 0.43 x the time but made the Debian arm64 stream 3.8 % larger, over the
# size goal (docs/performance.md).
PACK_FILTERS = ({"id": lzma.FILTER_LZMA2, "dict_size": LZMA2_DICT, "preset": 6, "lc": 0, "pb": 0},)


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

    def streams(self, length: int) -> Streams | None:
        """The piece's streams, None if its control stream is over the bound."""
        if TRIPLE * len(self.triples) > control_limit(length):
            return None
        control = b"".join(_number(value) for row in self.triples for value in row)
        return Streams(length, control, bytes(self.diff), bytes(self.extra))


@dataclass(frozen=True)
class Streams:
    """One piece's bsdiff streams, not yet packed: the patch producing `length` bytes."""

    length: int
    control: bytes
    diff: bytes
    extra: bytes


def pack(streams: Streams) -> bytes:
    """The BSDIFFLZ patch of `streams`, each packed with raw LZMA2 (`PACK_FILTERS`)."""
    control, diff, extra = (
        lzma.compress(part, lzma.FORMAT_RAW, filters=PACK_FILTERS)
        for part in (streams.control, streams.diff, streams.extra)
    )
    return b"".join(
        [
            BSDIFF_LZMA_MAGIC,
            _number(len(control)),
            _number(len(diff)),
            _number(streams.length),
            control,
            diff,
            extra,
        ]
    )


def cut(control: bytes, diff: bytes, extra: bytes, lengths: Sequence[int]) -> list[Streams | None]:
    """The whole diff's (control, diff, extra) streams cut into each piece's own."""
    patches: list[Streams | None] = []
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

    for at in range(0, len(control), TRIPLE):
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
                patches.append(piece.streams(lengths[len(patches)]))
                piece = None
        while insert:
            piece = piece or open_piece()
            step = min(insert, remaining)
            piece.insert(extra[extra_at : extra_at + step])
            extra_at += step
            insert -= step
            remaining -= step
            if not remaining:
                patches.append(piece.streams(lengths[len(patches)]))
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


# A piece of compressed data (a kernel image, a .gz) that changed throughout shares nothing
# with its old version, and bsdiff's scan is slowest exactly there: 24 s of CPU for the five
# pieces of Debian's vmlinuz, for 2 KB. `shares_strings` looks for PROBES strings of
# PROBE_LENGTH bytes of the piece in the old bytes first; 8 bytes of compressed data occurring
# by chance in a 6 MiB window is a 1 in 10^12 event, so a piece where none occurs has no match
# for bsdiff to extend.
PROBES = 64
PROBE_LENGTH = 8


def shares_strings(old: bytes, piece: bytes) -> bool:
    """Whether one of PROBES evenly spaced PROBE_LENGTH-byte strings of `piece` is in `old`."""
    if len(piece) <= PROBE_LENGTH * PROBES:
        return True
    span = len(piece) - PROBE_LENGTH
    return any(
        piece[at : at + PROBE_LENGTH] in old
        for at in (index * span // (PROBES - 1) for index in range(PROBES))
    )


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


def diff_cut(old: bytes, pieces: Sequence[bytes]) -> list[Streams | None]:
    """Each piece's bsdiff streams turning `old` into it, from one suffix sort of `old`;
    None for a piece whose patch an applier would refuse (more control bytes than
    `control_limit`: not seen on real software, but the bound is the applier's)."""
    control, diff, extra = diff_streams(old, b"".join(pieces))
    return cut(control, diff, extra, [len(piece) for piece in pieces])


def checked(old: bytes, piece: bytes, patch: bytes) -> bytes:
    """`patch`, once the applier's own reader (`apply_patch`) makes `piece` of `old` with it."""
    if apply_patch(old, patch, len(piece), "bsdiff") != piece:
        raise BundleError("a cut bsdiff patch does not reproduce its piece")
    return patch


def diff_pieces(old: bytes, pieces: Sequence[bytes]) -> list[bytes | None]:
    """One BSDIFFLZ patch per piece (`diff_cut`, packed by `pack`), each applied back
    and compared before it is returned."""
    if not pieces:
        return []
    return [
        None if streams is None else checked(old, piece, pack(streams))
        for piece, streams in zip(pieces, diff_cut(old, pieces), strict=True)
    ]
