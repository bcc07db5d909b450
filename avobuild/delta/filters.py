"""Branch filters for `bspatch` operations, exactly as a device's `xz` does them.

Machine code moves when a library is recompiled: every relative CALL/JMP (x86) or BL/ADRP
(arm64) whose target moved changes its bytes, though the instruction did not. xz's BCJ
filters turn those relative operands into absolute addresses, so an unchanged call into a
function that moved by the same amount as the call site is the same bytes again and the
diff shrinks (docs/delta-format.md, "Branch filters").

liblzma applies a BCJ filter only in front of LZMA2. So:

* forward (bytes -> filtered): compress with the filter and LZMA2 preset 0, then decode the
  LZMA2 layer alone, which leaves the filtered bytes;
* inverse (filtered -> bytes): wrap the filtered bytes in LZMA2 *uncompressed* chunks (a
  3-byte header per 64 KiB and an end byte, `wrap_lzma2`) and decode them with the filter.

The encoder diffs the wrapped, filtered target against the filtered window, so a device's
`bspatch` output already is the LZMA2 stream it decodes.

The x86 filter runs in this process with Python's `lzma` (the same liblzma filter as the
device's `xz --x86=start=S`; tests/test_delta_v2.py compares the two byte for byte): no
process is started per window or piece. Python's `lzma` has no arm64 filter id, so arm64
still calls the `xz` CLI (xz-utils >= 5.4), by the name `xz`; a device calls `/usr/bin/xz`,
because busybox's `xz` applet has no filters.
"""

from __future__ import annotations

import lzma
from typing import Any

from avobuild.delta.stream import LZMA2_CHUNK, Filter
from avobuild.errors import BundleError, ToolFailed
from avobuild.run import run

XZ = "xz"
_LZMA2 = "--lzma2=preset=0"
_LZMA2_PRESET0: dict[str, Any] = {"id": lzma.FILTER_LZMA2, "preset": 0}
# liblzma's BCJ start offset is a 32-bit number.
MAX_START = (1 << 32) - 1


def _filter_option(filter_: Filter, start: int) -> str:
    return f"--{filter_.value}=start={start}"


def _x86(start: int) -> dict[str, Any]:
    return {"id": lzma.FILTER_X86, "start_offset": start}


def _check_start(filter_: Filter, start: int) -> None:
    if not 0 <= start <= MAX_START:
        raise BundleError(f"xz {filter_.value} filter at {start}: expected a start below 2^32")


def forward(data: bytes, filter_: Filter, start: int) -> bytes:
    """`data`, which starts at byte `start` of its file, with `filter_` applied."""
    _check_start(filter_, start)
    if filter_ is Filter.X86:
        try:
            carried = lzma.compress(
                data, format=lzma.FORMAT_RAW, filters=[_x86(start), _LZMA2_PRESET0]
            )
            return lzma.decompress(carried, format=lzma.FORMAT_RAW, filters=[_LZMA2_PRESET0])
        except lzma.LZMAError as error:
            raise BundleError(f"liblzma x86 filter at {start}: {error}") from None
    try:
        compressed = run(
            [XZ, "--format=raw", _filter_option(filter_, start), _LZMA2, "-c"], input_bytes=data
        ).stdout
        return run([XZ, "-d", "--format=raw", _LZMA2, "-c"], input_bytes=compressed).stdout
    except ToolFailed as error:
        raise BundleError(f"xz {filter_.value} filter at {start}: {error}") from None


def wrap_lzma2(data: bytes) -> bytes:
    """`data` as an LZMA2 stream of uncompressed chunks (the first resets the dictionary)."""
    parts = []
    for index, position in enumerate(range(0, len(data), LZMA2_CHUNK)):
        chunk = data[position : position + LZMA2_CHUNK]
        parts.append(bytes([2 if index else 1]) + (len(chunk) - 1).to_bytes(2, "big") + chunk)
    parts.append(b"\0")
    return b"".join(parts)


def inverse(wrapped: bytes, filter_: Filter, start: int, length: int) -> bytes:
    """The original bytes of an LZMA2-wrapped filtered range; BundleError unless `length`."""
    _check_start(filter_, start)
    if filter_ is Filter.X86:
        decoder = lzma.LZMADecompressor(
            format=lzma.FORMAT_RAW, filters=[_x86(start), _LZMA2_PRESET0]
        )
        try:
            # One byte more than expected is enough to tell a wrong length; never more.
            data = decoder.decompress(wrapped, max_length=length + 1)
        except lzma.LZMAError as error:
            raise BundleError(f"liblzma x86 inverse filter at {start}: {error}") from None
        if not decoder.eof or decoder.unused_data:
            raise BundleError(
                f"liblzma x86 inverse filter at {start}: not exactly one LZMA2 stream "
                f"producing {length} bytes"
            )
    else:
        try:
            data = run(
                [XZ, "-d", "--format=raw", _filter_option(filter_, start), _LZMA2, "-c"],
                input_bytes=wrapped,
            ).stdout
        except ToolFailed as error:
            raise BundleError(f"xz {filter_.value} inverse filter at {start}: {error}") from None
    if len(data) != length:
        raise BundleError(
            f"{filter_.value} inverse filter at {start}: {len(data)} bytes, expected {length}"
        )
    return data
