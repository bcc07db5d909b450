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
from avobuild.model.guids import resolve_attribute, resolve_mbr_type, resolve_type_guid
from avobuild.model.tomlcheck import Table, format_size, load_toml, parse_size


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
    type_guid: uuid.UUID | None  # GPT layouts
    grow: bool = False
    mbr_type: int | None = None  # MBR layouts
    offset: int | None = None  # fixed start in bytes; None: placed after the previous one
    unique_guid: uuid.UUID | None = None  # GPT: fixed unique partition GUID (key `uuid`)
    attributes: int = 0  # GPT attribute bits (`bootable` sets bit 2)
    bootable: bool = False
    file: Path | None = None  # contents of a raw partition


@dataclass(frozen=True)
class RawRegion:
    """Bytes written at a fixed offset outside every partition (a boot loader blob)."""

    name: str
    offset: int
    size: int  # bytes reserved: the file's size unless the layout gives more
    file: Path

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass(frozen=True)
class Layout:
    path: Path
    table: TableType
    sector_size: int
    alignment: int
    disk_size: int | None
    partitions: tuple[PartitionSpec, ...]
    raw_regions: tuple[RawRegion, ...] = ()
    # MBR: the primary slot (1-4) of the extended partition; partitions from that position
    # on are logical. None: slot 4 when there are more than four partitions.
    extended_partition: int | None = None
    disk_uuid: uuid.UUID | None = None  # GPT disk GUID; None: derived from the recipe seed
    disk_signature: int | None = None  # MBR disk signature; None: derived from the seed

    def by_role(self, role: Role) -> PartitionSpec | None:
        return next((part for part in self.partitions if part.role is role), None)

    def by_label(self, label: str) -> PartitionSpec | None:
        return next((part for part in self.partitions if part.label == label), None)


def load_layout(path: Path) -> Layout:
    """Read and validate a layout file."""
    root = load_toml(path)
    disk = root.table("disk", required=True)
    assert disk is not None
    table = disk.enum("table", TableType, default=TableType.GPT)
    sector_size = disk.integer("sector-size", default=512)
    if sector_size not in _SECTOR_SIZES:
        disk.fail("sector-size", "512 or 4096", sector_size)
    alignment = disk.size("alignment", default=1 << 20)
    if alignment % sector_size:
        disk.fail("alignment", f"a multiple of the sector size ({sector_size})", alignment)
    disk_size = disk.optional_size("size")
    if disk_size is not None and disk_size % sector_size:
        disk.fail("size", f"a multiple of the sector size ({sector_size})", format_size(disk_size))
    extended = None
    disk_uuid = None
    signature = None
    if table is TableType.MBR:
        if "extended-partition" in disk:
            extended = disk.integer("extended-partition", minimum=1)
            if extended > 4:
                disk.fail("extended-partition", "a primary slot number 1-4", extended)
        signature_text = disk.optional_string(
            "signature", what='a 32-bit hex number like "0x1234abcd"'
        )
        if signature_text is not None:
            if not _HEX32.fullmatch(signature_text):
                disk.fail("signature", 'a 32-bit hex number like "0x1234abcd"', signature_text)
            signature = int(signature_text, 16)
    else:
        disk_uuid = _optional_uuid(disk, "uuid")
    _refuse_other_table_keys(disk, table, {"extended-partition", "signature"}, {"uuid"})
    disk.check_unknown()

    partitions = tuple(
        _read_partition(label, entry, table, sector_size)
        for label, entry in root.subtables("partition")
    )
    raw_regions = tuple(_read_raw_region(name, entry) for name, entry in root.subtables("raw"))
    root.check_unknown()
    layout = Layout(
        path,
        table,
        sector_size,
        alignment,
        disk_size,
        partitions,
        raw_regions,
        extended,
        disk_uuid,
        signature,
    )
    _check_roles(layout)
    _check_identifiers(layout)
    return layout


_HEX32 = re.compile(r"0x[0-9a-fA-F]{1,8}")


def _refuse_other_table_keys(
    table: Table, kind: TableType, mbr_only: set[str], gpt_only: set[str]
) -> None:
    """Keys of the other table type are an error that says why, not an "unknown key"."""
    foreign = gpt_only if kind is TableType.MBR else mbr_only
    for key in sorted(foreign):
        if key in table:
            other = "gpt" if kind is TableType.MBR else "mbr"
            table.fail(
                key, f'no {key!r} in a {kind.value.upper()} layout (only with table = "{other}")'
            )


def _optional_uuid(table: Table, key: str) -> uuid.UUID | None:
    text = table.optional_string(key, what="a UUID string")
    if text is None:
        return None
    try:
        value = uuid.UUID(text)
    except ValueError:
        table.fail(key, 'a UUID like "0fc63daf-8483-4772-8e79-3d69d8477de4"', text)
    if value.int == 0:
        table.fail(key, "a non-nil UUID", text)
    return value


def _byte_offset(table: Table, key: str, sector_size: int | None = None) -> int | None:
    """An offset in bytes ("32K", 8192, "0"); a multiple of `sector_size` when given."""
    value = table.untyped(key)
    if value is None:
        return None
    offset: int | None = None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        offset = value
    elif isinstance(value, str):
        try:
            offset = parse_size(value)
        except ValueError:
            offset = None
    if offset is None:
        table.fail(key, 'a byte offset like "32K" (units K, M, G, T are powers of 1024)', value)
    if sector_size is not None and offset % sector_size:
        table.fail(key, f"a multiple of the sector size ({sector_size})", value)
    return offset


