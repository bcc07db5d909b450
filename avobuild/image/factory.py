"""Factory disk images: slot filesystems built with the real tools, placed behind their partition table (GPT or MBR).

The build is a script of named steps: `build_slot_images` (image/rootfs.py) makes the
filesystem images a bundle carries; `build_factory_image` formats every other partition of
the layout, writes the partition table and copies the filesystems into place, sparse,
followed by a `.bmap`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from avobuild.boot.grubenv import render_grubenv
from avobuild.boot.state import BOOT_STATE_PATH, factory_state
from avobuild.device.boot import device_boot_enabled, install_esp_boot
from avobuild.disk.bmap import render_bmap
from avobuild.disk.plan import DiskPlan, PlacedPartition, plan_layout
from avobuild.disk.table import write_partition_table, write_raw_regions
from avobuild.errors import BuildError
from avobuild.fs import write_vfat_file
from avobuild.image.rootfs import (
    Progress,
    build_partition_fs,
    build_slot_images,
    no_progress,
)
from avobuild.model.layout import FsType, PartitionSpec, Role
from avobuild.model.recipe import Recipe
from avobuild.model.tomlcheck import format_size

_COPY_BLOCK = 64 << 20


@dataclass(frozen=True)
class FactoryImage:
    path: Path
    bmap: Path
    plan: DiskPlan


def build_factory_image(
    recipe: Recipe,
    output_dir: Path,
    workdir: Path,
    progress: Progress = no_progress,
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
        elif spec.file is not None:
            images[spec.label] = spec.file
        elif spec.filesystem is not None:
            tree = {Role.BOOT: recipe.boot_tree, Role.DATA: recipe.data_tree}.get(spec.role)
            target = workdir / f"{spec.label}.img"
            progress(f"formatting {spec.label} ({spec.filesystem.value})")
            build_partition_fs(recipe, spec, tree, target, label=_fs_label(spec))
            images[spec.label] = target

    boot = plan.by_role(Role.BOOT)
    if boot is None:
        raise BuildError(
            f"{recipe.layout.path}: no partition has role 'boot'; expected one, because this "
            f"recipe keeps its boot state ({BOOT_STATE_PATH}) on a FAT boot partition"
        )
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
        for region in plan.layout.raw_regions:
            progress(f"writing raw region {region.name} at offset {region.offset}")
        write_raw_regions(handle.fileno(), plan)
    tmp.replace(disk)
    bmap = disk.with_suffix(".bmap")
    progress(f"writing {bmap.name}")
    bmap.write_bytes(render_bmap(disk))
    return FactoryImage(disk, bmap, plan)


def _fs_label(spec: PartitionSpec) -> str:
    if spec.filesystem is FsType.VFAT:
        return spec.label.upper().replace("-", "_")[:11]
    return spec.label[:16]


def copy_into(source: Path, fd: int, part: PlacedPartition) -> None:
    """Copy a filesystem image into its partition: its data extents, in the kernel
    (copy_file_range), so its holes stay holes of the disk image (and of the .bmap)."""
    size = source.stat().st_size
    if size > part.size:
        raise BuildError(
            f"{source}: {format_size(size)} does not fit partition {part.spec.label} "
            f"({format_size(part.size)})"
        )
    with source.open("rb") as src:
        position = 0
        while position < size:
            try:
                position = os.lseek(src.fileno(), position, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(src.fileno(), position, os.SEEK_HOLE)
            while position < hole:
                copied = os.copy_file_range(
                    src.fileno(),
                    fd,
                    min(_COPY_BLOCK, hole - position),
                    position,
                    part.offset + position,
                )
                if copied <= 0:
                    raise BuildError(f"{source}: short copy into the disk image at {position}")
                position += copied
