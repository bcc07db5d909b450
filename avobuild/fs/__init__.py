"""Reproducible filesystem images built from directory trees with the real tools.

`build_filesystem` is the entry point the image and bundle builders call; each format has its
module (`ext4`, `vfat`, `squashfs`, `erofs`) with a builder and readers that use the same
tools in reverse, for tests and for the installer.

Every builder gives bit-identical output for the same tree, seed and SOURCE_DATE_EPOCH:
identifiers derive from the seed, every timestamp is the build epoch, entries go in in sorted
order, and host settings (mke2fs.conf, mtoolsrc) stay out. What a real root filesystem holds
is kept: modes with setuid/setgid/sticky, owners (or all 0:0 with `ownership = "root"`),
symlinks as links, hard links, device nodes, FIFOs, sockets, extended attributes, holes —
where the format can hold them. The image root takes the source directory's mode. A user's
tree is only ever read (lstat, readlink, regular files opened): see `fs.overlay` for how
avobuild's own additions get into an image, and `fs.archive` for tar archives.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import assert_never

from avobuild.errors import BuildError
from avobuild.fs.common import (
    EntryKind,
    FsEntry,
    check_image_fits,
    deterministic_uuid,
    scan_source_tree,
)
from avobuild.fs.erofs import build_erofs, list_erofs_tree, read_erofs_file
from avobuild.fs.ext4 import build_ext4, check_ext4_label, list_ext4_tree, read_ext4_file
from avobuild.fs.squashfs import build_squashfs, list_squashfs_tree, read_squashfs_file
from avobuild.fs.vfat import (
    build_vfat,
    check_vfat_label,
    list_vfat_tree,
    read_vfat_file,
    write_vfat_file,
)
from avobuild.model.layout import FsType
from avobuild.model.tree import TreeKind, TreeSource

__all__ = [
    "EntryKind",
    "FsEntry",
    "FsType",
    "build_filesystem",
    "deterministic_uuid",
    "list_erofs_tree",
    "list_ext4_tree",
    "list_squashfs_tree",
    "list_vfat_tree",
    "read_erofs_file",
    "read_ext4_file",
    "read_squashfs_file",
    "read_vfat_file",
    "scan_source_tree",
    "validate_label",
    "write_vfat_file",
]


# Read-only formats size themselves; writable ones are formatted to fill their partition.
SELF_SIZING = frozenset({FsType.SQUASHFS, FsType.EROFS})


def validate_label(fstype: FsType, label: str) -> None:
    """Raise `BuildError` unless `label` can be the volume label of an `fstype` filesystem.

    squashfs has no label and erofs-utils 1.5 cannot set one: any label is accepted for them
    and not stored.
    """
    if fstype is FsType.EXT4:
        check_ext4_label(label)
    elif fstype is FsType.VFAT:
        check_vfat_label(label)


def build_filesystem(
    fstype: FsType,
    source: TreeSource | Path | None,
    output: Path,
    size: int | None,
    *,
    label: str,
    seed: str,
    overlay: Path | None = None,
    known: Mapping[str, FsEntry] | None = None,
    progress: Callable[[str], None] | None = None,
) -> None:
    """Build an `fstype` image of `source` (None: empty) into the file `output`.

    `source` is a user's directory or archive (`TreeSource`), or a plain `Path`: a directory
    avobuild made itself, stored root-owned without extended attributes. `overlay` holds
    avobuild's additions, layered in with the format's own tools (see `fs.overlay`);
    `known` is a scan of a directory source the caller already made (it is not read again).

    ext4 and vfat are formatted to exactly `size` bytes; squashfs and erofs size themselves
    and, when `size` is given, must not come out larger. Raises `BuildError` when the tree
    does not fit or the label is invalid, `ToolFailed`/`ToolMissing` for tool problems.
    """
    validate_label(fstype, label)
    if size is None and fstype not in SELF_SIZING:
        raise BuildError(f"{output}: an {fstype} filesystem needs a size in bytes")
    tree = TreeSource.own_directory(source) if isinstance(source, Path) else source
    if progress is not None:
        origin = f"from {tree}" if tree is not None else "(empty)"
        progress(f"building {fstype} filesystem {output.name} {origin}")
    if fstype is FsType.EXT4:
        assert size is not None
        build_ext4(tree, output, size, label=label, seed=seed, overlay=overlay, known=known)
    elif fstype is FsType.VFAT:
        assert size is not None
        if overlay is not None:
            raise BuildError(f"{output}: FAT images take no additions")
        if tree is not None and tree.kind is not TreeKind.DIRECTORY:
            raise BuildError(f"{tree}: FAT images are built from directories, not archives")
        build_vfat(tree.path if tree is not None else None, output, size, label=label, seed=seed)
    elif fstype is FsType.SQUASHFS:
        build_squashfs(tree, output, seed=seed, overlay=overlay, known=known)
        check_image_fits(output, size, fstype)
    elif fstype is FsType.EROFS:
        build_erofs(tree, output, seed=seed, overlay=overlay, known=known)
        check_image_fits(output, size, fstype)
    else:
        assert_never(fstype)
    if progress is not None:
        progress(f"built {output.name} ({output.stat().st_size} bytes)")
