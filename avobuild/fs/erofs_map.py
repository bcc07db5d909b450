"""Where each regular file of an EROFS image keeps its bytes, read from the image itself.

File-aware deltas (`delta.files`) pair every changed file of the new slot image with its own
previous version; for ext4 slots `fs.ext4.ext4_file_map` asks debugfs, for erofs slots this
module walks the on-disk format (the Linux kernel's `erofs_fs.h`) with bounded reads:

- the superblock at byte 1024: magic 0xE0F5E1E2, the block size (`blkszbits`), the root
  directory's node id and the metadata area's first block (`meta_blkaddr`);
- an inode at `meta_blkaddr * block + nid * 32`: compact (32 bytes) or extended (64), its
  data layout in bits 1-3 of `i_format`, its inline xattrs after it;
- data: `FLAT_PLAIN` (blocks from `i_u`), `FLAT_INLINE` (the same, with the last partial block
  stored right after the inode and its xattrs, in the inode's metadata block),
  `CHUNK_BASED` (a block address per chunk, or 8-byte chunk indexes, after the xattrs).
  Compressed files (`COMPRESSED_FULL`, `COMPRESSED_COMPACT`) are left out of the map: their
  blocks are not the file's bytes (avobuild builds erofs uncompressed, `fs.erofs`);
- directories: blocks of 12-byte entries (node id, name offset, file type) and their names.

The image is input: every offset and length is checked against the image's size and the
format's own bounds before it is read, directory loops and names with a slash are refused,
and any of that raises `BuildError` naming the byte offset (the delta is then made without
file awareness, `delta.files.file_pairing`). A file reached by several names (hard links)
is mapped once, under the first name in directory order.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from avobuild.errors import BuildError
from avobuild.fs.common import FileBlocks, FileMap

_SUPERBLOCK = 1024
_MAGIC = 0xE0F5E1E2
_SLOT = 32  # bytes per node id
_NULL_ADDRESS = 0xFFFFFFFF
_FLAT_PLAIN, _COMPRESSED_FULL, _FLAT_INLINE, _COMPRESSED_COMPACT, _CHUNK_BASED = range(5)
_CHUNK_BITS = 0x1F
_CHUNK_INDEXES = 0x20
_DIRENT = 12
MAX_DEPTH = 256
MAX_PATH = 4096
MAX_DIRECTORY = 64 << 20


@dataclass(frozen=True)
class _Inode:
    nid: int
    offset: int  # of the inode in the image
    mode: int
    size: int
    layout: int
    address: int  # i_u: raw block address, or the chunk format
    inline: int  # where inline data (tail, chunk table) begins


class _Reader:
    def __init__(self, image: Path, fd: int) -> None:
        self._image = image
        self._fd = fd
        self.image_size = os.fstat(fd).st_size
        superblock = self.read(_SUPERBLOCK, 128, "the superblock")
        if int.from_bytes(superblock[0:4], "little") != _MAGIC:
            raise BuildError(f"{image}: no erofs superblock at byte offset {_SUPERBLOCK}")
        bits = superblock[12]
        if not 9 <= bits <= 16:
            raise BuildError(
                f"{image}: erofs block size 2^{bits} at byte offset {_SUPERBLOCK + 12}: "
                "expected 512 to 65536 bytes"
            )
        self.block_size = 1 << bits
        self.root_nid = int.from_bytes(superblock[14:16], "little")
        self.meta = int.from_bytes(superblock[40:44], "little") * self.block_size

    def read(self, offset: int, length: int, what: str) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.image_size:
            raise BuildError(
                f"{self._image}: {what} at byte offset {offset} ({length} bytes) lies past the "
                f"image's {self.image_size} bytes"
            )
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise BuildError(f"{self._image}: short read of {what} at byte offset {offset}")
        return data

    def inode(self, nid: int) -> _Inode:
        offset = self.meta + nid * _SLOT
        # An extended inode is 64 bytes, a compact one 32: read 64 where the image has them.
        head = self.read(offset, 64 if offset + 64 <= self.image_size else 32, f"inode {nid}")
        format_ = int.from_bytes(head[0:2], "little")
        extended = format_ & 1
        layout = (format_ >> 1) & 7
        if layout > _CHUNK_BASED:
            raise BuildError(
                f"{self._image}: inode {nid} at byte offset {offset}: unknown data layout {layout}"
            )
        xattr_count = int.from_bytes(head[2:4], "little")
        mode = int.from_bytes(head[4:6], "little")
        if extended:
            if len(head) < 64:
                head = self.read(offset, 64, f"inode {nid}")  # raises: past the image
            size, inode_size = int.from_bytes(head[8:16], "little"), 64
        else:
            size, inode_size = int.from_bytes(head[8:12], "little"), 32
        xattrs = 12 + (xattr_count - 1) * 4 if xattr_count else 0
        return _Inode(
            nid,
            offset,
            mode,
            size,
            layout,
            int.from_bytes(head[16:20], "little"),
            offset + inode_size + xattrs,
        )

    def layout(self, inode: _Inode) -> tuple[list[tuple[int, int, int]], tuple[int, int] | None]:
        """The inode's data: block extents (logical, physical, count) and the inline tail
        (image offset, length), for the uncompressed layouts."""
        size, block = inode.size, self.block_size
        where = f"inode {inode.nid} at byte offset {inode.offset}"
        if size > self.image_size and inode.layout != _CHUNK_BASED:
            raise BuildError(f"{self._image}: {where}: {size} bytes in a smaller image")
        blocks = -(-size // block)
        if inode.layout == _FLAT_PLAIN:
            return self._extent(inode.address, blocks, where), None
        if inode.layout == _FLAT_INLINE:
            full = max(0, blocks - 1)
            tail = size - full * block
            if tail and inode.inline % block + tail > block:
                raise BuildError(
                    f"{self._image}: {where}: its {tail}-byte inline tail crosses a block"
                )
            return self._extent(inode.address, full, where), (inode.inline, tail) if tail else None
        if inode.layout == _CHUNK_BASED:
            return self._chunks(inode, where), None
        raise BuildError(f"{self._image}: {where}: compressed")

    def _extent(self, address: int, count: int, where: str) -> list[tuple[int, int, int]]:
        if not count:
            return []
        if (address + count) * self.block_size > self.image_size:
            raise BuildError(
                f"{self._image}: {where}: blocks {address} to {address + count - 1} lie past "
                f"the image's {self.image_size} bytes"
            )
        return [(0, address, count)]

    def _chunks(self, inode: _Inode, where: str) -> list[tuple[int, int, int]]:
        chunk_blocks = 1 << (inode.address & _CHUNK_BITS)
        chunk = self.block_size * chunk_blocks
        count = -(-inode.size // chunk)
        unit = 8 if inode.address & _CHUNK_INDEXES else 4
        table = -(-inode.inline // unit) * unit
        if count * unit > self.image_size:
            raise BuildError(f"{self._image}: {where}: {count} chunks in a smaller image")
        data = self.read(table, count * unit, f"the chunk table of {where}")
        last_blocks = -(-(inode.size - (count - 1) * chunk) // self.block_size) if count else 0
        extents: list[tuple[int, int, int]] = []
        for index in range(count):
            entry = data[index * unit : (index + 1) * unit]
            if unit == 8:
                device, address = (
                    int.from_bytes(entry[2:4], "little"),
                    int.from_bytes(entry[4:8], "little"),
                )
            else:
                device, address = 0, int.from_bytes(entry, "little")
            if address == _NULL_ADDRESS:
                continue  # a hole
            if device:
                raise BuildError(f"{self._image}: {where}: chunk {index} is on device {device}")
            length = chunk_blocks if index < count - 1 else last_blocks
            logical = index * chunk_blocks
            for extent in self._extent(address, length, f"chunk {index} of {where}"):
                _, physical, blocks = extent
                if (
                    extents
                    and extents[-1][0] + extents[-1][2] == logical
                    and extents[-1][1] + extents[-1][2] == physical
                ):
                    extents[-1] = (extents[-1][0], extents[-1][1], extents[-1][2] + blocks)
                    continue
                extents.append((logical, physical, blocks))
        return extents

    def entries(self, directory: _Inode) -> list[tuple[str, int]]:
        """(name, node id) of a directory's entries but '.' and '..'."""
        where = f"directory inode {directory.nid} at byte offset {directory.offset}"
        if directory.size > MAX_DIRECTORY:
            raise BuildError(f"{self._image}: {where}: {directory.size} bytes")
        extents, tail = self.layout(directory)
        blocks = [
            (physical + index) * self.block_size
            for _, physical, count in extents
            for index in range(count)
        ]
        pieces = [(offset, self.block_size) for offset in blocks]
        if tail is not None:
            pieces.append(tail)
        if sum(length for _, length in pieces) < directory.size:
            raise BuildError(f"{self._image}: {where}: its blocks hold fewer than its size")
        found: list[tuple[str, int]] = []
        remaining = directory.size
        for offset, length in pieces:
            length = min(length, remaining)
            remaining -= length
            if length:
                found.extend(self._block_entries(self.read(offset, length, where), offset))
        return found

    def _block_entries(self, block: bytes, offset: int) -> list[tuple[str, int]]:
        where = f"{self._image}: directory block at byte offset {offset}"
        if len(block) < _DIRENT:
            raise BuildError(f"{where}: {len(block)} bytes, less than one entry")
        first = int.from_bytes(block[8:10], "little")
        if not first or first % _DIRENT or first > len(block):
            raise BuildError(f"{where}: first name offset {first}")
        count = first // _DIRENT
        offsets = [
            int.from_bytes(block[index * _DIRENT + 8 : index * _DIRENT + 10], "little")
            for index in range(count)
        ]
        found = []
        for index in range(count):
            start = offsets[index]
            end = offsets[index + 1] if index + 1 < count else len(block)
            if not first <= start < end <= len(block):
                raise BuildError(f"{where}: entry {index}'s name at {start} to {end}")
            name = block[start:end]
            if index + 1 == count:
                name = name.split(b"\0", 1)[0]
            if not name or b"/" in name or b"\0" in name:
                raise BuildError(f"{where}: entry {index}'s name {name[:64]!r}")
            if name in (b".", b".."):
                continue
            nid = int.from_bytes(block[index * _DIRENT : index * _DIRENT + 8], "little")
            found.append((os.fsdecode(name), nid))
        return found


