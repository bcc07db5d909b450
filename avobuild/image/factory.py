"""Factory disk images: slot filesystems built with the real tools, placed behind a GPT.

The build is a script of named steps: `stage_rootfs` gathers the recipe's tree, files, kernel
and extensions; `build_slot_images` turns them into the filesystem images a bundle carries;
`build_factory_image` formats every partition of the layout, writes the partition table and
copies the filesystems into place, sparse, followed by a `.bmap`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from avobuild.binaries.elf import check_binaries, check_kernel
from avobuild.boot.grubenv import render_grubenv
from avobuild.boot.state import BOOT_STATE_PATH, factory_state
from avobuild.device.boot import device_boot_enabled, install_esp_boot, install_slot_boot
from avobuild.disk.bmap import render_bmap
from avobuild.disk.gpt import GptPartition, derive_guid, write_gpt
from avobuild.disk.plan import DiskPlan, PlacedPartition, plan_layout
from avobuild.errors import BuildError
from avobuild.fs import build_filesystem, write_vfat_file
from avobuild.model.layout import FsType, PartitionSpec, Role
from avobuild.model.recipe import Recipe
from avobuild.model.tomlcheck import format_size

Progress = Callable[[str], None]
RELEASE_PATH = "usr/lib/avobuild/release"
_COPY_BLOCK = 1 << 20


@dataclass(frozen=True)
class FactoryImage:
    path: Path
    bmap: Path
    plan: DiskPlan


def _no_progress(_message: str) -> None:
    pass


def stage_rootfs(recipe: Recipe, workdir: Path, progress: Progress = _no_progress) -> Path:
    """Copy the rootfs tree and add the recipe's files, kernel, extensions and release file."""
    staging = workdir / "rootfs"
    if staging.exists():
        shutil.rmtree(staging)
    progress(f"staging rootfs from {recipe.rootfs_tree}")
    shutil.copytree(recipe.rootfs_tree, staging, symlinks=True)
    for directory in recipe.rootfs_directories:
        _inside(staging, "/" + directory).mkdir(parents=True, exist_ok=True)
    for entry in recipe.rootfs_files:
        target = _inside(staging, entry.dest)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(entry.source, target)
        target.chmod(entry.mode)
    if recipe.kernel is not None:
        check_kernel(recipe.kernel, recipe.architecture)
        target = _inside(staging, recipe.kernel_dest)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(recipe.kernel, target)
        target.chmod(0o644)
    for extension in recipe.extensions:
        progress(f"building extension {extension.name} ({extension.filesystem.value})")
        check_binaries([extension.tree], recipe.architecture)
        target = _inside(staging, extension.dest)
        target.parent.mkdir(parents=True, exist_ok=True)
        build_filesystem(
            extension.filesystem,
            extension.tree,
            target,
            None,
            label=extension.name[:16],
            seed=f"{recipe.seed}/extension/{extension.name}",
        )
        target.chmod(0o644)
    release = _inside(staging, "/" + RELEASE_PATH)
    release.parent.mkdir(parents=True, exist_ok=True)
    release.write_text(render_release(recipe))
    if device_boot_enabled(recipe):
        progress("adding the applier and the device initramfs (/boot/initrd.img)")
        install_slot_boot(recipe, staging)
    progress(f"checking binaries are built for {recipe.architecture.value}")
    check_binaries([staging], recipe.architecture)
    return staging


def render_release(recipe: Recipe) -> str:
    """The release file the applier and the boot marker read inside a slot."""
    return (
        f"AVOBUILD_NAME={recipe.name}\n"
        f"AVOBUILD_VERSION={recipe.version}\n"
        f"AVOBUILD_COMPATIBLE={recipe.compatible}\n"
    )


def _inside(root: Path, dest: str) -> Path:
    relative = dest.lstrip("/")
    if not relative or ".." in Path(relative).parts:
        raise BuildError(f"{dest}: not a path inside the rootfs")
    return root / relative


def build_slot_images(
    recipe: Recipe, workdir: Path, progress: Progress = _no_progress
) -> dict[str, Path]:
    """The images a full bundle carries, by bundle image name (today: the rootfs)."""
    workdir.mkdir(parents=True, exist_ok=True)
    staging = stage_rootfs(recipe, workdir, progress)
    system = recipe.layout.by_role(Role.SYSTEM_A)
    assert system is not None and system.filesystem is not None
    rootfs = workdir / "rootfs.img"
    progress(f"building rootfs ({system.filesystem.value}, {format_size(system.size)})")
    _build_partition_fs(recipe, system, staging, rootfs, label="rootfs")
    return {"rootfs": rootfs}


