"""The slot's root filesystem: the user's tree or archive, plus avobuild's additions.

A build reads as a script of named steps: `read_tree` reads the user's input once (a
directory scan with lstat, or one pass over the archive) and checks its binaries against the
recipe's architecture; `collect_additions` writes everything avobuild adds (directories,
`[[rootfs.file]]` entries, the kernel, extensions, the release file, the applier and the
device boot files) into an overlay in the work directory; `build_rootfs_image` checks the
additions against the tree and hands both to the filesystem builder, which layers them in
with the format's own tools. The user's tree is never copied or written (docs/recipes.md,
"Root filesystem inputs").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from avobuild.binaries.elf import check_binaries, check_elf_heads, check_kernel
from avobuild.device.boot import device_boot_enabled, install_slot_boot
from avobuild.errors import BuildError
from avobuild.fs import build_filesystem
from avobuild.fs.archive import scan_archive
from avobuild.fs.common import EntryKind, FsEntry, read_file_head, scan_source_tree
from avobuild.fs.overlay import Overlay, check_overlay
from avobuild.model.layout import FsType, PartitionSpec, Role
from avobuild.model.recipe import Architecture, Recipe
from avobuild.model.tomlcheck import format_size
from avobuild.model.tree import TreeKind, TreeSource

Progress = Callable[[str], None]
RELEASE_PATH = "usr/lib/avobuild/release"


def no_progress(_message: str) -> None:
    pass


@dataclass(frozen=True)
class TreeView:
    """What a user's tree or archive holds, read once: entries by path relative to its root."""

    source: TreeSource
    entries: dict[str, FsEntry]

    @property
    def where(self) -> str:
        key = "archive" if self.source.kind is TreeKind.ARCHIVE else "tree"
        return f"{key} {self.source.path}"


def read_tree(source: TreeSource, architecture: Architecture) -> TreeView:
    """Scan `source` once, safely, and refuse binaries built for another architecture."""
    heads: list[tuple[str, bytes]] = []
    if source.kind is TreeKind.ARCHIVE:
        index = scan_archive(
            source.path, source.ownership, on_file=lambda path, head: heads.append((path, head))
        )
        entries = index.entries()
    else:
        entries = scan_source_tree(source.path, source.ownership)
        # Every regular file is opened once (safely): an unreadable one fails here, named.
        heads = [
            (path, read_file_head(source.path, path, 20))
            for path, entry in entries.items()
            if entry.kind is EntryKind.FILE
        ]
    check_elf_heads(heads, architecture, str(source.path))
    return TreeView(source, entries)


def render_release(recipe: Recipe) -> str:
    """The release file the applier and the boot marker read inside a slot."""
    return (
        f"AVOBUILD_NAME={recipe.name}\n"
        f"AVOBUILD_VERSION={recipe.version}\n"
        f"AVOBUILD_COMPATIBLE={recipe.compatible}\n"
    )


def collect_additions(
    recipe: Recipe, view: TreeView, overlay: Overlay, progress: Progress = no_progress
) -> None:
    """Write everything avobuild adds to the recipe's root filesystem into `overlay`."""
    for directory in recipe.rootfs_directories:
        if directory.strip("/") not in view.entries:
            overlay.add_directory(directory)
    for entry in recipe.rootfs_files:
        overlay.copy_file(entry.dest, entry.source, entry.mode)
    if recipe.kernel is not None:
        check_kernel(recipe.kernel, recipe.architecture)
        overlay.copy_file(recipe.kernel_dest, recipe.kernel, 0o644)
    for extension in recipe.extensions:
        progress(f"building extension {extension.name} ({extension.filesystem.value})")
        read_tree(extension.source, recipe.architecture)
        target = overlay.path(extension.dest)
        build_filesystem(
            extension.filesystem,
            extension.source,
            target,
            None,
            label=extension.name[:16],
            seed=f"{recipe.seed}/extension/{extension.name}",
        )
        target.chmod(0o644)
    overlay.add_file(RELEASE_PATH, render_release(recipe).encode())
    if device_boot_enabled(recipe):
        progress("adding the applier and the device initramfs (/boot/initrd.img)")
        install_slot_boot(recipe, overlay, view.entries)
    elif recipe.persist.enabled:
        raise BuildError(
            f"{recipe.path}: [persist] is set up by the slot initramfs, which [boot] method "
            f'= "{recipe.boot.method.value}" does not build (it needs "grub-efi" or "u-boot")'
        )


def build_rootfs_image(recipe: Recipe, workdir: Path, progress: Progress = no_progress) -> Path:
    """The root filesystem image of system slot A (a bundle's `rootfs` image)."""
    workdir.mkdir(parents=True, exist_ok=True)
    system = recipe.layout.by_role(Role.SYSTEM_A)
    assert system is not None and system.filesystem is not None
    progress(f"reading the rootfs {recipe.rootfs.kind.value} {recipe.rootfs.path}")
    view = read_tree(recipe.rootfs, recipe.architecture)
    overlay = Overlay(workdir / "additions")
    collect_additions(recipe, view, overlay, progress)
    progress(f"checking the additions are built for {recipe.architecture.value}")
    check_binaries([overlay.root], recipe.architecture)
    check_overlay(view.entries, overlay.entries(), f"[rootfs] {view.where}")
    rootfs = workdir / "rootfs.img"
    progress(f"building rootfs ({system.filesystem.value}, {format_size(system.size)})")
    build_partition_fs(
        recipe, system, recipe.rootfs, rootfs, label="rootfs", overlay=overlay.root, known=view
    )
    return rootfs


def build_slot_images(
    recipe: Recipe, workdir: Path, progress: Progress = no_progress
) -> dict[str, Path]:
    """The images a full bundle carries, by bundle image name (today: the rootfs)."""
    return {"rootfs": build_rootfs_image(recipe, workdir, progress)}


def build_partition_fs(
    recipe: Recipe,
    spec: PartitionSpec,
    tree: TreeSource | Path | None,
    output: Path,
    *,
    label: str,
    overlay: Path | None = None,
    known: TreeView | None = None,
) -> None:
    """Build the filesystem of one partition; a self-sizing image must fit the partition."""
    assert spec.filesystem is not None
    fixed_size = spec.filesystem in (FsType.EXT4, FsType.VFAT)
    output.unlink(missing_ok=True)
    build_filesystem(
        spec.filesystem,
        tree,
        output,
        spec.size if fixed_size else None,
        label=label,
        seed=f"{recipe.seed}/{label}",
        overlay=overlay,
        known=known.entries
        if known is not None and known.source.kind is TreeKind.DIRECTORY
        else None,
    )
    if output.stat().st_size > spec.size:
        size = output.stat().st_size
        output.unlink()
        raise BuildError(
            f"{spec.label}: the {spec.filesystem.value} image is {format_size(size)}, larger "
            f"than the {format_size(spec.size)} partition"
        )
