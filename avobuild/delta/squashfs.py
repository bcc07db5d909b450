"""A bounded squashfs 4.0 reader for squashfs-aware deltas: where every file's data blocks
and every fragment block lie in the image, and how each one is stored.

Layout (squashfs 4.0, little-endian, as the kernel's `fs/squashfs` reads it): a 96-byte
superblock; optionally the compressor options as one metadata block; the data area, where
each file's data blocks (at most `block_size` bytes each, compressed unless bit 24 of the
size word is set; size 0 is a hole) follow one another from the inode's `blocks_start`, and
where fragment blocks (the packed tails of small files) are written between them; then the
inode table, the directory table, the fragment table, the export, id and xattr tables. The
tables are sequences of metadata blocks: a 16-bit header (bit 15: stored uncompressed; low
15 bits: stored size, at most 8 KiB) and the bytes.

The images are ones avobuild built, but they are read as hostile input all the same: every
offset is checked against the image size before it is read, every decompressed size is capped
by what the format allows, the directory walk is bounded in depth and in entries and refuses
a loop, and any inconsistency is a `BundleError` naming the image and the byte offset.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import zstandard

from avobuild.errors import BundleError

MAGIC = 0x73717368
SUPERBLOCK_SIZE = 96
ZSTD_COMPRESSION = 6
# mksquashfs's default zstd level, used when the image carries no compressor options.
DEFAULT_ZSTD_LEVEL = 15
MAX_BLOCK_SIZE = 1 << 20
METADATA_SIZE = 8192
_UNCOMPRESSED_BLOCK = 1 << 24
_UNCOMPRESSED_METADATA = 0x8000
_NO_FRAGMENT = 0xFFFFFFFF
_NO_TABLE = (1 << 64) - 1
_COMPRESSOR_OPTIONS = 0x0400
_FRAGMENTS_PER_BLOCK = METADATA_SIZE // 16
_MAX_DEPTH = 128
_MAX_ENTRIES = 1 << 22
# The decompressed inode and directory tables avobuild reads at most (a few MB for 100k files).
_MAX_TABLE = 256 << 20
_BASIC_DIRECTORY, _BASIC_FILE, _EXTENDED_DIRECTORY, _EXTENDED_FILE = 1, 2, 8, 9
# The fixed part of each inode kind avobuild reads (the common 16-byte header included).
_FIXED_SIZES = {_BASIC_DIRECTORY: 32, _BASIC_FILE: 32, _EXTENDED_DIRECTORY: 40, _EXTENDED_FILE: 56}


@dataclass(frozen=True)
class StoredBlock:
    """One data or fragment block as stored: image byte offset, stored size, whether it is
    zstd-compressed (else the bytes are the data), and its uncompressed size (0: unknown,
    for a fragment block, until it is read)."""

    offset: int
    stored_size: int
    compressed: bool
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.stored_size


@dataclass(frozen=True)
class SquashFile:
    """A regular file: its size, its data blocks (None for a hole) and its tail's fragment
    (index, offset inside the fragment block; index -1: no fragment)."""

    path: str
    size: int
    blocks: tuple[StoredBlock | None, ...]
    fragment: int
    fragment_offset: int


@dataclass(frozen=True)
class SquashImage:
    """What a squashfs-aware delta needs from an image."""

    path: Path
    size: int
    block_size: int
    compression_level: int
    bytes_used: int
    inode_table_start: int
    files: dict[str, SquashFile]
    fragments: tuple[StoredBlock, ...]


def squashfs_compression(path: Path) -> int | None:
    """The compression id of a squashfs 4.0 image (6: zstd), None for any other file."""
    try:
        with path.open("rb") as handle:
            header = handle.read(SUPERBLOCK_SIZE)
    except OSError:
        return None
    if (
        len(header) != SUPERBLOCK_SIZE
        or struct.unpack_from("<I", header)[0] != MAGIC
        or struct.unpack_from("<HH", header, 28) != (4, 0)
    ):
        return None
    compression: int = struct.unpack_from("<H", header, 20)[0]
    return compression


class _Reader:
    def __init__(self, path: Path, fd: int, size: int) -> None:
        self.path = path
        self._fd = fd
        self.size = size
        self._decompressor = zstandard.ZstdDecompressor()
        self._metadata: dict[int, tuple[bytes, int]] = {}
        self.table_bytes = 0

    def fail(self, offset: int, what: str) -> BundleError:
        return BundleError(f"{self.path}: squashfs byte offset {offset}: {what}")

    def read(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0 or offset + size > self.size:
            raise self.fail(offset, f"{size} bytes past the image's {self.size} bytes")
        data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise self.fail(offset, "the image ends early")
        return data

    def decompress(self, offset: int, data: bytes, limit: int) -> bytes:
        """One zstd frame of at most `limit` bytes."""
        try:
            out: bytes = self._decompressor.decompress(data, max_output_size=limit)
        except zstandard.ZstdError as error:
            raise self.fail(offset, f"not a zstd block of at most {limit} bytes: {error}") from None
        if len(out) > limit:
            raise self.fail(offset, f"decompresses to more than {limit} bytes")
        return out

    def metadata_block(self, offset: int) -> tuple[bytes, int]:
        """The bytes of the metadata block at `offset` and the offset of the next one."""
        cached = self._metadata.get(offset)
        if cached is not None:
            return cached
        (header,) = struct.unpack("<H", self.read(offset, 2))
        stored = header & ~_UNCOMPRESSED_METADATA
        if not 0 < stored <= METADATA_SIZE:
            raise self.fail(offset, f"metadata block of {stored} bytes, expected 1 to 8192")
        raw = self.read(offset + 2, stored)
        data = raw if header & _UNCOMPRESSED_METADATA else self.decompress(offset, raw, 8192)
        self.table_bytes += len(data)
        if self.table_bytes > _MAX_TABLE:
            raise self.fail(offset, f"metadata tables over {_MAX_TABLE} bytes")
        result = (data, offset + 2 + stored)
        self._metadata[offset] = result
        return result

    def metadata(self, block: int, offset: int, size: int, limit: int) -> bytes:
        """`size` bytes of a table from `offset` in its metadata block at `block`, following
        the blocks after it; no block at or past `limit` is read."""
        parts = []
        while size > 0:
            if block >= limit:
                raise self.fail(block, "a metadata table read past its end")
            data, following = self.metadata_block(block)
            if offset > len(data):
                raise self.fail(block, f"offset {offset} past a {len(data)}-byte metadata block")
            part = data[offset : offset + size]
            parts.append(part)
            size -= len(part)
            block, offset = following, 0
        return b"".join(parts)


def read_squashfs(path: Path) -> SquashImage:
    """The files and fragment blocks of a zstd squashfs 4.0 image; BundleError for any other
    compression or anything inconsistent."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as error:
        raise BundleError(f"{path}: cannot open: {error.strerror or error}") from None
    try:
        return _read(_Reader(path, fd, os.fstat(fd).st_size))
    finally:
        os.close(fd)


