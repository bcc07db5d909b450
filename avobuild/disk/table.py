"""A planned layout written as its partition table, and partition tables read back by label.

One place decides what goes on the disk for a `DiskPlan`, whatever the table type:
`write_partition_table` (GPT or MBR with its EBRs, identifiers derived from the recipe seed
unless the layout fixes them), `write_raw_regions` (boot loader blobs at fixed offsets) and
`partition_uuid` (what Linux calls the partition's PARTUUID, for `root=PARTUUID=`).

`read_partition_table` is the reader the installer and the applier need: GPT partitions are
found by their names; MBR partitions have no names, so they are found by number, with the
labels of the layout that built the disk.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import BinaryIO

from avobuild.disk.gpt import GptPartition, derive_guid, read_gpt, write_gpt
from avobuild.disk.mbr import (
    GPT_PROTECTIVE,
    MbrPartition,
    MbrTable,
    derive_disk_signature,
    has_boot_signature,
    partuuid,
    read_mbr,
    write_mbr,
)
from avobuild.disk.plan import DiskPlan, PlacedPartition, plan_layout
from avobuild.errors import BuildError, InstallError, RecipeError
from avobuild.model.layout import Layout, TableType
from avobuild.model.tomlcheck import format_size

_COPY_BLOCK = 1 << 20


def disk_guid(plan: DiskPlan, seed: str) -> uuid.UUID:
    return plan.layout.disk_uuid or derive_guid(seed, "disk")


def disk_signature(plan: DiskPlan, seed: str) -> int:
    """The MBR disk signature (bytes 440-443): the layout's, or one derived from the seed."""
    if plan.layout.disk_signature is not None:
        return plan.layout.disk_signature
    return derive_disk_signature(seed)


def partition_guid(part: PlacedPartition, seed: str) -> uuid.UUID:
    """The GPT unique partition GUID: the layout's `uuid`, or one derived from the seed."""
    return part.spec.unique_guid or derive_guid(seed, "partition", part.spec.label)


def partition_uuid(plan: DiskPlan, part: PlacedPartition, seed: str) -> str:
    """The PARTUUID Linux reports for `part` (GPT: the unique GUID; MBR: `SSSSSSSS-NN`)."""
    if plan.layout.table is TableType.GPT:
        return str(partition_guid(part, seed))
    return partuuid(disk_signature(plan, seed), part.number)


def write_partition_table(handle: BinaryIO, plan: DiskPlan, seed: str) -> None:
    """Write the GPT or MBR (and EBRs) for `plan` into an image of `plan.disk_size` bytes.

    Identifiers derive from the recipe seed, so rebuilding gives the same bytes.
    """
    if plan.layout.table is TableType.GPT:
        partitions = [
            GptPartition(
                name=part.spec.label,
                type_guid=_gpt_type(part),
                unique_guid=partition_guid(part, seed),
                first_lba=part.first_lba,
                last_lba=part.last_lba,
                attributes=part.spec.attributes,
            )
            for part in plan.partitions
        ]
        write_gpt(
            handle, plan.disk_size, plan.layout.sector_size, partitions, disk_guid(plan, seed)
        )
        return
    table = MbrTable(
        disk_signature(plan, seed),
        plan.layout.sector_size,
        tuple(
            MbrPartition(
                number=part.number,
                type_id=_mbr_type(part),
                first_lba=part.first_lba,
                sectors=part.last_lba - part.first_lba + 1,
                bootable=part.spec.bootable,
                ebr_lba=part.ebr_lba,
            )
            for part in plan.partitions
        ),
        plan.extended,
    )
    write_mbr(handle, plan.disk_size, table)


def _gpt_type(part: PlacedPartition) -> uuid.UUID:
    assert part.spec.type_guid is not None, "a GPT layout has type GUIDs"
    return part.spec.type_guid


def _mbr_type(part: PlacedPartition) -> int:
    assert part.spec.mbr_type is not None, "an MBR layout has type bytes"
    return part.spec.mbr_type


