"""Reproducible EROFS images built with mkfs.erofs, read back with fsck.erofs and dump.erofs.

mkfs.erofs sorts directory entries itself (the format binary-searches them) and lays out
inodes in that order; what it takes from the host is pinned: -T sets every inode's and the
superblock's time to SOURCE_DATE_EPOCH, -U a UUID derived from the seed; with
`ownership = "root"` --all-root makes every entry 0:0, and `xattrs = false` (and avobuild's
own trees) add -x -1. mkfs.erofs reads a directory with lstat: special files become inodes,
symlinks stay links, only regular files are opened. erofs-utils 1.5 reads neither tar
archives nor several directories: an archive is unpacked (`fs.archive`) and avobuild's
additions are layered on with a read-only overlay mount (`fs.mountview`). erofs-utils 1.5 lets
SOURCE_DATE_EPOCH in its environment override -T with clamping, which keeps every mtime
older than the epoch, so mkfs.erofs runs without the variable. Data is stored uncompressed:
erofs-utils 1.5 only offers lz4, and uncompressed images delta well. erofs-utils 1.5 has no
volume label option, so the label is not stored.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path

from avobuild.errors import BuildError
from avobuild.fs.archive import apply_archive_metadata, extract_archive
from avobuild.fs.common import (
    EntryKind,
    FsEntry,
    deterministic_uuid,
    scan_source_tree,
    without_source_date_epoch,
)
from avobuild.fs.mountview import namespace_prefix, view_command
from avobuild.fs.overlay import check_overlay
from avobuild.model.tree import Ownership, TreeKind, TreeSource
from avobuild.run import run, run_text, source_date_epoch

_OWNER = re.compile(r"^Uid: (\d+)\s+Gid: (\d+)", re.MULTILINE)


def build_erofs(
    source: TreeSource | None,
    output: Path,
    *,
    seed: str,
    overlay: Path | None = None,
    known: Mapping[str, FsEntry] | None = None,
) -> None:
    """Build a reproducible EROFS image of `source` (None: an empty one) in `output`.

    mkfs.erofs 1.5 reads one directory: an archive is unpacked into a temporary directory
    first, and avobuild's additions (`overlay`) are layered over the tree with a read-only
    overlay mount in a private mount namespace, so neither tree is changed or copied.
    """
    output.unlink(missing_ok=True)
    options: list[str | Path] = [
        "-T",
        str(source_date_epoch()),
        "-U",
        str(deterministic_uuid(seed, "erofs-uuid")),
        "--quiet",
    ]
    if source is None or source.ownership is Ownership.ROOT:
        options.append("--all-root")
    if source is None or not source.xattrs:
        options += ["-x", "-1"]
    with tempfile.TemporaryDirectory(prefix="avobuild-erofs-", dir=output.parent) as workdir:
        scratch = Path(workdir)
        try:
            if source is None:
                tree = scratch / "empty"
                tree.mkdir(mode=0o755)
                entries: dict[str, FsEntry] = {}
            elif source.kind is TreeKind.ARCHIVE:
                tree = scratch / "tree"
                tree.mkdir(mode=0o700)
                index = extract_archive(source.path, tree, ownership=source.ownership)
                apply_archive_metadata(source.path, index, tree, xattrs=source.xattrs)
                entries = index.entries()
            else:
                tree = source.path
                entries = (
                    dict(known) if known is not None else scan_source_tree(tree, source.ownership)
                )
            if overlay is not None and os.geteuid() != 0 and "--all-root" not in options:
                options += _unprivileged_owner(tree, entries)
            mkfs = [*without_source_date_epoch("mkfs.erofs"), *options, output]
            if overlay is None:
                run([*mkfs, tree], input_bytes=b"")
                return
            additions = scan_source_tree(overlay)
            check_overlay(entries, additions, str(source.path if source else tree))
            view = _view_layers(scratch, overlay, additions, tree)
            mountpoint = scratch / "view"
            mountpoint.mkdir()
            run([*namespace_prefix(), *view_command(mountpoint, [view, tree]), *mkfs, mountpoint])
        except BaseException:
            output.unlink(missing_ok=True)
            raise


def _unprivileged_owner(tree: Path, entries: dict[str, FsEntry]) -> list[str | Path]:
    """In a user namespace the caller's files show as root's: give their owner back.

    Without root a tree can only hold the caller's own files, which erofs keeps with
    --force-uid/--force-gid; a tree with several owners needs a build as root.
    """
    root = tree.stat()
    owners = {(entry.uid, entry.gid) for entry in entries.values()} | {(root.st_uid, root.st_gid)}
    if len(owners) > 1:
        raise BuildError(
            f"{tree}: entries with {len(owners)} different owners; an erofs image that keeps "
            'them needs a build as root (or ownership = "root")'
        )
    uid, gid = owners.pop()
    return [f"--force-uid={uid}", f"--force-gid={gid}"]


def _view_layers(scratch: Path, overlay: Path, additions: dict[str, FsEntry], tree: Path) -> Path:
    """A copy of the (small) overlay whose directories carry the tree's own attributes.

    In an overlay mount the upper layer's directory attributes win; directories the tree
    has keep its mode and owner by taking them over here.
    """
    layer = scratch / "additions"
    shutil.copytree(overlay, layer, symlinks=True)
    for path, entry in additions.items():
        if entry.kind is not EntryKind.DIRECTORY:
            continue
        try:
            info = (tree / path).lstat()
        except FileNotFoundError:
            continue
        (layer / path).chmod(stat.S_IMODE(info.st_mode))
        if os.geteuid() == 0:
            os.chown(layer / path, info.st_uid, info.st_gid)
    root = tree.stat()
    layer.chmod(stat.S_IMODE(root.st_mode))
    if os.geteuid() == 0:
        os.chown(layer, root.st_uid, root.st_gid)
    return layer


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
