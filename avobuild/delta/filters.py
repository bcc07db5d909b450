"""Branch filters for `bspatch` operations, done with xz exactly as a device does them.

Machine code moves when a library is recompiled: every relative CALL/JMP (x86) or BL/ADRP
(arm64) whose target moved changes its bytes, though the instruction did not. xz's BCJ
filters turn those relative operands into absolute addresses, so an unchanged call into a
function that moved by the same amount as the call site is the same bytes again and the
diff shrinks (docs/delta-format.md, "Branch filters").

xz applies a BCJ filter only in front of LZMA2. So:

* forward (bytes -> filtered): compress with the filter and LZMA2 preset 0, then decode the
  LZMA2 layer alone, which leaves the filtered bytes;
* inverse (filtered -> bytes): wrap the filtered bytes in LZMA2 *uncompressed* chunks (a
  3-byte header per 64 KiB and an end byte, `wrap_lzma2`) and decode them with the filter.

The encoder diffs the wrapped, filtered target against the filtered window, so a device's
`bspatch` output already is the LZMA2 stream it decodes. The CLI is called (not Python's
lzma, which lacks the arm64 filter) with its full path, because busybox's `xz` applet has
no filters.
"""

from __future__ import annotations

from avobuild.delta.stream import LZMA2_CHUNK, Filter
from avobuild.errors import BundleError, ToolFailed
from avobuild.run import run

XZ = "xz"
_LZMA2 = "--lzma2=preset=0"


def _filter_option(filter_: Filter, start: int) -> str:
    return f"--{filter_.value}=start={start}"


def forward(data: bytes, filter_: Filter, start: int) -> bytes:
    """`data`, which starts at byte `start` of its file, with `filter_` applied."""
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
    try:
        data = run(
            [XZ, "-d", "--format=raw", _filter_option(filter_, start), _LZMA2, "-c"],
            input_bytes=wrapped,
        ).stdout
    except ToolFailed as error:
        raise BundleError(f"xz {filter_.value} inverse filter at {start}: {error}") from None
    if len(data) != length:
        raise BundleError(
            f"xz {filter_.value} inverse filter at {start}: {len(data)} bytes, expected {length}"
        )
    return data