def write_raw_regions(fd: int, plan: DiskPlan) -> None:
    """Copy every raw region's file to its offset (after the table: it may own boot code)."""
    for region in plan.layout.raw_regions:
        where = f"{plan.layout.path}: [raw.{region.name}] file: {region.file}"
        try:
            size = region.file.stat().st_size
        except OSError as error:
            raise BuildError(f"{where}: cannot be read: {error.strerror}") from None
        if size > region.size:
            # Checked when the layout was read; the file may have changed since.
            raise BuildError(
                f"{where}: is now {size} bytes, more than the region's {region.size} "
                f"at offset {region.offset}"
            )
        with region.file.open("rb") as source:
            position = 0
            while block := source.read(_COPY_BLOCK):
                os.pwrite(fd, block, region.offset + position)
                position += len(block)


# --- reading -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiskPartition:
    """A partition found on a disk, with the label that identifies it to avobuild."""

    number: int
    label: str | None  # GPT name; MBR: the layout's label for this number, else None
    offset: int
    size: int
    type_id: str  # GPT type GUID, or the MBR type byte as "0x83"


@dataclass(frozen=True)
class PartitionTable:
    table: TableType
    sector_size: int
    partitions: tuple[DiskPartition, ...]
    identifier: str  # GPT disk GUID or MBR disk signature ("0x1234abcd")

    def find(self, label: str) -> DiskPartition | None:
        return next((part for part in self.partitions if part.label == label), None)


def read_partition_table(
    f: BinaryIO, layout: Layout | None = None, sector_size: int = 512
) -> PartitionTable:
    """Read the GPT or MBR of `f`. MBR partitions get their labels from `layout`, whose plan
    must match the disk (each labelled partition at the offset the layout puts it)."""
    f.seek(0)
    sector = f.read(512)
    if not has_boot_signature(sector):
        raise InstallError("no partition table: no 55 AA boot signature at byte offset 510")
    records = [sector[446 + 16 * slot + 4] for slot in range(4)]
    if GPT_PROTECTIVE in records:
        gpt = read_gpt(f, sector_size)
        return PartitionTable(
            TableType.GPT,
            sector_size,
            tuple(
                DiskPartition(
                    number,
                    part.name,
                    gpt.offset(part),
                    gpt.size(part),
                    str(part.type_guid),
                )
                for number, part in enumerate(gpt.partitions, start=1)
            ),
            str(gpt.disk_guid),
        )
    mbr = read_mbr(f, sector_size)
    labels = _mbr_labels(mbr, layout)
    return PartitionTable(
        TableType.MBR,
        sector_size,
        tuple(
            DiskPartition(
                part.number,
                labels.get(part.number),
                mbr.offset(part),
                mbr.size(part),
                f"{part.type_id:#04x}",
            )
            for part in mbr.partitions
        ),
        f"{mbr.disk_signature:#010x}",
    )


def _mbr_labels(mbr: MbrTable, layout: Layout | None) -> dict[int, str]:
    if layout is None:
        return {}
    if layout.table is not TableType.MBR:
        raise InstallError(
            f"{layout.path}: a {layout.table.value.upper()} layout, the disk has an MBR"
        )
    try:
        plan = plan_layout(layout)
    except RecipeError as error:
        raise InstallError(str(error)) from None
    labels: dict[int, str] = {}
    for placed in plan.partitions:
        found = mbr.find(placed.number)
        if found is None or found.first_lba != placed.first_lba:
            where = "missing" if found is None else f"at byte offset {mbr.offset(found)}"
            raise InstallError(
                f"{layout.path}: [partition.{placed.spec.label}] is partition {placed.number} "
                f"at byte offset {placed.offset} ({format_size(placed.size)}); on the disk it "
                f"is {where}: this layout did not build the disk"
            )
        labels[placed.number] = placed.spec.label
    return labels
