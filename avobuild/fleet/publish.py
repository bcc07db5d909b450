"""Writing the repository's files so that a reader never sees half of anything.

Every file is written to a temporary name in its own directory, flushed to disk, then renamed
over the old one (rename is atomic within a filesystem), and the directory is synced. A
publish writes the signed index and the catalog both to temporary files first and only then
renames them, catalog first, so a full disk or a crash before the renames leaves the old
index and catalog in place, and one after them leaves a catalog whose serial the index has
not used yet (the next publish simply takes the next number). Mutating commands hold an
exclusive lock on the repository for their whole duration.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from avobuild.fleet.errors import RepositoryError

LOCK_FILE = ".lock"


def describe_os_error(path: Path, error: OSError, doing: str) -> RepositoryError:
    if error.errno == errno.ENOSPC:
        return RepositoryError(
            f"{path}: cannot {doing}: no space left on the device; nothing was replaced "
            "(the repository still holds what it held before)"
        )
    return RepositoryError(f"{path}: cannot {doing}: {error.strerror or error}")


@contextmanager
def repository_lock(root: Path) -> Iterator[None]:
    """Hold the repository's exclusive lock (other avobuild commands wait for it)."""
    path = root / LOCK_FILE
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise describe_os_error(path, error, "open the repository lock") from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def temporary_name(path: Path) -> Path:
    return path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"


def write_temporary(path: Path, data: bytes) -> Path:
    """`data` in a flushed temporary file beside `path`; the caller renames or removes it."""
    temporary = temporary_name(path)
    try:
        with temporary.open("xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise describe_os_error(path, error, "write") from None
    return temporary


def sync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def replace_files(pairs: list[tuple[Path, Path]]) -> None:
    """Rename each (temporary, final) pair in order, then sync the directories."""
    for temporary, final in pairs:
        try:
            temporary.replace(final)
        except OSError as error:
            for leftover, _ in pairs:
                leftover.unlink(missing_ok=True)
            raise describe_os_error(final, error, "rename into place") from None
    for directory in dict.fromkeys(final.parent for _, final in pairs):
        sync_directory(directory)


def write_atomically(path: Path, data: bytes) -> None:
    replace_files([(write_temporary(path, data), path)])
