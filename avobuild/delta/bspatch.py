"""Reading a bspatch payload: a BSDIFFLZ or BSDIFF40 patch (docs/delta-format.md, 7.5).

Both are bsdiff 4.3's layout: an 8-byte magic, the control and diff streams' sizes and the
size the patch produces as 8-byte sign-magnitude numbers, then the three streams: control
(triples: add x bytes of window + diff, insert y extra bytes, move the window position by z),
diff and extra. BSDIFF40 compresses each with bzip2, BSDIFFLZ each as a raw LZMA2 stream
with an 8 MiB dictionary. Every stream is decoded within a bound fixed by the size the
operation line declares before bspatch's loop (bsdiff4's C core) runs, so a hostile payload
cannot make the applier allocate more than a few times the operation's length.

Kept apart from `delta.bsdiff` (the encoder) so that applying imports no suffix sorter.
"""

from __future__ import annotations

import bz2
import lzma

import bsdiff4.core

from avobuild.delta.stream import BSDIFF_HEADER, BSDIFF_LZMA_MAGIC, BSDIFF_MAGIC, LZMA2_DICT
from avobuild.errors import BundleError

TRIPLE = 24
# liblzma's smallest dictionary (LZMA_DICT_SIZE_MIN)
_MIN_DICT = 4096


def control_limit(produced: int) -> int:
    """The most control bytes a patch producing `produced` bytes may hold: one triple per 24
    bytes produced, plus two (the seek that starts a cut piece, a last one). bsdiff's
    triples cover about a kilobyte each on the corpora; the encoder keeps the bound."""
    return TRIPLE * (produced // TRIPLE + 2)


_Decoder = lzma.LZMADecompressor | bz2.BZ2Decompressor


def _lzma_decoder(limit: int) -> lzma.LZMADecompressor:
    """A raw LZMA2 decoder for a stream of at most `limit` bytes.

    liblzma allocates the whole dictionary when the decoder starts. A stream that decodes to
    at most `limit` bytes refers back at most that far, so a dictionary of `limit` bytes (not
    the encoder's LZMA2_DICT) decodes every valid stream: 1 MiB instead of 8 for a 1 MiB
    piece, which keeps the host apply's peak memory down."""
    size = max(_MIN_DICT, min(LZMA2_DICT, limit))
    return lzma.LZMADecompressor(
        lzma.FORMAT_RAW, filters=({"id": lzma.FILTER_LZMA2, "dict_size": size},)
    )


def _unpack(data: bytes, limit: int, part: str, where: str, decoder: _Decoder) -> bytes:
    """One of a patch's three streams, decoded: at most `limit` bytes, complete (its end
    marker reached) and nothing after it."""
    try:
        out = decoder.decompress(data, max_length=limit + 1)
    except (lzma.LZMAError, OSError, ValueError) as error:
        raise BundleError(
            f"{where}: the bsdiff patch's {part} stream is corrupt: {error}"
        ) from None
    if len(out) > limit:
        raise BundleError(
            f"{where}: the bsdiff patch's {part} stream decodes to over {limit} bytes"
        )
    if not decoder.eof:
        raise BundleError(f"{where}: the bsdiff patch's {part} stream is truncated")
    if decoder.unused_data:
        raise BundleError(
            f"{where}: the bsdiff patch's {part} stream has "
            f"{len(decoder.unused_data)} bytes after its end"
        )
    return out


def apply_patch(window: bytes, payload: bytes, produced: int, where: str) -> bytes:
    """The `produced` bytes a BSDIFFLZ or BSDIFF40 patch makes of `window`, refusing a
    payload that is not one (docs/delta-format.md, 7.5): every stream is decoded within its
    bound (control: `control_limit`; diff and extra: what is left of `produced`) before
    bspatch's loop runs."""
    magic = payload[:8]
    control_size = _offtin(payload[8:16])
    diff_size = _offtin(payload[16:24])
    if (
        len(payload) < BSDIFF_HEADER
        or magic not in (BSDIFF_MAGIC, BSDIFF_LZMA_MAGIC)
        or _offtin(payload[24:32]) != produced
        or not 0 <= control_size <= len(payload) - BSDIFF_HEADER
        or not 0 <= diff_size <= len(payload) - BSDIFF_HEADER - control_size
    ):
        raise BundleError(
            f"{where}: the payload is not a BSDIFFLZ or BSDIFF40 patch producing {produced} bytes"
        )
    control_end = BSDIFF_HEADER + control_size
    diff_end = control_end + diff_size

    def decoder(limit: int) -> _Decoder:
        if magic == BSDIFF_LZMA_MAGIC:
            return _lzma_decoder(limit)
        return bz2.BZ2Decompressor()

    control = payload[BSDIFF_HEADER:control_end]
    limit = control_limit(produced)
    control = _unpack(control, limit, "control", where, decoder(limit))
    if len(control) % TRIPLE:
        raise BundleError(f"{where}: the bsdiff patch's control stream is not whole triples")
    diff = _unpack(payload[control_end:diff_end], produced, "diff", where, decoder(produced))
    limit = produced - len(diff)
    extra = _unpack(payload[diff_end:], limit, "extra", where, decoder(limit))
    try:
        data: bytes = bsdiff4.core.patch(window, produced, control, diff, extra)
    except (ValueError, OSError, MemoryError) as error:
        raise BundleError(f"{where}: the bsdiff patch is corrupt: {error}") from None
    if len(data) != produced:
        raise BundleError(
            f"{where}: the bsdiff patch produced {len(data)} bytes, expected {produced}"
        )
    return data


def _offtin(field: bytes) -> int:
    """A BSDIFF40 number: 8 bytes little-endian, the top bit the sign."""
    value = int.from_bytes(field, "little")
    return -(value & ~(1 << 63)) if value >> 63 else value
