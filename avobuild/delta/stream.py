"""The delta stream: the line grammar of docs/delta-format.md, section 2.

A delta stream turns one source image into one target image. It is a header of three text
lines, then operations in target order, each one text line (followed, for `data` and `patch`,
by a binary payload whose size the line gives), then an `end` line. The operations tile the
target exactly, so an applier writes the target front to back, once, and a POSIX shell can
replay the stream with `read`, `dd` and `zstd -d [--patch-from=…]`.

Version 2 adds a `window` line (followed by its `extent` lines: the source ranges, usually
the old version of one file, that are joined into the window) and the `bspatch` operation,
a bsdiff patch (BSDIFFLZ or BSDIFF40) from the current window to the target range,
optionally in the domain of an xz branch filter (`x86`, `arm64`) that turns relative call
targets into absolute ones.

Everything an applier allocates is bounded by the line before it is read: an operation's
payload and its dictionary are at most `MAX_EXTENT` bytes, a line at most `MAX_LINE` bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from avobuild.bundle.manifest import ImageRef
from avobuild.errors import BundleError, shown

STREAM_VERSION = 2
READABLE_VERSIONS = (1, 2)
BLOCK_SIZE = 4096
# Largest target extent of a `data`/`patch` operation and largest `patch` dictionary: what
# an applier must hold in memory for one operation (plus the payload, bounded below).
MAX_EXTENT = 16 << 20
MAX_LINE = 512
# A `window` joins at most this many source extents.
MAX_WINDOW_EXTENTS = 64
# An LZMA2 uncompressed chunk holds at most 64 KiB (docs/delta-format.md, "Branch filters").
LZMA2_CHUNK = 1 << 16
# A bspatch payload: bsdiff 4.3's BSDIFF40 (bzip2 streams) or BSDIFFLZ (raw LZMA2 streams
# whose decoder allocates an LZMA2_DICT dictionary), both with a 32-byte header.
BSDIFF_MAGIC = b"BSDIFF40"
BSDIFF_LZMA_MAGIC = b"BSDIFFLZ"
BSDIFF_HEADER = 32
LZMA2_DICT = 8 << 20
# Every number is at most what 64-bit signed shell arithmetic holds, as in the manifest.
MAX_NUMBER = (1 << 63) - 1

_NUMBER = r"(0|[1-9][0-9]{0,18})"
_SHA = r"([0-9a-f]{64})"
_LINES = {
    "copy": re.compile(rf"copy {_NUMBER} {_NUMBER} {_NUMBER} {_SHA}", re.ASCII),
    "zero": re.compile(rf"zero {_NUMBER} {_NUMBER}", re.ASCII),
    "data": re.compile(rf"data {_NUMBER} {_NUMBER} {_NUMBER} {_SHA}", re.ASCII),
    "patch": re.compile(
        rf"patch {_NUMBER} {_NUMBER} {_NUMBER} {_NUMBER} {_SHA} {_NUMBER} {_SHA}", re.ASCII
    ),
    "end": re.compile(rf"end {_NUMBER}", re.ASCII),
}
# Version 2 lines.
_FILTER = r"(raw|x86|arm64)"
_LINES_2 = {
    "window": re.compile(rf"window {_NUMBER} {_NUMBER} {_FILTER} {_NUMBER} {_SHA}", re.ASCII),
    "bspatch": re.compile(
        rf"bspatch {_NUMBER} {_NUMBER} {_FILTER} {_NUMBER} {_SHA} {_NUMBER} {_SHA}", re.ASCII
    ),
}
_EXTENT = re.compile(rf"extent {_NUMBER} {_NUMBER}", re.ASCII)
_MAGIC = re.compile(r"avobuild-delta (0|[1-9][0-9]{0,8})", re.ASCII)  # one spelling per version
_REF = re.compile(rf"(source|target) {_NUMBER} {_SHA}", re.ASCII)


class OpKind(StrEnum):
    COPY = "copy"
    ZERO = "zero"
    DATA = "data"
    PATCH = "patch"
    BSPATCH = "bspatch"


class Filter(StrEnum):
    """The branch filter of a window and its `bspatch` operations (xz's BCJ filters)."""

    RAW = "raw"
    X86 = "x86"
    ARM64 = "arm64"


@dataclass(frozen=True)
class Op:
    """One operation: the target range [offset, offset + length) and how to produce it.

    `sha256` is the hash of the target range (empty for ZERO: zeros need no hash). COPY reads
    source [source_offset, +length), which holds the same bytes, so the same hash checks it;
    PATCH uses source [source_offset, +source_length) as the zstd dictionary, checked by
    `source_sha256`. DATA and PATCH carry `payload_size` bytes of zstd frame. BSPATCH carries
    a bsdiff patch (BSDIFFLZ or BSDIFF40) from the current window, whose hash is
    `source_sha256`; with a filter other than RAW the patch's output is the filtered target
    (filter start `start`) in LZMA2 uncompressed chunks.
    """

    kind: OpKind
    offset: int
    length: int
    sha256: str = ""
    source_offset: int = 0
    source_length: int = 0
    source_sha256: str = ""
    payload_size: int = 0
    filter: Filter = Filter.RAW
    start: int = 0

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class Window:
    """A `window` line: `length` bytes joined from `extents` (source offset, length; `count`
    of them, on the `extent` lines that follow) with sha256 `sha256`, used by the `bspatch`
    operations that follow, filtered by `filter` starting at `start` (the window's offset in
    the file it was taken from)."""

    count: int
    length: int
    filter: Filter
    start: int
    sha256: str
    extents: tuple[tuple[int, int], ...] = ()


def lzma2_wrapped_size(length: int) -> int:
    """The size of `length` bytes as LZMA2 uncompressed chunks with the end marker."""
    return length + 3 * (-(-length // LZMA2_CHUNK)) + 1


def max_payload_size(length: int) -> int:
    """The largest zstd frame an applier accepts for `length` target bytes."""
    return length + length // 128 + 512


def render_header(source: ImageRef, target: ImageRef, version: int = STREAM_VERSION) -> bytes:
    return (
        f"avobuild-delta {version}\n"
        f"source {source.size} {source.sha256}\n"
        f"target {target.size} {target.sha256}\n"
    ).encode("ascii")


def render_op(op: Op) -> bytes:
    if op.kind is OpKind.COPY:
        line = f"copy {op.offset} {op.length} {op.source_offset} {op.sha256}"
    elif op.kind is OpKind.ZERO:
        line = f"zero {op.offset} {op.length}"
    elif op.kind is OpKind.DATA:
        line = f"data {op.offset} {op.length} {op.payload_size} {op.sha256}"
    elif op.kind is OpKind.PATCH:
        line = (
            f"patch {op.offset} {op.length} {op.source_offset} {op.source_length} "
            f"{op.source_sha256} {op.payload_size} {op.sha256}"
        )
    else:
        line = (
            f"bspatch {op.offset} {op.length} {op.filter} {op.start} {op.source_sha256} "
            f"{op.payload_size} {op.sha256}"
        )
    return line.encode("ascii") + b"\n"


def render_window(window: Window) -> bytes:
    lines = [
        f"window {window.count} {window.length} {window.filter} {window.start} {window.sha256}"
    ]
    lines += [f"extent {offset} {length}" for offset, length in window.extents]
    return "".join(line + "\n" for line in lines).encode("ascii")


def render_end(op_count: int) -> bytes:
    return b"end %d\n" % op_count


def parse_magic(line: str) -> int:
    """The stream version of the first line."""
    match = _MAGIC.fullmatch(line)
    if match is None:
        raise BundleError(f"not a delta stream: it starts with {shown(line, 40)}")
    version = int(match.group(1))
    if version not in READABLE_VERSIONS:
        raise BundleError(
            f"unsupported delta stream version {version} (this avobuild reads versions "
            f"{' and '.join(map(str, READABLE_VERSIONS))})"
        )
    return version


def parse_ref(line: str, keyword: str) -> ImageRef:
    match = _REF.fullmatch(line)
    if match is None or match.group(1) != keyword or int(match.group(2)) > MAX_NUMBER:
        raise BundleError(f"expected a {keyword!r} line (size and sha256), got {shown(line, 120)}")
    return ImageRef(int(match.group(2)), match.group(3))


def parse_op(
    line: str, version: int = 1
) -> Op | Window | int | ZstdVersion | UnpackedWindow | Recompress:
    """An operation, a window (its extents still to be read with `parse_extent`), or the op
    count of the `end` line; BundleError for anything else, and for a line of version 2 in a
    version 1 stream.

    Bounds that do not depend on the position in the stream are checked here; the reader
    checks offsets against the target and source sizes.
    """
    keyword = line.partition(" ")[0]
    if version >= 2 and keyword in SQUASHFS_KEYWORDS:
        return parse_squashfs_line(line)
    pattern = _LINES.get(keyword) or (_LINES_2.get(keyword) if version >= 2 else None)
    match = pattern.fullmatch(line) if pattern is not None else None
    # Numbers have at most 19 digits (hashes have 64), so 19-digit values above 2^63 - 1 are
    # the only numbers the grammar lets through that the format forbids.
    if match is None or any(
        len(value) <= 19 and value.isdigit() and int(value) > MAX_NUMBER for value in match.groups()
    ):
        raise BundleError(f"malformed delta operation {shown(line, 120)}")
    values = match.groups()
    if keyword == "end":
        return int(values[0])
    if keyword == "window":
        return _parse_window(line, values)
    kind = OpKind(keyword)
    offset, length = int(values[0]), int(values[1])
    if length == 0:
        raise BundleError(f"delta operation {shown(line, 120)} has length 0")
    if kind is OpKind.COPY:
        return Op(kind, offset, length, values[3], source_offset=int(values[2]))
    if kind is OpKind.ZERO:
        return Op(kind, offset, length)
    if length > MAX_EXTENT:
        raise BundleError(
            f"delta operation {shown(line, 120)}: {length} bytes, over the limit of {MAX_EXTENT}"
        )
    if kind is OpKind.BSPATCH and values[2] == Filter.RAW and int(values[3]):
        raise BundleError(f"delta operation {shown(line, 120)}: a raw bspatch has start 0")
    if kind is OpKind.DATA:
        op = Op(kind, offset, length, values[3], payload_size=int(values[2]))
    elif kind is OpKind.BSPATCH:
        op = Op(
            kind,
            offset,
            length,
            values[6],
            source_sha256=values[4],
            payload_size=int(values[5]),
            filter=Filter(values[2]),
            start=int(values[3]),
        )
    else:
        op = Op(
            kind,
            offset,
            length,
            values[6],
            source_offset=int(values[2]),
            source_length=int(values[3]),
            source_sha256=values[4],
            payload_size=int(values[5]),
        )
        if not 0 < op.source_length <= MAX_EXTENT:
            raise BundleError(
                f"delta operation {shown(line, 120)}: dictionary of {op.source_length} bytes, "
                f"expected 1 to {MAX_EXTENT}"
            )
    if not 0 < op.payload_size <= max_payload_size(length):
        raise BundleError(
            f"delta operation {shown(line, 120)}: payload of {op.payload_size} bytes, expected 1 "
            f"to {max_payload_size(length)}"
        )
    return op


def _parse_window(line: str, values: tuple[str, ...]) -> Window:
    count, length, start = int(values[0]), int(values[1]), int(values[3])
    window = Window(count, length, Filter(values[2]), start, values[4])
    if not 1 <= count <= MAX_WINDOW_EXTENTS:
        raise BundleError(
            f"delta window {shown(line, 120)}: {count} extents, expected 1 to {MAX_WINDOW_EXTENTS}"
        )
    if not 1 <= length <= MAX_EXTENT:
        raise BundleError(
            f"delta window {shown(line, 120)}: {length} bytes, expected 1 to {MAX_EXTENT}"
        )
    if window.filter is Filter.RAW and start:
        raise BundleError(f"delta window {shown(line, 120)}: a raw window has start 0")
    return window


def parse_extent(line: str) -> tuple[int, int]:
    """One `extent <source-offset> <length>` line of a window."""
    match = _EXTENT.fullmatch(line)
    if match is None or any(int(value) > MAX_NUMBER for value in match.groups()):
        raise BundleError(f"malformed window extent {shown(line, 120)}")
    offset, length = int(match.group(1)), int(match.group(2))
    if length == 0:
        raise BundleError(f"window extent {shown(line, 120)} has length 0")
    return offset, length


# --- Version 2, squashfs: blocks rebuilt uncompressed and recompressed on the applier ------
# (docs/delta-format.md, section 8). `zstd-version` names the zstd the recompression needs;
# `zwindow` joins *decompressed* source blocks (its `zextent` lines) into the window;
# `recompress` rebuilds the uncompressed bytes of `count` target blocks (its `block` lines)
# from a zstd frame or a bsdiff patch against that window, and the applier recompresses
# each one with `zstd -<level> --no-check` and checks its stored bytes' hash.

# A squashfs block is at most 1 MiB; a recompress op rebuilds at most this many of them.
MAX_PACKED_BLOCK = 1 << 20
MAX_RECOMPRESS_BLOCKS = 64
# zstd levels the CLI accepts without --ultra.
MAX_RECOMPRESS_LEVEL = 19


class Packing(StrEnum):
    """How a squashfs block is stored: a zstd frame, or its bytes as they are."""

    ZSTD = "zstd"
    RAW = "raw"


class RecompressMethod(StrEnum):
    """How a `recompress` payload rebuilds the uncompressed blocks from the current zwindow:
    a zstd frame with the window as raw-content dictionary, or a bsdiff patch (BSDIFFLZ or
    BSDIFF40)."""

    PATCH = "patch"
    BSPATCH = "bspatch"


@dataclass(frozen=True)
class ZstdVersion:
    """The `zstd-version` line: the zstd (as ZSTD_versionNumber, 10504 for 1.5.4) whose
    output the `recompress` operations of the stream were checked against."""

    number: int

    def __str__(self) -> str:
        return f"{self.number // 10000}.{self.number // 100 % 100}.{self.number % 100}"


@dataclass(frozen=True)
class PackedExtent:
    """A `zextent` line: `stored_size` source bytes at `source_offset`, `length` bytes once
    unpacked."""

    source_offset: int
    stored_size: int
    length: int
    packing: Packing


@dataclass(frozen=True)
class UnpackedWindow:
    """A `zwindow` line: `count` zextents whose unpacked bytes, joined, are `length` bytes
    with sha256 `sha256`."""

    count: int
    length: int
    sha256: str
    extents: tuple[PackedExtent, ...] = ()


@dataclass(frozen=True)
class PackedBlock:
    """A `block` line of a `recompress` op: `length` bytes unpacked, `stored_size` bytes in
    the target stored as `packing`, the stored bytes with sha256 `sha256`."""

    length: int
    stored_size: int
    packing: Packing
    sha256: str


@dataclass(frozen=True)
class Recompress:
    """A `recompress` op: target [offset, +length) is `count` stored blocks, rebuilt from a
    `payload_size`-byte payload (`method`) against the zwindow with sha256 `window_sha256`
    and compressed with `zstd -<level> --no-check`."""

    offset: int
    length: int
    count: int
    level: int
    method: RecompressMethod
    window_sha256: str
    payload_size: int
    blocks: tuple[PackedBlock, ...] = ()

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def unpacked_length(self) -> int:
        return sum(block.length for block in self.blocks)


_PACKING = r"(zstd|raw)"
_SQUASHFS_LINES = {
    "zstd-version": re.compile(rf"zstd-version {_NUMBER}", re.ASCII),
    "zwindow": re.compile(rf"zwindow {_NUMBER} {_NUMBER} {_SHA}", re.ASCII),
    "recompress": re.compile(
        rf"recompress {_NUMBER} {_NUMBER} {_NUMBER} {_NUMBER} (patch|bspatch) {_SHA} {_NUMBER}",
        re.ASCII,
    ),
}
_ZEXTENT = re.compile(rf"zextent {_NUMBER} {_NUMBER} {_NUMBER} {_PACKING}", re.ASCII)
_BLOCK = re.compile(rf"block {_NUMBER} {_NUMBER} {_PACKING} {_SHA}", re.ASCII)
SQUASHFS_KEYWORDS = frozenset(_SQUASHFS_LINES)


def _squashfs_match(pattern: re.Pattern[str], line: str, what: str) -> tuple[str, ...]:
    match = pattern.fullmatch(line)
    if match is None or any(
        len(value) <= 19 and value.isdigit() and int(value) > MAX_NUMBER for value in match.groups()
    ):
        raise BundleError(f"malformed {what} {shown(line, 120)}")
    return match.groups()


def parse_squashfs_line(line: str) -> ZstdVersion | UnpackedWindow | Recompress:
    """A `zstd-version`, `zwindow` (its zextents still to be read) or `recompress` line (its
    blocks still to be read), with the bounds that do not depend on the stream position."""
    keyword = line.partition(" ")[0]
    values = _squashfs_match(_SQUASHFS_LINES[keyword], line, "delta operation")
    if keyword == "zstd-version":
        return ZstdVersion(int(values[0]))
    if keyword == "zwindow":
        count, length = int(values[0]), int(values[1])
        if not 1 <= count <= MAX_WINDOW_EXTENTS or not 1 <= length <= MAX_EXTENT:
            raise BundleError(
                f"delta window {shown(line, 120)}: expected 1 to {MAX_WINDOW_EXTENTS} extents "
                f"and 1 to {MAX_EXTENT} bytes"
            )
        return UnpackedWindow(count, length, values[2])
    offset, length, count, level = (int(value) for value in values[:4])
    op = Recompress(
        offset, length, count, level, RecompressMethod(values[4]), values[5], int(values[6])
    )
    if not (
        1 <= length <= MAX_EXTENT
        and 1 <= count <= MAX_RECOMPRESS_BLOCKS
        and 1 <= level <= MAX_RECOMPRESS_LEVEL
        and (BSDIFF_HEADER if op.method is RecompressMethod.BSPATCH else 1) <= op.payload_size
        and op.payload_size <= max_payload_size(MAX_EXTENT)
    ):
        raise BundleError(
            f"delta operation {shown(line, 120)}: expected 1 to {MAX_EXTENT} bytes, 1 to "
            f"{MAX_RECOMPRESS_BLOCKS} blocks, level 1 to {MAX_RECOMPRESS_LEVEL} and a payload "
            "within the bound"
        )
    return op


def parse_zextent(line: str) -> PackedExtent:
    values = _squashfs_match(_ZEXTENT, line, "window extent")
    extent = PackedExtent(int(values[0]), int(values[1]), int(values[2]), Packing(values[3]))
    if (
        not 1 <= extent.stored_size <= MAX_PACKED_BLOCK
        or not 1 <= extent.length <= MAX_PACKED_BLOCK
        or (extent.packing is Packing.RAW and extent.stored_size != extent.length)
    ):
        raise BundleError(
            f"window extent {shown(line, 120)}: expected 1 to {MAX_PACKED_BLOCK} bytes, the "
            "same stored and unpacked for raw"
        )
    return extent


def parse_block(line: str) -> PackedBlock:
    values = _squashfs_match(_BLOCK, line, "recompressed block")
    block = PackedBlock(int(values[0]), int(values[1]), Packing(values[2]), values[3])
    if (
        not 1 <= block.length <= MAX_PACKED_BLOCK
        or not 1 <= block.stored_size <= block.length
        or (block.packing is Packing.RAW and block.stored_size != block.length)
    ):
        raise BundleError(
            f"recompressed block {shown(line, 120)}: expected 1 to {MAX_PACKED_BLOCK} bytes "
            "unpacked, 1 to that many stored (the same for raw)"
        )
    return block


def render_zstd_version(version: ZstdVersion) -> bytes:
    return b"zstd-version %d\n" % version.number


def render_unpacked_window(window: UnpackedWindow) -> bytes:
    lines = [f"zwindow {window.count} {window.length} {window.sha256}"]
    lines += [
        f"zextent {extent.source_offset} {extent.stored_size} {extent.length} {extent.packing}"
        for extent in window.extents
    ]
    return "".join(line + "\n" for line in lines).encode("ascii")


def render_recompress(op: Recompress) -> bytes:
    lines = [
        f"recompress {op.offset} {op.length} {op.count} {op.level} {op.method} "
        f"{op.window_sha256} {op.payload_size}"
    ]
    lines += [
        f"block {block.length} {block.stored_size} {block.packing} {block.sha256}"
        for block in op.blocks
    ]
    return "".join(line + "\n" for line in lines).encode("ascii")
