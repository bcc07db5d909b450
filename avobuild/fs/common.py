"""What the filesystem builders share: the tree model, derived identifiers, output files.

A source tree is read once into `FsEntry` values keyed by relative POSIX path, in sorted
order, and every builder and reader speaks that model. So a test (or the lead's image check)
can compare `list_ext4_tree(image)` with `scan_source_tree(tree)` directly.
"""

from __future__ import annotations

import enum
import hashlib
import os
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path

from avobuild.errors import BuildError
from avobuild.run import which


class EntryKind(enum.StrEnum):
    FILE = "file"
    DIRECTORY = "directory"
    SYMLINK = "symlink"


@dataclass(frozen=True)
class FsEntry:
    """One entry of a tree as a filesystem image stores it.

    `mode` holds the permission bits only (`stat.S_IMODE`), `size` is the byte length of a file
    or of a symlink's target and 0 for a directory, `uid`/`gid` are the stored owner.
    """

    kind: EntryKind
    mode: int
    size: int
    target: str | None = None
    uid: int = 0
    gid: int = 0


def entry_kind(st_mode: int) -> EntryKind | None:
    """The kind of an `st_mode`, or None for the kinds images do not hold (devices, fifos)."""
    if stat.S_ISREG(st_mode):
        return EntryKind.FILE
    if stat.S_ISDIR(st_mode):
        return EntryKind.DIRECTORY
    if stat.S_ISLNK(st_mode):
        return EntryKind.SYMLINK
    return None


def scan_source_tree(root: Path) -> dict[str, FsEntry]:
    """Every entry below `root` as avobuild stores it (owned by root), parents before children.

    Raises `BuildError` for anything but regular files, directories and symlinks: images
    built here never need device nodes, fifos or sockets, and a tool that copied them
    silently would hide a staging mistake.
    """
    if not root.is_dir():
        raise BuildError(f"{root}: not a directory (expected the tree to put in the image)")
    entries: dict[str, FsEntry] = {}
    _scan_directory(root, "", entries)
    return entries


def _scan_directory(directory: Path, prefix: str, entries: dict[str, FsEntry]) -> None:
    with os.scandir(directory) as listing:
        names = sorted(entry.name for entry in listing)
    for name in names:
        path = directory / name
        relative = f"{prefix}{name}"
        info = path.lstat()
        kind = entry_kind(info.st_mode)
        if kind is None:
            raise BuildError(
                f"{path}: is a device node, fifo or socket; filesystem images built by "
                "avobuild hold only regular files, directories and symlinks"
            )
        if kind is EntryKind.SYMLINK:
            # Not Path.readlink(): a Path would normalise the target ("dir/" -> "dir").
            target = os.readlink(path)  # noqa: PTH115
            entries[relative] = FsEntry(kind, 0o777, len(os.fsencode(target)), target)
        elif kind is EntryKind.DIRECTORY:
            entries[relative] = FsEntry(kind, stat.S_IMODE(info.st_mode), 0)
            _scan_directory(path, f"{relative}/", entries)
        else:
            entries[relative] = FsEntry(kind, stat.S_IMODE(info.st_mode), info.st_size)


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