def _read(reader: _Reader) -> SquashImage:
    (
        magic,
        _inodes,
        _mtime,
        block_size,
        fragment_count,
        compression,
        block_log,
        flags,
        _ids,
        major,
        minor,
        root,
        bytes_used,
        _id_start,
        _xattr_start,
        inode_start,
        directory_start,
        fragment_start,
        _export_start,
    ) = struct.unpack("<IIIIIHHHHHHQQQQQQQQ", reader.read(0, SUPERBLOCK_SIZE))
    if magic != MAGIC or (major, minor) != (4, 0):
        raise reader.fail(0, "not a squashfs 4.0 superblock")
    if compression != ZSTD_COMPRESSION:
        raise reader.fail(20, f"compression {compression}, expected zstd ({ZSTD_COMPRESSION})")
    if not 4096 <= block_size <= MAX_BLOCK_SIZE or block_size != 1 << block_log:
        raise reader.fail(12, f"block size {block_size}, expected a power of two, 4K to 1M")
    if not SUPERBLOCK_SIZE <= inode_start < directory_start < bytes_used <= reader.size:
        raise reader.fail(64, "the inode and directory tables are not inside the image")
    level = DEFAULT_ZSTD_LEVEL
    if flags & _COMPRESSOR_OPTIONS:
        options, _ = reader.metadata_block(SUPERBLOCK_SIZE)
        if len(options) < 4:
            raise reader.fail(SUPERBLOCK_SIZE, "truncated zstd compressor options")
        (level,) = struct.unpack_from("<i", options)
    fragments = _fragments(reader, fragment_count, fragment_start, block_size, inode_start)
    files: dict[str, SquashFile] = {}
    walker = _Walker(reader, block_size, inode_start, directory_start, bytes_used, files)
    walker.walk(root, "", 0, set())
    for file in files.values():
        for block in file.blocks:
            if block is not None and block.end > inode_start:
                raise reader.fail(block.offset, f"a data block of {file.path} past the data area")
        if file.fragment >= len(fragments):
            raise reader.fail(inode_start, f"{file.path}: fragment {file.fragment} does not exist")
    return SquashImage(
        reader.path,
        reader.size,
        block_size,
        level,
        bytes_used,
        inode_start,
        files,
        fragments,
    )


