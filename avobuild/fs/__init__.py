"""Reproducible filesystem images built from directory trees with the real tools.

`build_filesystem` is the entry point the image and bundle builders call; each format has its
module (`ext4`, `vfat`, `squashfs`, `erofs`) with a builder and readers that use the same
tools in reverse, for tests and for the installer.

Every builder gives bit-identical output for the same tree, seed and SOURCE_DATE_EPOCH:
identifiers derive from the seed, every timestamp is the build epoch, every entry is owned by
root (0:0), entries go in in sorted order, and host settings (mke2fs.conf, mtoolsrc, xattrs)
stay out. Modes and symlinks are kept; the image root takes the source directory's mode, so
stage trees in a 0755 directory. Nothing needs root: no mounts, no loop devices.
"""

from __future__ import annotations

from collections.abc import Callable
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
    source: Path | None,
    output: Path,
    size: int | None,
    *,
    label: str,
    seed: str,
    progress: Callable[[str], None] | None = None,
) -> None:
    """Build an `fstype` image of the tree `source` (None: empty) into the file `output`.

    ext4 and vfat are formatted to exactly `size` bytes; squashfs and erofs size themselves
    and, when `size` is given, must not come out larger. Raises `BuildError` when the tree
    does not fit or the label is invalid, `ToolFailed`/`ToolMissing` for tool problems.
    """
    validate_label(fstype, label)
    if size is None and fstype not in SELF_SIZING:
        raise BuildError(f"{output}: an {fstype} filesystem needs a size in bytes")
    if progress is not None:
        origin = f"from {source}" if source is not None else "(empty)"
        progress(f"building {fstype} filesystem {output.name} {origin}")
    if fstype is FsType.EXT4:
        assert size is not None
        build_ext4(source, output, size, label=label, seed=seed)
    elif fstype is FsType.VFAT:
        assert size is not None
        build_vfat(source, output, size, label=label, seed=seed)
    elif fstype is FsType.SQUASHFS:
        build_squashfs(source, output, seed=seed)
        check_image_fits(output, size, fstype)
    elif fstype is FsType.EROFS:
        build_erofs(source, output, seed=seed)
        check_image_fits(output, size, fstype)
    else:
        assert_never(fstype)
    if progress is not None:
        progress(f"built {output.name} ({output.stat().st_size} bytes)")