def erofs_block_size(image: Path) -> int | None:
    """The block size of the erofs filesystem in `image`, or None if it holds none."""
    try:
        with image.open("rb") as handle:
            handle.seek(_SUPERBLOCK)
            superblock = handle.read(16)
    except OSError:
        return None
    if len(superblock) < 16 or int.from_bytes(superblock[0:4], "little") != _MAGIC:
        return None
    return 1 << superblock[12] if 9 <= superblock[12] <= 16 else None


def erofs_file_map(image: Path) -> FileMap:
    """The block map of every uncompressed regular file, by path relative to the root (as
    `fs.ext4.ext4_file_map` names them); an inline tail is in no extent."""
    fd = os.open(image, os.O_RDONLY)
    try:
        reader = _Reader(image, fd)
        files: dict[str, FileBlocks] = {}
        mapped: set[int] = set()
        visited: set[int] = set()
        stack: list[tuple[str, int, int]] = [("", reader.root_nid, 0)]
        while stack:
            directory, nid, depth = stack.pop()
            if nid in visited:
                raise BuildError(f"{image}: directory inode {nid} is reached twice (a loop)")
            visited.add(nid)
            inode = reader.inode(nid)
            if not stat.S_ISDIR(inode.mode):
                raise BuildError(
                    f"{image}: inode {nid} at byte offset {inode.offset} is listed as a "
                    "directory but is not one"
                )
            for name, child in reader.entries(inode):
                path = f"{directory}/{name}" if directory else name
                if len(path) > MAX_PATH:
                    raise BuildError(f"{image}: a path longer than {MAX_PATH} bytes: {path[:80]}…")
                entry = reader.inode(child)
                if stat.S_ISDIR(entry.mode):
                    if depth + 1 > MAX_DEPTH:
                        raise BuildError(f"{image}: directories nested deeper than {MAX_DEPTH}")
                    stack.append((path, child, depth + 1))
                elif stat.S_ISREG(entry.mode) and child not in mapped:
                    mapped.add(child)
                    if entry.layout in (_COMPRESSED_FULL, _COMPRESSED_COMPACT):
                        continue
                    extents, _ = reader.layout(entry)
                    files[path] = FileBlocks(entry.size, tuple(extents))
        return FileMap(reader.block_size, dict(sorted(files.items())))
    finally:
        os.close(fd)