def _fragments(
    reader: _Reader, count: int, start: int, block_size: int, data_end: int
) -> tuple[StoredBlock, ...]:
    if not count:
        return ()
    index_blocks = -(-count // _FRAGMENTS_PER_BLOCK)
    pointers = struct.unpack(f"<{index_blocks}Q", reader.read(start, 8 * index_blocks))
    fragments: list[StoredBlock] = []
    for pointer in pointers:
        if pointer >= start:
            raise reader.fail(start, f"fragment table block at {pointer}, past its index")
        entries, _ = reader.metadata_block(pointer)
        for position in range(0, len(entries) - 15, 16):
            if len(fragments) == count:
                break
            offset, size, _ = struct.unpack_from("<QII", entries, position)
            stored = size & ~_UNCOMPRESSED_BLOCK
            if size & ~(_UNCOMPRESSED_BLOCK | 0xFFFFFF) or not 0 < stored <= block_size:
                raise reader.fail(pointer, f"fragment {len(fragments)}: stored size {stored}")
            if offset < SUPERBLOCK_SIZE or offset + stored > data_end:
                raise reader.fail(pointer, f"fragment {len(fragments)} outside the data area")
            fragments.append(StoredBlock(offset, stored, not size & _UNCOMPRESSED_BLOCK, 0))
    if len(fragments) != count:
        raise reader.fail(start, f"{len(fragments)} fragment entries, the superblock says {count}")
    return tuple(fragments)


class _Walker:
    def __init__(
        self,
        reader: _Reader,
        block_size: int,
        inode_start: int,
        directory_start: int,
        bytes_used: int,
        files: dict[str, SquashFile],
    ) -> None:
        self._reader = reader
        self._block_size = block_size
        self._inode_start = inode_start
        self._directory_start = directory_start
        self._bytes_used = bytes_used
        self._files = files
        self._entries = 0

    def _inode(self, reference: int, size: int) -> bytes:
        block = self._inode_start + (reference >> 16)
        return self._reader.metadata(block, reference & 0xFFFF, size, self._directory_start)

    def walk(self, reference: int, path: str, depth: int, seen: set[int]) -> None:
        if depth > _MAX_DEPTH:
            raise self._reader.fail(self._inode_start, f"{path}: directories nested too deep")
        if reference in seen:
            raise self._reader.fail(self._inode_start, f"{path}: a directory loop")
        (kind,) = struct.unpack("<H", self._inode(reference, 2))
        if kind not in _FIXED_SIZES:
            return  # symlinks, devices, FIFOs, sockets hold no data blocks
        header = self._inode(reference, _FIXED_SIZES[kind])
        if kind == _BASIC_DIRECTORY:
            block, _, listing, offset, _ = struct.unpack_from("<IIHHI", header, 16)
        elif kind == _EXTENDED_DIRECTORY:
            _, listing, block, _, _, offset, _ = struct.unpack_from("<IIIIHHI", header, 16)
        else:
            self._file(reference, kind, header, path or "/")
            return
        if listing <= 3:
            return
        data = self._reader.metadata(
            self._directory_start + block, offset, listing - 3, self._bytes_used
        )
        position = 0
        while position + 12 <= len(data):
            count, start, _ = struct.unpack_from("<III", data, position)
            position += 12
            for _ in range(count + 1):
                if position + 8 > len(data):
                    raise self._reader.fail(self._directory_start + block, f"{path}: short entry")
                entry_offset, _, _, name_size = struct.unpack_from("<HhHH", data, position)
                name = data[position + 8 : position + 9 + name_size]
                position += 9 + name_size
                self._entries += 1
                if (
                    len(name) != name_size + 1
                    or b"/" in name
                    or name in (b".", b"..")
                    or self._entries > _MAX_ENTRIES
                ):
                    raise self._reader.fail(
                        self._directory_start + block, f"{path}: a malformed directory entry"
                    )
                child = f"{path}/{name.decode('utf-8', 'surrogateescape')}"
                self.walk((start << 16) | entry_offset, child, depth + 1, seen | {reference})

    def _file(self, reference: int, kind: int, header: bytes, path: str) -> None:
        if kind == _BASIC_FILE:
            start, fragment, fragment_offset, size = struct.unpack_from("<IIII", header, 16)
            sizes_at = 32
        else:
            start, size, _, _, fragment, fragment_offset, _ = struct.unpack_from(
                "<QQQIIII", header, 16
            )
            sizes_at = 56
        full, tail = divmod(size, self._block_size)
        count = full + (1 if tail and fragment == _NO_FRAGMENT else 0)
        if count > self._reader.size // 2 + 1:
            raise self._reader.fail(self._inode_start, f"{path}: {count} blocks, impossible")
        words = self._inode(reference, sizes_at + 4 * count)[sizes_at:]
        blocks: list[StoredBlock | None] = []
        position = start
        for index, word in enumerate(struct.unpack(f"<{count}I", words)):
            stored = word & ~_UNCOMPRESSED_BLOCK
            length = min(self._block_size, size - index * self._block_size)
            if word & ~(_UNCOMPRESSED_BLOCK | 0xFFFFFF) or stored > self._block_size:
                raise self._reader.fail(position, f"{path}: block {index} of {stored} bytes")
            if stored == 0:
                blocks.append(None)
                continue
            if position < SUPERBLOCK_SIZE or position + stored > self._reader.size:
                raise self._reader.fail(position, f"{path}: block {index} outside the image")
            compressed = not word & _UNCOMPRESSED_BLOCK
            if not compressed and stored != length:
                raise self._reader.fail(position, f"{path}: uncompressed block {index} of {stored}")
            blocks.append(StoredBlock(position, stored, compressed, length))
            position += stored
        self._files[path] = SquashFile(
            path,
            size,
            tuple(blocks),
            -1 if fragment == _NO_FRAGMENT else fragment,
            fragment_offset if fragment != _NO_FRAGMENT else 0,
        )


def read_block(image: SquashImage, fd: int, block: StoredBlock) -> bytes:
    """The uncompressed bytes of a data or fragment block (at most the block size)."""
    reader = _Reader(image.path, fd, image.size)
    stored = reader.read(block.offset, block.stored_size)
    if not block.compressed:
        return stored
    data = reader.decompress(block.offset, stored, image.block_size)
    if block.length and len(data) != block.length:
        raise reader.fail(block.offset, f"block of {len(data)} bytes, expected {block.length}")
    return data


def file_bytes(image: SquashImage, fd: int, file: SquashFile) -> bytes:
    """A whole file's bytes (the reader's own round trip, for tests)."""
    parts = []
    for index, block in enumerate(file.blocks):
        if block is None:
            parts.append(bytes(min(image.block_size, file.size - index * image.block_size)))
        else:
            parts.append(read_block(image, fd, block))
    if file.fragment >= 0:
        fragment = read_block(image, fd, image.fragments[file.fragment])
        tail = file.size - len(file.blocks) * image.block_size
        if file.fragment_offset + tail > len(fragment):
            raise BundleError(f"{image.path}: {file.path}: its tail lies past its fragment block")
        parts.append(fragment[file.fragment_offset : file.fragment_offset + tail])
    return b"".join(parts)
