"""A disk that describes itself: which partition holds which role.

An MBR has no partition names, and a GPT's names are the layout's labels, which need not be
the role names. So every factory image carries a small record on its FAT boot partition,
`/avobuild/disk.toml` (TOML, docs/layouts.md "The disk record"): per partition its number,
label and role. `read_disk_roles` finds the partitions of each role on a disk image:

1. with a layout (`--layout`, for disks avobuild did not make): by the layout's labels;
2. else from the record, on the first FAT partition that has one;
3. else, on a GPT, by convention: the partition named after the role.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

import tomli_w

from avobuild.disk.plan import DiskPlan
from avobuild.disk.table import DiskPartition, PartitionTable, read_partition_table
from avobuild.errors import InstallError, ToolFailed
from avobuild.fs.vfat import read_vfat_file
from avobuild.model.layout import Layout, Role, TableType

RECORD_PATH = "/avobuild/disk.toml"
RECORD_FORMAT = 1
_RECORD_LIMIT = 64 * 1024


def render_disk_record(plan: DiskPlan) -> bytes:
    """The record of `plan`'s partitions, as TOML (same plan, same bytes)."""
    document = {
        "format": RECORD_FORMAT,
        "table": plan.layout.table.value,
        "partition": {
            part.spec.label: {"number": part.number, "role": part.spec.role.value}
            for part in plan.partitions
        },
    }
    header = "# avobuild disk record: the partition of each role (docs/layouts.md)\n"
    return header.encode() + tomli_w.dumps(document).encode()


@dataclass(frozen=True)
class DiskRoles:
    """The partitions of a disk image by role, and where that knowledge came from."""

    disk: Path
    table: PartitionTable
    roles: dict[Role, DiskPartition]
    source: str  # "layout PATH", "disk record", "partition names"

    def find(self, role: Role) -> DiskPartition | None:
        return self.roles.get(role)

    def require(self, role: Role) -> DiskPartition:
        found = self.roles.get(role)
        if found is None:
            known = ", ".join(part.label or str(part.number) for part in self.table.partitions)
            raise InstallError(
                f"{self.disk}: no partition has role {role.value!r} (found by {self.source}; "
                f"partitions: {known or 'none'}); pass --layout for a disk avobuild did not make"
            )
        return found


def read_disk_roles(disk: Path, layout: Layout | None = None) -> DiskRoles:
    """The partitions of each role on `disk` (see the module note for the order)."""
    with disk.open("rb") as handle:
        try:
            table = read_partition_table(
                handle, layout if layout is not None and layout.table is TableType.MBR else None
            )
        except InstallError as error:
            raise InstallError(f"{disk}: {error}") from None
    if layout is not None:
        roles: dict[Role, DiskPartition] = {}
        for spec in layout.partitions:
            found = table.find(spec.label)
            if found is not None:
                roles.setdefault(spec.role, found)
        return DiskRoles(disk, table, roles, f"layout {layout.path}")
    record = _find_record(disk, table)
    if record is not None:
        return DiskRoles(disk, table, record, "disk record")
    if table.table is TableType.MBR:
        raise InstallError(
            f"{disk}: an MBR disk without a disk record ({RECORD_PATH} on a FAT partition); "
            "pass --layout with the layout that built it"
        )
    roles = {}
    for role in Role:
        found = table.find(role.value)
        if found is not None:
            roles[role] = found
    return DiskRoles(disk, table, roles, "partition names")


def _is_fat(disk: Path, part: DiskPartition) -> bool:
    with disk.open("rb") as handle:
        handle.seek(part.offset)
        sector = handle.read(512)
    return sector[510:512] == b"\x55\xaa" and (sector[54:57] == b"FAT" or sector[82:85] == b"FAT")


def _find_record(disk: Path, table: PartitionTable) -> dict[Role, DiskPartition] | None:
    for part in table.partitions:
        if not _is_fat(disk, part):
            continue
        try:
            data = read_vfat_file(disk, part.offset, RECORD_PATH)
        except ToolFailed:
            continue
        return _parse_record(data, table, f"{disk}: partition {part.number}: {RECORD_PATH}")
    return None


def _parse_record(data: bytes, table: PartitionTable, where: str) -> dict[Role, DiskPartition]:
    """Read a record strictly: every entry a known role and a partition the table has."""
    if len(data) > _RECORD_LIMIT:
        raise InstallError(f"{where}: {len(data)} bytes, more than a record's {_RECORD_LIMIT}")
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise InstallError(f"{where}: not a TOML disk record: {error}") from None
    if document.get("format") != RECORD_FORMAT:
        raise InstallError(
            f"{where}: format: expected {RECORD_FORMAT}, got {document.get('format')!r}"
        )
    entries = document.get("partition")
    if not isinstance(entries, dict):
        raise InstallError(f"{where}: [partition.LABEL] tables: missing")
    by_number = {part.number: part for part in table.partitions}
    roles: dict[Role, DiskPartition] = {}
    for label, entry in entries.items():
        number = entry.get("number") if isinstance(entry, dict) else None
        role_name = entry.get("role") if isinstance(entry, dict) else None
        try:
            role = Role(str(role_name))
        except ValueError:
            raise InstallError(
                f"{where}: [partition.{label}] role: expected a role, got {role_name!r}"
            ) from None
        if not isinstance(number, int) or number not in by_number:
            raise InstallError(
                f"{where}: [partition.{label}] number: {number!r} is not a partition of the disk"
            )
        roles.setdefault(role, replace(by_number[number], label=label))
    return roles
