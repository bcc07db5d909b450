"""What the filesystem builders share: the tree model, derived identifiers, output files.

A source tree is read once into `FsEntry` values keyed by relative POSIX path, in sorted
order, and every builder and reader speaks that model. So a test can compare
`list_ext4_tree(image)` with `scan_source_tree(tree)` directly.
"""

from __future__ import annotations

import enum
import hashlib
import os
import stat
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from avobuild.errors import BuildError
from avobuild.model.tree import Ownership
from avobuild.run import which


class EntryKind(enum.StrEnum):
    FILE = "file"
    DIRECTORY = "directory"
    SYMLINK = "symlink"
    CHAR_DEVICE = "char-device"
    BLOCK_DEVICE = "block-device"
    FIFO = "fifo"
    SOCKET = "socket"


# Kinds that hold no data: the image records them, nothing of the host is ever opened.
SPECIAL_KINDS = frozenset(
    {EntryKind.CHAR_DEVICE, EntryKind.BLOCK_DEVICE, EntryKind.FIFO, EntryKind.SOCKET}
)


@dataclass(frozen=True)
class FsEntry:
    """One entry of a tree as a filesystem image stores it.

    `mode` holds the permission bits with setuid, setgid and sticky (`stat.S_IMODE`), `size`
    is the byte length of a file or of a symlink's target and 0 otherwise, `uid`/`gid` are
    the stored owner, `device` the (major, minor) of a device node.
    """

    kind: EntryKind
    mode: int
    size: int
    target: str | None = None
    uid: int = 0
    gid: int = 0
    device: tuple[int, int] | None = None


_KIND_OF_TYPE = {
    stat.S_IFREG: EntryKind.FILE,
    stat.S_IFDIR: EntryKind.DIRECTORY,
    stat.S_IFLNK: EntryKind.SYMLINK,
    stat.S_IFCHR: EntryKind.CHAR_DEVICE,
    stat.S_IFBLK: EntryKind.BLOCK_DEVICE,
    stat.S_IFIFO: EntryKind.FIFO,
    stat.S_IFSOCK: EntryKind.SOCKET,
}


# The file type bits of st_mode for each kind (what debugfs `sif mode` and mknod take).
TYPE_BITS = {kind: bits for bits, kind in _KIND_OF_TYPE.items()}


def entry_kind(st_mode: int) -> EntryKind | None:
    """The kind of an `st_mode`, or None for a type no filesystem here stores."""
    return _KIND_OF_TYPE.get(stat.S_IFMT(st_mode))


def scan_source_tree(root: Path, ownership: Ownership = Ownership.ROOT) -> dict[str, FsEntry]:
    """Every entry below `root` as an image built from it stores it, parents before children.

    Only `lstat` and `readlink` touch the tree: no symlink is followed and no device node,
    FIFO or socket is opened. With `Ownership.ROOT` every entry is reported as 0:0 (what the
    builders store for such a tree); with `PRESERVE` the tree's own owners.
    """
    if root.is_symlink() or not root.is_dir():
        raise BuildError(f"{root}: not a directory (expected the tree to put in the image)")
    entries: dict[str, FsEntry] = {}
    _scan_directory(root, "", entries, ownership is Ownership.PRESERVE)
    return entries


