"""Reproducible initramfs archives: the "newc" cpio format, written in pure Python.

Format (Linux Documentation/driver-api/early-userspace/buffer-format.rst): each entry is a
110-byte ASCII header, magic "070701" then thirteen 8-digit hex fields (ino, mode, uid, gid,
nlink, mtime, filesize, devmajor, devminor, rdevmajor, rdevminor, namesize, check), the NUL
terminated name padded to a multiple of 4 bytes (counting the header), then the data padded
to 4 bytes. The archive ends with an entry named "TRAILER!!!".

Nothing of the build host leaks in: entries go in sorted by path (a parent sorts before its
children), inode numbers count up from 1 in that order, every entry is owned by 0:0 and dated
SOURCE_DATE_EPOCH, and the gzip wrapper carries no name and a zero mtime. Device nodes are
written as entries, so no root privileges are needed to make /dev/console.
"""

from __future__ import annotations

import gzip
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from avobuild.errors import BuildError
from avobuild.run import source_date_epoch

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
_COPY_BLOCK = 1 << 20


@dataclass(frozen=True)
class Entry:
    """One archive member. A file's bytes come from `data` or from the host file `source`."""

    mode: int  # full st_mode: type and permission bits
    data: bytes = b""
    source: Path | None = None
    rdev: tuple[int, int] = (0, 0)

    @property
    def size(self) -> int:
        if self.source is not None:
            return self.source.stat().st_size
        return len(self.data)


class Initramfs:
    """A tree of archive members keyed by path relative to the archive root."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}

    def __contains__(self, path: str) -> bool:
        return _normalise(path) in self._entries

    def paths(self) -> list[str]:
        return sorted(self._entries)

    def entry(self, path: str) -> Entry:
        return self._entries[_normalise(path)]

    def directory(self, path: str, mode: int = 0o755) -> None:
        """Add a directory and its missing parents."""
        name = _normalise(path)
        parts = PurePosixPath(name).parts
        for depth in range(1, len(parts) + 1):
            parent = "/".join(parts[:depth])
            existing = self._entries.get(parent)
            if existing is None:
                self._entries[parent] = Entry(
                    stat.S_IFDIR | (mode if depth == len(parts) else 0o755)
                )
            elif not stat.S_ISDIR(existing.mode):
                raise BuildError(f"initramfs: {parent} is not a directory (needed for {name})")

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._add(path, Entry(stat.S_IFREG | mode, data=data))

    def copy(self, path: str, source: Path, mode: int | None = None) -> None:
        """Add host file `source` (symlinks followed) at `path`, with its mode unless given."""
        info = source.stat()
        if not stat.S_ISREG(info.st_mode):
            raise BuildError(f"{source}: not a regular file (cannot go into the initramfs)")
        permissions = stat.S_IMODE(info.st_mode) if mode is None else mode
        self._add(path, Entry(stat.S_IFREG | permissions, source=source.resolve()))

    def symlink(self, path: str, target: str) -> None:
        self._add(path, Entry(stat.S_IFLNK | 0o777, data=target.encode()))

    def char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._add(path, Entry(stat.S_IFCHR | mode, rdev=(major, minor)))

    def _add(self, path: str, entry: Entry) -> None:
        name = _normalise(path)
        parent = str(PurePosixPath(name).parent)
        if parent != ".":
            self.directory(parent)
        existing = self._entries.get(name)
        if existing is not None and stat.S_ISDIR(existing.mode):
            raise BuildError(f"initramfs: {name} is already a directory")
        self._entries[name] = entry

    def write(self, handle: BinaryIO) -> None:
        """Write the uncompressed newc archive."""
        mtime = source_date_epoch()
        for inode, name in enumerate(self.paths(), start=1):
            entry = self._entries[name]
            nlink = 2 if stat.S_ISDIR(entry.mode) else 1
            handle.write(_header(name, inode, entry.mode, nlink, mtime, entry.size, entry.rdev))
            written = 0
            for block in _content(entry):
                handle.write(block)
                written += len(block)
            if written != entry.size:
                raise BuildError(f"{entry.source}: changed size while the initramfs was written")
            handle.write(_padding(written))
        handle.write(_header(TRAILER, 0, 0, 1, 0, 0, (0, 0)))
        handle.flush()

    def write_gzip(self, output: Path) -> None:
        """Write the archive gzip-compressed (every kernel can unpack gzip initramfs)."""
        with (
            output.open("wb") as raw,
            gzip.GzipFile(
                filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0
            ) as compressed,
        ):
            self.write(compressed)  # type: ignore[arg-type]


def _normalise(path: str) -> str:
    name = path.strip("/")
    if not name or ".." in name.split("/") or "//" in name or "\n" in name:
        raise BuildError(f"initramfs: {path!r} is not a valid path inside the archive")
    return name


def _header(
    name: str, inode: int, mode: int, nlink: int, mtime: int, size: int, rdev: tuple[int, int]
) -> bytes:
    encoded = name.encode() + b"\0"
    fields = (inode, mode, 0, 0, nlink, mtime, size, 0, 0, rdev[0], rdev[1], len(encoded), 0)
    header = MAGIC + b"".join(b"%08X" % value for value in fields) + encoded
    return header + _padding(len(header))


def _padding(length: int) -> bytes:
    return bytes(-length % 4)


def _content(entry: Entry) -> Iterator[bytes]:
    if entry.source is None:
        if entry.data:
            yield entry.data
        return
    with entry.source.open("rb") as handle:
        while block := handle.read(_COPY_BLOCK):
            yield block


@dataclass(frozen=True)
class CpioMember:
    """One member as read back from an archive (for tests and inspection)."""

    name: str
    inode: int
    mode: int
    uid: int
    gid: int
    mtime: int
    data: bytes
    rdev: tuple[int, int]


def read_newc(data: bytes) -> list[CpioMember]:
    """Parse an uncompressed newc archive up to its trailer; raise `BuildError` if malformed."""
    members: list[CpioMember] = []
    offset = 0
    while True:
        header = data[offset : offset + 110]
        if len(header) < 110 or header[:6] != MAGIC:
            raise BuildError(f"cpio: no newc header at byte offset {offset}")
        fields = [int(header[6 + 8 * index : 14 + 8 * index], 16) for index in range(13)]
        name_size, file_size = fields[11], fields[6]
        name_start = offset + 110
        name = data[name_start : name_start + name_size - 1].decode()
        data_start = name_start + name_size + _pad_count(110 + name_size)
        if name == TRAILER:
            return members
        content = data[data_start : data_start + file_size]
        if len(content) != file_size:
            raise BuildError(f"cpio: {name} is truncated at byte offset {data_start}")
        members.append(
            CpioMember(
                name,
                fields[0],
                fields[1],
                fields[2],
                fields[3],
                fields[5],
                content,
                (fields[9], fields[10]),
            )
        )
        offset = data_start + file_size + _pad_count(file_size)


def _pad_count(length: int) -> int:
    return -length % 4
