"""Recompressing squashfs blocks exactly as mksquashfs did (docs/delta-format.md, section 8).

mksquashfs `-comp zstd` compresses each data block and each fragment block with one
`ZSTD_compress` call at its level. The same zstd *version* compressing the same bytes at the
same level gives the same bytes again; another version may not (python-zstandard's bundled
1.5.7 reproduces only two thirds of the blocks Debian 12's 1.5.4 made). So a `recompress`
operation ships a changed block's *uncompressed* bytes (as a diff against the old file's
decompressed blocks) and the applier compresses them with the `zstd` CLI, from a file so the
frame carries the content size, as `zstd -<level> --no-check -q -c FILE`. The stream names
the zstd version it was checked with (`zstd-version`); an applier with another version
refuses the stream before it writes, naming both; and every block's stored bytes are hashed.

This module holds the CLI calls, which the encoder uses to verify every block it emits, and
the host applier's side of the `zwindow` and `recompress` lines.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import zstandard

from avobuild.bundle.reader import decode_frame
from avobuild.delta.bspatch import apply_patch
from avobuild.delta.stream import (
    MAX_EXTENT,
    PackedBlock,
    PackedExtent,
    Packing,
    Recompress,
    RecompressMethod,
    UnpackedWindow,
    ZstdVersion,
    parse_block,
    parse_zextent,
)
from avobuild.errors import BundleError, ToolFailed
from avobuild.run import run

ZSTD = "zstd"
_VERSION = re.compile(rb" v([0-9]{1,3})\.([0-9]{1,2})\.([0-9]{1,2})\b")


@functools.cache
def zstd_cli_version() -> ZstdVersion:
    """The version of the host's `zstd` CLI (what `zstd -V` prints)."""
    try:
        output = run([ZSTD, "-V"]).stdout
    except ToolFailed as error:
        raise BundleError(f"zstd -V: {error}") from None
    match = _VERSION.search(output)
    if match is None:
        raise BundleError(f"zstd -V printed no version: {output[:80]!r}")
    major, minor, release = (int(value) for value in match.groups())
    return ZstdVersion(major * 10000 + minor * 100 + release)


def check_zstd_version(needed: ZstdVersion) -> None:
    """Refuse a stream whose blocks were checked with another zstd than the host's."""
    have = zstd_cli_version()
    if have != needed:
        raise BundleError(
            f"the delta recompresses squashfs blocks with zstd {needed}, this host's zstd is "
            f"{have}, whose output may differ: nothing was written"
        )


def compress_block(data: bytes, level: int, work: Path, name: str = "block") -> bytes:
    """`data` compressed as the applier does: `zstd -<level> --no-check -q -c` of a file."""
    block = work / name
    block.write_bytes(data)
    try:
        return run([ZSTD, f"-{level}", "--no-check", "-q", "-c", block]).stdout
    except ToolFailed as error:
        raise BundleError(f"zstd -{level} of a {len(data)}-byte block: {error}") from None
    finally:
        block.unlink(missing_ok=True)


def stored_bytes(data: bytes, packing: Packing, level: int, work: Path, name: str) -> bytes:
    """A block's stored bytes from its unpacked ones."""
    return compress_block(data, level, work, name) if packing is Packing.ZSTD else data


def unpack_extent(extent: PackedExtent, stored: bytes, where: str) -> bytes:
    """The unpacked bytes of a zwindow extent: exactly `extent.length` of them."""
    if extent.packing is Packing.RAW:
        return stored
    try:
        data: bytes = zstandard.ZstdDecompressor().decompress(stored, max_output_size=extent.length)
    except zstandard.ZstdError as error:
        raise BundleError(
            f"{where}: source bytes at {extent.source_offset} are not a zstd block: {error}"
        ) from None
    if len(data) != extent.length:
        raise BundleError(
            f"{where}: the source block at {extent.source_offset} unpacks to {len(data)} bytes, "
            f"the window extent says {extent.length}"
        )
    return data


ReadLine = Callable[[], str]
ReadSource = Callable[[int, int], bytes]