def _build_partition_fs(
    recipe: Recipe, spec: PartitionSpec, tree: Path | None, output: Path, *, label: str
) -> None:
    assert spec.filesystem is not None
    fixed_size = spec.filesystem in (FsType.EXT4, FsType.VFAT)
    if output.exists():
        output.unlink()
    build_filesystem(
        spec.filesystem,
        tree,
        output,
        spec.size if fixed_size else None,
        label=label,
        seed=f"{recipe.seed}/{label}",
    )
    if output.stat().st_size > spec.size:
        raise BuildError(
            f"{spec.label}: the {spec.filesystem.value} image is "
            f"{format_size(output.stat().st_size)}, larger than the "
            f"{format_size(spec.size)} partition"
        )


def build_factory_image(
    recipe: Recipe,
    output_dir: Path,
    workdir: Path,
    progress: Progress = _no_progress,
    *,
    recovery_image: Path | None = None,
) -> FactoryImage:
    """Build every partition and assemble the factory disk image with its `.bmap`.

    `recovery_image` (from `avobuild recovery build`) fills the recovery partition; without
    it that partition is formatted empty.
    """
    plan = plan_layout(recipe.layout)
    if recovery_image is not None and plan.by_role(Role.RECOVERY) is None:
        raise BuildError(f"{recipe.layout.path}: no partition has role 'recovery'")
    output_dir.mkdir(parents=True, exist_ok=True)
    slot_images = build_slot_images(recipe, workdir, progress)
    images: dict[str, Path] = {}
    for part in plan.partitions:
        spec = part.spec
        if spec.role is Role.SYSTEM_A:
            images[spec.label] = slot_images["rootfs"]
        elif spec.role is Role.RECOVERY and recovery_image is not None:
            images[spec.label] = recovery_image
        elif spec.filesystem is not None:
            tree = {Role.BOOT: recipe.boot_tree, Role.DATA: recipe.data_tree}.get(spec.role)
            target = workdir / f"{spec.label}.img"
            progress(f"formatting {spec.label} ({spec.filesystem.value})")
            _build_partition_fs(recipe, spec, tree, target, label=_fs_label(spec))
            images[spec.label] = target

    boot = plan.by_role(Role.BOOT)
    assert boot is not None
    if boot.spec.filesystem is FsType.VFAT:
        state = factory_state(recipe.version, recipe.compatible)
        write_vfat_file(
            images[boot.spec.label], 0, BOOT_STATE_PATH, render_grubenv(state.to_variables())
        )
        if device_boot_enabled(recipe):
            progress(f"installing GRUB and grub.cfg on {boot.spec.label}")
            install_esp_boot(recipe, images[boot.spec.label])
    else:
        raise BuildError(
            f"{recipe.layout.path}: [partition.{boot.spec.label}] filesystem: expected "
            '"vfat" (the boot state lives on a FAT boot partition)'
        )

    disk = output_dir / f"{recipe.name}-{recipe.version}.img"
    tmp = disk.with_name(disk.name + ".tmp")
    progress(f"assembling {disk.name} ({format_size(plan.disk_size)})")
    with tmp.open("wb") as handle:
        handle.truncate(plan.disk_size)
        write_partition_table(handle, plan, recipe.seed)
        for part in plan.partitions:
            if part.spec.label in images:
                progress(f"writing {part.spec.label} at offset {part.offset}")
                copy_into(images[part.spec.label], handle.fileno(), part)
    tmp.replace(disk)
    bmap = disk.with_suffix(".bmap")
    progress(f"writing {bmap.name}")
    bmap.write_bytes(render_bmap(disk))
    return FactoryImage(disk, bmap, plan)


def _fs_label(spec: PartitionSpec) -> str:
    if spec.filesystem is FsType.VFAT:
        return spec.label.upper().replace("-", "_")[:11]
    return spec.label[:16]


def write_partition_table(handle: BinaryIO, plan: DiskPlan, seed: str) -> None:
    """Write the GPT for `plan`; GUIDs derive from the recipe seed so builds are reproducible."""
    partitions = [
        GptPartition(
            name=part.spec.label,
            type_guid=part.spec.type_guid,
            unique_guid=derive_guid(seed, "partition", part.spec.label),
            first_lba=part.first_lba,
            last_lba=part.last_lba,
        )
        for part in plan.partitions
    ]
    write_gpt(
        handle,
        plan.disk_size,
        plan.layout.sector_size,
        partitions,
        derive_guid(seed, "disk"),
    )


def copy_into(source: Path, fd: int, part: PlacedPartition) -> None:
    """Copy a filesystem image into its partition, skipping holes and zero blocks."""
    size = source.stat().st_size
    if size > part.size:
        raise BuildError(
            f"{source}: {format_size(size)} does not fit partition {part.spec.label} "
            f"({format_size(part.size)})"
        )
    zero = bytes(_COPY_BLOCK)
    with source.open("rb") as src:
        position = 0
        while position < size:
            try:
                position = os.lseek(src.fileno(), position, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(src.fileno(), position, os.SEEK_HOLE)
            while position < hole:
                block = os.pread(src.fileno(), min(_COPY_BLOCK, hole - position), position)
                if block != zero[: len(block)]:
                    os.pwrite(fd, block, part.offset + position)
                position += len(block)