def _existing_file(table: Table, key: str, *, required: bool) -> Path | None:
    path = table.path_value(key, required=required)
    if path is not None and not path.is_file():
        table.fail(key, "an existing file (relative to the layout file)", str(path))
    return path


def _read_partition(label: str, table: Table, kind: TableType, sector_size: int) -> PartitionSpec:
    if not _LABEL.fullmatch(label):
        table.fail("(name)", "a partition label of a-z, 0-9, '-', '_' (at most 36)", label)
    role = table.enum("role", Role)
    filesystem = table.optional_enum("filesystem", FsType, absent=("raw",))
    source = _existing_file(table, "file", required=False)
    if source is not None:
        if filesystem is not None:
            table.fail(
                "file",
                f'no file with filesystem = "{filesystem.value}" (file fills a raw partition)',
                str(source),
            )
        if role in _SLOT_ROLES:
            table.fail(
                "file",
                f"no file in a {role.value} partition (updates write the slots)",
                str(source),
            )
    if "size" in table or source is None:
        size = table.size("size")
    else:
        assert source is not None
        size = -(-source.stat().st_size // sector_size) * sector_size or sector_size
    if size % sector_size:
        table.fail("size", f"a multiple of the sector size ({sector_size})", format_size(size))
    if source is not None and source.stat().st_size > size:
        table.fail(
            "file",
            f"a file that fits the {format_size(size)} partition",
            f"{source} ({source.stat().st_size} bytes)",
        )
    offset = _byte_offset(table, "offset", sector_size)
    grow = table.boolean("grow", default=False)
    bootable = table.boolean("bootable", default=False)
    _refuse_other_table_keys(table, kind, set(), {"uuid", "attributes"})
    type_guid = None
    mbr_type = None
    unique_guid = None
    attributes = 0
    if kind is TableType.GPT:
        type_name = table.string("type", default="linux-generic")
        try:
            type_guid = resolve_type_guid(type_name)
        except ValueError as error:
            raise RecipeError(f"{table.path}: [{table.name}] type: {error}") from None
        unique_guid = _optional_uuid(table, "uuid")
        attributes = _read_attributes(table) | (1 << 2 if bootable else 0)
    else:
        type_name = table.string("type", default="linux")
        try:
            mbr_type = resolve_mbr_type(type_name)
        except ValueError as error:
            raise RecipeError(f"{table.path}: [{table.name}] type: {error}") from None
    table.check_unknown()
    return PartitionSpec(
        label=label,
        role=role,
        size=size,
        filesystem=filesystem,
        type_name=type_name,
        type_guid=type_guid,
        grow=grow,
        mbr_type=mbr_type,
        offset=offset,
        unique_guid=unique_guid,
        attributes=attributes,
        bootable=bootable,
        file=source,
    )


def _read_attributes(table: Table) -> int:
    value = table.untyped("attributes")
    if value is None:
        return 0
    if not isinstance(value, list):
        table.fail("attributes", 'a list of names or bit numbers like ["read-only", 48]', value)
    bits = 0
    for index, item in enumerate(value):
        try:
            bits |= 1 << resolve_attribute(item)
        except ValueError as error:
            raise RecipeError(
                f"{table.path}: [{table.name}] attributes[{index}]: {error}"
            ) from None
    return bits


def _read_raw_region(name: str, table: Table) -> RawRegion:
    if not _LABEL.fullmatch(name):
        table.fail("(name)", "a region name of a-z, 0-9, '-', '_' (at most 36)", name)
    offset = _byte_offset(table, "offset")
    if offset is None:
        raise RecipeError(f"{table.path}: [{table.name}] offset: missing (this key is required)")
    source = _existing_file(table, "file", required=True)
    assert source is not None
    file_size = source.stat().st_size
    if file_size == 0:
        table.fail("file", "a file that is not empty", str(source))
    size = table.size("size", default=file_size)
    if file_size > size:
        table.fail(
            "file",
            f"a file that fits the region's size ({format_size(size)})",
            f"{source} ({file_size} bytes)",
        )
    table.check_unknown()
    return RawRegion(name, offset, size, source)


_SLOT_ROLES = frozenset(
    {
        Role.SYSTEM_A,
        Role.SYSTEM_B,
        Role.KERNEL_A,
        Role.KERNEL_B,
        Role.EXTENSIONS_A,
        Role.EXTENSIONS_B,
    }
)


def _check_identifiers(layout: Layout) -> None:
    guids: dict[uuid.UUID, str] = {}
    for part in layout.partitions:
        if part.unique_guid is not None:
            other = guids.setdefault(part.unique_guid, part.label)
            if other != part.label:
                raise RecipeError(
                    f"{layout.path}: [partition.{part.label}] uuid: {part.unique_guid} is also "
                    f"the uuid of [partition.{other}]; expected unique partition GUIDs"
                )
    for region in layout.raw_regions:
        if layout.by_label(region.name) is not None:
            raise RecipeError(
                f"{layout.path}: [raw.{region.name}]: a partition has the same name; "
                "expected distinct names"
            )


def _check_roles(layout: Layout) -> None:
    where = f"{layout.path}: [partition]"
    for role in Role:
        count = sum(1 for part in layout.partitions if part.role is role)
        if role is not Role.OTHER and count > 1:
            raise RecipeError(f"{where}: role {role.value!r} is used {count} times; expected once")
    # The boot partition is optional: boards whose boot loader reads the slots directly (or
    # keeps its environment in a raw region) have none.
    for required in (Role.SYSTEM_A, Role.SYSTEM_B):
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