@dataclass
class RecompressState:
    """The host applier's state for the squashfs lines of a stream: the zstd version it
    checked and the current unpacked window."""

    version: ZstdVersion | None = None
    window: UnpackedWindow | None = None
    window_data: bytes = b""

    def set_version(self, version: ZstdVersion, first: bool, where: str) -> None:
        if not first or self.version is not None:
            raise BundleError(f"{where}: a zstd-version line must directly follow the target line")
        try:
            check_zstd_version(version)
        except BundleError as error:
            raise BundleError(f"{where}: {error}") from None
        self.version = version

    def load_window(
        self,
        window: UnpackedWindow,
        read_line: ReadLine,
        read_source: ReadSource,
        source_size: int,
        where: str,
    ) -> None:
        """Read the zextent lines, unpack their source blocks, check the joined hash."""
        extents = []
        for _ in range(window.count):
            try:
                extent = parse_zextent(read_line())
            except BundleError as error:
                raise BundleError(f"{where}: {error}") from None
            if extent.stored_size > source_size - min(source_size, extent.source_offset):
                raise BundleError(
                    f"{where}: window extent reads past the source's {source_size} bytes"
                )
            extents.append(extent)
        if sum(extent.length for extent in extents) != window.length:
            raise BundleError(
                f"{where}: the window's extents do not add up to {window.length} bytes"
            )
        data = b"".join(
            unpack_extent(extent, read_source(extent.source_offset, extent.stored_size), where)
            for extent in extents
        )
        if hashlib.sha256(data).hexdigest() != window.sha256:
            raise BundleError(f"{where}: the window's unpacked source blocks do not match its hash")
        self.window = window
        self.window_data = data

    def rebuild(
        self,
        op: Recompress,
        read_line: ReadLine,
        read_payload: Callable[[int], bytes],
        where: str,
    ) -> bytes:
        """The stored bytes of a recompress op's blocks, each checked against its hash."""
        blocks = []
        for _ in range(op.count):
            try:
                blocks.append(parse_block(read_line()))
            except BundleError as error:
                raise BundleError(f"{where}: {error}") from None
        op = dataclasses.replace(op, blocks=tuple(blocks))
        if sum(block.stored_size for block in blocks) != op.length:
            raise BundleError(f"{where}: the blocks' stored sizes do not add up to {op.length}")
        if op.unpacked_length > MAX_EXTENT:
            raise BundleError(f"{where}: the blocks unpack to more than {MAX_EXTENT} bytes")
        if self.version is None:
            raise BundleError(f"{where}: recompress in a stream without a zstd-version line")
        if self.window is None or self.window.sha256 != op.window_sha256:
            raise BundleError(
                f"{where}: recompress names window {op.window_sha256}, which is not the current one"
            )
        payload = read_payload(op.payload_size)
        if len(payload) != op.payload_size:
            raise BundleError(f"{where}: the stream ends inside an operation's payload")
        unpacked = unpack_payload(op, payload, self.window_data, where)
        with tempfile.TemporaryDirectory(prefix="avobuild-recompress-") as work:
            return pack_blocks(op, unpacked, Path(work), where)


def unpack_payload(op: Recompress, payload: bytes, window: bytes, where: str) -> bytes:
    """The blocks' unpacked bytes from the payload: exactly `op.unpacked_length` of them."""
    length = op.unpacked_length
    if op.method is RecompressMethod.PATCH:
        dictionary = zstandard.ZstdCompressionDict(window, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        try:
            return decode_frame(payload, length, zstandard.ZstdDecompressor(dict_data=dictionary))
        except BundleError as error:
            raise BundleError(f"{where}: the operation's payload {error}") from None
    return apply_patch(window, payload, length, where)


def pack_blocks(op: Recompress, unpacked: bytes, work: Path, where: str) -> bytes:
    """Cut the unpacked bytes into the op's blocks, store each one (on every core: each
    zstd is a process of its own), check its hash."""
    starts = [sum(block.length for block in op.blocks[:index]) for index in range(op.count)]
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        results = list(
            pool.map(
                lambda index: stored_bytes(
                    unpacked[starts[index] : starts[index] + op.blocks[index].length],
                    op.blocks[index].packing,
                    op.level,
                    work,
                    f"block-{index}",
                ),
                range(op.count),
            )
        )
    parts = []
    for index, (block, stored) in enumerate(zip(op.blocks, results, strict=True)):
        if len(stored) != block.stored_size or hashlib.sha256(stored).hexdigest() != block.sha256:
            raise BundleError(
                f"{where}: block {index} recompressed with zstd -{op.level} is not the stored "
                f"block ({len(stored)} bytes, expected {block.stored_size} with sha256 "
                f"{block.sha256})"
            )
        parts.append(stored)
    return b"".join(parts)


def block_line(stored: bytes, length: int, packing: Packing) -> PackedBlock:
    return PackedBlock(length, len(stored), packing, hashlib.sha256(stored).hexdigest())