def _scan_directory(
    directory: Path, prefix: str, entries: dict[str, FsEntry], owners: bool
) -> None:
    try:
        with os.scandir(directory) as listing:
            found = sorted((entry.name, entry.stat(follow_symlinks=False)) for entry in listing)
    except OSError as error:
        raise BuildError(f"{directory}: cannot read the directory: {error.strerror}") from None
    for name, info in found:
        path = directory / name
        relative = f"{prefix}{name}"
        kind = entry_kind(info.st_mode)
        if kind is None:
            raise BuildError(f"{path}: unknown file type {stat.S_IFMT(info.st_mode):o}")
        uid, gid = (info.st_uid, info.st_gid) if owners else (0, 0)
        mode = stat.S_IMODE(info.st_mode)
        if kind is EntryKind.SYMLINK:
            # Not Path.readlink(): a Path would normalise the target ("dir/" -> "dir").
            target = os.readlink(path)  # noqa: PTH115
            entries[relative] = FsEntry(kind, 0o777, len(os.fsencode(target)), target, uid, gid)
        elif kind is EntryKind.DIRECTORY:
            entries[relative] = FsEntry(kind, mode, 0, None, uid, gid)
            _scan_directory(path, f"{relative}/", entries, owners)
        elif kind is EntryKind.FILE:
            entries[relative] = FsEntry(kind, mode, info.st_size, None, uid, gid)
        else:
            device = None
            if kind in (EntryKind.CHAR_DEVICE, EntryKind.BLOCK_DEVICE):
                device = (os.major(info.st_rdev), os.minor(info.st_rdev))
            entries[relative] = FsEntry(kind, mode, 0, None, uid, gid, device)


def read_file_head(root: Path, relative: str, size: int = 64) -> bytes:
    """The first `size` bytes of the regular file `relative` below `root`, read safely.

    The file is opened without following a symlink and without blocking, and checked to be
    a regular file after opening, so a tree that changed since it was scanned cannot make
    avobuild read a device node, a FIFO or a file outside the tree through its last name.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    path = root / relative
    try:
        fd = os.open(path, flags)
    except OSError as error:
        raise BuildError(f"{path}: cannot read: {error.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BuildError(f"{path}: changed while the build read it (not a regular file)")
        return os.read(fd, size)
    finally:
        os.close(fd)


def tree_bytes(entries: dict[str, FsEntry]) -> int:
    """Bytes of file content in a tree: the figure a "does not fit" message reports."""
    return sum(entry.size for entry in entries.values() if entry.kind is EntryKind.FILE)


def deterministic_uuid(seed: str, purpose: str) -> uuid.UUID:
    """A UUID derived from `seed` and `purpose` (SHA-256), stable across builds and hosts.

    Marked as an RFC 9562 version 8 ("custom") UUID: it is neither random nor time-based.
    """
    digest = bytearray(hashlib.sha256(f"avobuild\0{purpose}\0{seed}".encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x80
    digest[8] = (digest[8] & 0x3F) | 0x80
    return uuid.UUID(bytes=bytes(digest))


def create_sparse_file(path: Path, size: int) -> None:
    """Replace `path` with a sparse file of `size` zero bytes for a builder to format."""
    if size <= 0:
        raise BuildError(
            f"{path}: a filesystem size must be a positive number of bytes, got {size}"
        )
    with path.open("wb") as handle:
        handle.truncate(size)


def check_image_fits(output: Path, size: int | None, what: str) -> None:
    """Raise `BuildError` when a self-sizing image came out larger than its budget."""
    actual = output.stat().st_size
    if size is not None and actual > size:
        raise BuildError(f"{output}: the {what} image is {actual} bytes, larger than {size} bytes")


def without_source_date_epoch(tool: str) -> list[str]:
    """The argv prefix that runs `tool` with SOURCE_DATE_EPOCH removed from its environment.

    mksquashfs and mkfs.erofs read the variable themselves and let it override their fixed
    timestamp options (mkfs.erofs then keeps every mtime older than the epoch; mksquashfs
    refuses to run). The builders pass the epoch as an option instead.
    """
    return ["env", "-u", "SOURCE_DATE_EPOCH", which(tool)]


@dataclass(frozen=True)
class FileBlocks:
    """Where a regular file's bytes are: `size` bytes, in `extents` of (logical block,
    physical block, block count) sorted by logical block; blocks in no extent (holes,
    unwritten extents, an erofs file's inline tail) are not at a block of their own."""

    size: int
    extents: tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class FileMap:
    """Every regular file of a filesystem image and its blocks (for file-aware deltas):
    `fs.ext4.ext4_file_map`, `fs.erofs_map.erofs_file_map`."""

    block_size: int
    files: Mapping[str, FileBlocks]
