"""Disk layouts: partitions, their roles in the A/B scheme, sizes and type GUIDs.

A layout file (`layouts/*.toml`) is parsed once into a frozen `Layout`; `plan_layout` then
places it on a disk (aligned offsets in sectors), which is all the image builder, the installer
and later the applier renderer need to know about the disk.
"""

from __future__ import annotations

import enum
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

from avobuild.errors import RecipeError
from avobuild.model.guids import resolve_type_guid
from avobuild.model.tomlcheck import Table, format_size, load_toml


class FsType(enum.StrEnum):
    EXT4 = "ext4"
    VFAT = "vfat"
    SQUASHFS = "squashfs"
    EROFS = "erofs"


class TableType(enum.StrEnum):
    GPT = "gpt"
    MBR = "mbr"


class Role(enum.StrEnum):
    """What a partition is for. Slot roles come in A/B pairs named `<class>-a`/`<class>-b`."""

    BOOT = "boot"
    SYSTEM_A = "system-a"
    SYSTEM_B = "system-b"
    KERNEL_A = "kernel-a"
    KERNEL_B = "kernel-b"
    EXTENSIONS_A = "extensions-a"
    EXTENSIONS_B = "extensions-b"
    DATA = "data"
    RECOVERY = "recovery"
    OTHER = "other"


class Slot(enum.StrEnum):
    A = "A"
    B = "B"

    @property
    def other(self) -> Slot:
        return Slot.B if self is Slot.A else Slot.A


# Bundle image names and the slot class (partition role prefix) each one is written to.
IMAGE_SLOT_CLASS = {"rootfs": "system", "kernel": "kernel", "extensions": "extensions"}

_LABEL = re.compile(r"[a-z0-9][a-z0-9_-]{0,35}")
_SECTOR_SIZES = (512, 4096)


@dataclass(frozen=True)
class PartitionSpec:
    """One partition as the layout file declares it."""

    label: str
    role: Role
    size: int
    filesystem: FsType | None
    type_name: str
    type_guid: uuid.UUID
    grow: bool = False


@dataclass(frozen=True)
class Layout:
    path: Path
    table: TableType
    sector_size: int
    alignment: int
    disk_size: int | None
    partitions: tuple[PartitionSpec, ...]

    def by_role(self, role: Role) -> PartitionSpec | None:
        return next((part for part in self.partitions if part.role is role), None)

    def slot_partition(self, image_name: str, slot: Slot) -> PartitionSpec | None:
        """The partition that receives bundle image `image_name` when `slot` is updated."""
        slot_class = IMAGE_SLOT_CLASS.get(image_name)
        if slot_class is None:
            return None
        return self.by_role(Role(f"{slot_class}-{slot.value.lower()}"))


def load_layout(path: Path) -> Layout:
    """Read and validate a layout file."""
    root = load_toml(path)
    disk = root.table("disk", required=True)
    assert disk is not None
    table_name = disk.string("table", default="gpt")
    if table_name not in {t.value for t in TableType}:
        disk.fail("table", '"gpt" or "mbr"', table_name)
    table = TableType(table_name)
    if table is TableType.MBR:
        disk.fail("table", '"gpt" (MBR layouts are not supported yet)', table_name)
    sector_size = disk.integer("sector-size", default=512)
    if sector_size not in _SECTOR_SIZES:
        disk.fail("sector-size", "512 or 4096", sector_size)
    alignment = disk.size("alignment", default=1 << 20)
    if alignment % sector_size:
        disk.fail("alignment", f"a multiple of the sector size ({sector_size})", alignment)
    disk_size = disk.optional_size("size")
    disk.check_unknown()

    partitions = tuple(
        _read_partition(label, table, sector_size) for label, table in root.subtables("partition")
    )
    root.check_unknown()
    layout = Layout(path, table, sector_size, alignment, disk_size, partitions)
    _check_roles(layout)
    return layout


def _read_partition(label: str, table: Table, sector_size: int) -> PartitionSpec:
    if not _LABEL.fullmatch(label):
        table.fail("(name)", "a partition label of a-z, 0-9, '-', '_' (at most 36)", label)
    role_name = table.string("role")
    roles = ", ".join(role.value for role in Role)
    if role_name not in {role.value for role in Role}:
        table.fail("role", f"one of {roles}", role_name)
    size = table.size("size")
    if size % sector_size:
        table.fail("size", f"a multiple of the sector size ({sector_size})", format_size(size))
    fs_name = table.optional_string("filesystem")
    filesystem = None
    if fs_name is not None and fs_name != "raw":
        if fs_name not in {fs.value for fs in FsType}:
            choices = ", ".join([fs.value for fs in FsType] + ["raw"])
            table.fail("filesystem", f"one of {choices}", fs_name)
        filesystem = FsType(fs_name)
    type_name = table.string("type", default="linux-generic")
    try:
        type_guid = resolve_type_guid(type_name)
    except ValueError as error:
        raise RecipeError(f"{table.path}: [{table.name}] type: {error}") from None
    grow = table.boolean("grow", default=False)
    table.check_unknown()
    return PartitionSpec(label, Role(role_name), size, filesystem, type_name, type_guid, grow)


def _check_roles(layout: Layout) -> None:
    where = f"{layout.path}: [partition]"
    for role in Role:
        count = sum(1 for part in layout.partitions if part.role is role)
        if role is not Role.OTHER and count > 1:
            raise RecipeError(f"{where}: role {role.value!r} is used {count} times; expected once")
    for required in (Role.BOOT, Role.SYSTEM_A, Role.SYSTEM_B):
        if layout.by_role(required) is None:
            raise RecipeError(f"{where}: no partition has role {required.value!r}; one is required")
    for slot_class in ("system", "kernel", "extensions"):
        a = layout.by_role(Role(f"{slot_class}-a"))
        b = layout.by_role(Role(f"{slot_class}-b"))
        if (a is None) != (b is None):
            raise RecipeError(f"{where}: {slot_class}-a and {slot_class}-b must come as a pair")
        if a is not None and b is not None and a.size != b.size:
            raise RecipeError(
                f"{where}: {a.label} is {format_size(a.size)} but {b.label} is "
                f"{format_size(b.size)}; the two slots of a pair must have the same size"
            )
    growing = [part for part in layout.partitions if part.grow]
    if len(growing) > 1:
        raise RecipeError(f"{where}: only one partition may have grow = true")
    if growing and layout.disk_size is None:
        raise RecipeError(f"{layout.path}: [disk] size: required when a partition has grow = true")
