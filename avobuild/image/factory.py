"""Factory disk images: slot filesystems built with the real tools, behind a GPT or an MBR.

The build is a script of named steps: `build_slot_images` (image/rootfs.py) makes the
filesystem images a bundle carries; `build_factory_image` formats every other partition of
the layout, writes the partition table and copies the filesystems into place, sparse,
followed by a `.bmap`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from avobuild.device.boot import boot_state_on_boot_partition, install_boot_partition
from avobuild.disk.bmap import render_bmap
from avobuild.disk.image import assemble_disk
from avobuild.disk.plan import DiskPlan, plan_layout
from avobuild.disk.record import RECORD_PATH, render_disk_record
from avobuild.errors import BuildError
from avobuild.fs.vfat import write_vfat_file
from avobuild.image.rootfs import (
    Progress,
    build_partition_fs,
    build_slot_images,
    no_progress,
)
from avobuild.model.layout import FsType, PartitionSpec, Role
from avobuild.model.recipe import Recipe
from avobuild.model.tomlcheck import format_size


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
        elif spec.filesystem is not None:
            tree = {Role.BOOT: recipe.boot_tree, Role.DATA: recipe.data_tree}.get(spec.role)
            target = workdir / f"{spec.label}.img"
            progress(f"formatting {spec.label} ({spec.filesystem.value})")
            build_partition_fs(recipe, spec, tree, target, label=_fs_label(spec))
            images[spec.label] = target

    boot = plan.by_role(Role.BOOT)
    if boot is not None and boot.spec.filesystem is FsType.VFAT:
        progress(f"writing the boot state and the {recipe.boot.method.value} boot files")
        install_boot_partition(recipe, images[boot.spec.label])
        write_vfat_file(images[boot.spec.label], 0, RECORD_PATH, render_disk_record(plan))
    elif boot is not None:
        raise BuildError(
            f"{recipe.layout.path}: [partition.{boot.spec.label}] filesystem: expected "
            '"vfat" (the boot state lives on a FAT boot partition)'
        )
    elif boot_state_on_boot_partition(recipe):
        raise BuildError(
            f"{recipe.layout.path}: no partition has role 'boot'; expected one, because this "
            "recipe keeps its boot state on a FAT boot partition"
        )
    # else the state is U-Boot's own environment ([boot] uboot-env = "native")

    disk = output_dir / f"{recipe.name}-{recipe.version}.img"
    tmp = disk.with_name(disk.name + ".tmp")
    progress(f"assembling {disk.name} ({format_size(plan.disk_size)})")
    try:
        assemble_disk(tmp, plan, recipe.seed, images, progress)
        tmp.replace(disk)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no partial image behind
        raise
    bmap = disk.with_suffix(".bmap")
    progress(f"writing {bmap.name}")
    bmap.write_bytes(render_bmap(disk))
    return FactoryImage(disk, bmap, plan)


def _fs_label(spec: PartitionSpec) -> str:
    if spec.filesystem is FsType.VFAT:
        return spec.label.upper().replace("-", "_")[:11]
    return spec.label[:16]
