"""avobuild's own additions to a root filesystem, layered onto the user's tree in the image.

The applier, the release file, the kernel, extensions and `[[rootfs.file]]` entries are
written into an overlay directory of avobuild's work directory, never into the user's tree
or a copy of it. Each filesystem builder layers the overlay in with the format's own tools
(debugfs for ext4, pseudo definitions for squashfs, an overlay mount for erofs).

Before that, `check_overlay` compares the overlay with the user's tree (a scan of a
directory or the index of an archive): every parent of an addition must be a directory of
the tree or absent from it — a symlink or a file there is an error naming both paths, so no
addition can land behind a link — and an addition may replace a file or a symlink but never
a directory. `resolve_in_image` follows symlinks the way the device will, inside the image
(an absolute target starts at the image root), for additions that should go wherever the
tree's own layout puts them (shared libraries on a merged-/usr system).
"""

from __future__ import annotations

import posixpath
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

from avobuild.errors import BuildError
from avobuild.fs.common import EntryKind, FsEntry, scan_source_tree

# Names avobuild adds: they travel into debugfs commands and pseudo definitions unquoted.
SAFE_PATH = re.compile(r"[A-Za-z0-9._+@-]+(/[A-Za-z0-9._+@-]+)*")
_MAX_HOPS = 40


_SAFE_TARGET = re.compile(r"/?[A-Za-z0-9._+@-]+(/[A-Za-z0-9._+@-]+)*")


def check_safe_target(target: str) -> str:
    """A symlink target avobuild adds: plain names, '..' allowed (it is resolved in the image)."""
    if not _SAFE_TARGET.fullmatch(target):
        raise BuildError(f"{target}: avobuild's symlinks need plain targets")
    return target


def check_safe_path(path: str) -> str:
    """`path` relative to the image root, or BuildError when it is not a plain safe path."""
    relative = path.strip("/")
    if not SAFE_PATH.fullmatch(relative) or ".." in relative.split("/"):
        raise BuildError(
            f"{path}: avobuild's additions need plain paths of A-Z a-z 0-9 . _ + @ - without '..'"
        )
    return relative


class Overlay:
    """A directory in the work directory that collects additions for the image."""

    def __init__(self, root: Path) -> None:
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        root.chmod(0o755)
        self.root = root

    def path(self, dest: str) -> Path:
        """Where `dest` (an image path) lives in the overlay; parents are created 0755."""
        target = self.root / check_safe_path(dest)
        parent = target.parent
        if not parent.is_dir():
            parent.mkdir(parents=True)
            directory = parent
            while directory != self.root:
                directory.chmod(0o755)
                directory = directory.parent
        return target

    def add_directory(self, dest: str, mode: int = 0o755) -> None:
        target = self.path(dest)
        target.mkdir(exist_ok=True)
        target.chmod(mode)

    def add_file(self, dest: str, data: bytes, mode: int = 0o644) -> Path:
        target = self.path(dest)
        target.unlink(missing_ok=True)
        target.write_bytes(data)
        target.chmod(mode)
        return target

    def copy_file(self, dest: str, source: Path, mode: int) -> Path:
        """Copy a host file the recipe names (a regular file, read once) to `dest`."""
        if not source.is_file():
            raise BuildError(f"{source}: not a regular file")
        target = self.path(dest)
        target.unlink(missing_ok=True)
        shutil.copyfile(source, target)
        target.chmod(mode)
        return target

    def add_symlink(self, dest: str, target: str) -> None:
        link = self.path(dest)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)

    def entries(self) -> dict[str, FsEntry]:
        return scan_source_tree(self.root)


def check_overlay(
    tree: Mapping[str, FsEntry], additions: Mapping[str, FsEntry], where: str
) -> frozenset[str]:
    """Raise `BuildError` for an addition the tree cannot take; return the paths it replaces.

    `where` names the tree (the recipe's `[rootfs] tree` or `archive`) in messages.
    """
    replaced: set[str] = set()
    for path, addition in additions.items():
        existing = tree.get(path)
        if existing is not None and existing.kind is not EntryKind.DIRECTORY:
            inside = [other for other in additions if other.startswith(path + "/")]
            leaves = [other for other in inside if additions[other].kind is not EntryKind.DIRECTORY]
            below = next(iter(leaves or inside), None)
            if below is not None:
                raise _below_non_directory(below, path, existing, where)
            if addition.kind is EntryKind.DIRECTORY:
                raise BuildError(
                    f"/{path}: avobuild adds a directory here but it is a "
                    f"{existing.kind.value} in {where}"
                )
            replaced.add(path)
        elif existing is not None and addition.kind is not EntryKind.DIRECTORY:
            raise BuildError(
                f"/{path}: avobuild adds a {addition.kind.value} here but it is a directory "
                f"in {where}"
            )
        parent = posixpath.dirname(path)
        while parent:
            found = tree.get(parent)
            if found is not None and found.kind is not EntryKind.DIRECTORY:
                raise _below_non_directory(path, parent, found, where)
            parent = posixpath.dirname(parent)
    return frozenset(replaced)


def _below_non_directory(path: str, parent: str, found: FsEntry, where: str) -> BuildError:
    link = f" -> {found.target}" if found.kind is EntryKind.SYMLINK else ""
    return BuildError(
        f"/{path}: its parent /{parent} is a {found.kind.value}{link} in {where}, not a "
        "directory; avobuild never writes through a symlink or a file. Put the file where "
        f"/{parent} points, or make /{parent} a directory"
    )


def resolve_in_image(tree: Mapping[str, FsEntry], path: str) -> str:
    """`path` with every symlink of the tree followed inside the image, relative to its root.

    The result may not exist in the tree. A symlink loop or a link out of the image (more
    than 40 hops, or '..' above the root) is an error naming the path.
    """
    pending = [part for part in path.strip("/").split("/") if part not in ("", ".")]
    resolved: list[str] = []
    hops = 0
    while pending:
        part = pending.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = "/".join([*resolved, part])
        entry = tree.get(candidate)
        if entry is not None and entry.kind is EntryKind.SYMLINK:
            hops += 1
            if hops > _MAX_HOPS:
                raise BuildError(f"/{path}: too many levels of symlinks in the image")
            assert entry.target is not None
            target = [p for p in entry.target.split("/") if p not in ("", ".")]
            if entry.target.startswith("/"):
                resolved = []
            pending = target + pending
            continue
        resolved.append(part)
    return "/".join(resolved)
