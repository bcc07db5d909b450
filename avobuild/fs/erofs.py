"""Reproducible EROFS images built with mkfs.erofs, read back with fsck.erofs and dump.erofs.

mkfs.erofs sorts directory entries itself (the format binary-searches them) and lays out
inodes in that order; what it takes from the host is pinned: -T sets every inode's and the
superblock's time to SOURCE_DATE_EPOCH, -U a UUID derived from the seed, --all-root makes
every entry 0:0 and -x -1 keeps host xattrs (SELinux labels) out. erofs-utils 1.5 lets
SOURCE_DATE_EPOCH in its environment override -T with clamping, which keeps every mtime
older than the epoch, so mkfs.erofs runs without the variable. Data is stored uncompressed:
erofs-utils 1.5 only offers lz4, and uncompressed images delta well. erofs-utils 1.5 has no
volume label option, so the label is not stored.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from avobuild.errors import BuildError
from avobuild.fs.common import (
    FsEntry,
    deterministic_uuid,
    scan_source_tree,
    without_source_date_epoch,
)
from avobuild.run import run, run_text, source_date_epoch

_OWNER = re.compile(r"^Uid: (\d+)\s+Gid: (\d+)", re.MULTILINE)


def build_erofs(source: Path | None, output: Path, *, seed: str) -> None:
    """Build a reproducible EROFS image of `source` (None: an empty one) in `output`."""
    if source is not None:
        scan_source_tree(source)
    output.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="avobuild-erofs-") as workdir:
        if source is None:
            source = Path(workdir)
            source.chmod(0o755)
        run(
            [
                *without_source_date_epoch("mkfs.erofs"),
                "-T",
                str(source_date_epoch()),
                "-U",
                str(deterministic_uuid(seed, "erofs-uuid")),
                "--all-root",
                "-x",
                "-1",
                "--quiet",
                output,
                source,
            ],
            input_bytes=b"",
        )


def extract_erofs(image: Path, destination: Path) -> None:
    """Unpack the EROFS `image` into `destination` (which must not exist), keeping modes."""
    run(
        [
            "fsck.erofs",
            f"--extract={destination}",
            "--preserve-perms",
            "--no-preserve-owner",
            image,
        ]
    )


def list_erofs_tree(image: Path) -> dict[str, FsEntry]:
    """Every entry of the EROFS `image` except its root, sorted by path.

    Structure, modes and symlink targets come from one extraction; owners from dump.erofs,
    one call per entry, since an unprivileged extraction cannot keep them.
    """
    with tempfile.TemporaryDirectory(prefix="avobuild-erofs-") as workdir:
        tree = Path(workdir) / "tree"
        extract_erofs(image, tree)
        entries = scan_source_tree(tree)
    listed: dict[str, FsEntry] = {}
    for path, entry in entries.items():
        report = run_text(["dump.erofs", f"--path=/{path}", image])
        owner = _OWNER.search(report)
        if owner is None:
            raise BuildError(f"{image}: dump.erofs printed no owner for /{path}")
        uid, gid = int(owner.group(1)), int(owner.group(2))
        listed[path] = FsEntry(entry.kind, entry.mode, entry.size, entry.target, uid, gid)
    return listed


def read_erofs_file(image: Path, path: str) -> bytes:
    """The content of the regular file `path` in the EROFS `image` (extracts the image)."""
    with tempfile.TemporaryDirectory(prefix="avobuild-erofs-") as workdir:
        tree = Path(workdir) / "tree"
        extract_erofs(image, tree)
        wanted = tree / path.strip("/")
        if not wanted.is_file() or wanted.is_symlink():
            raise BuildError(f"{image}: /{path.strip('/')} is not a regular file in the image")
        return wanted.read_bytes()
