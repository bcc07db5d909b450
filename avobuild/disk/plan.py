"""Placing a layout on a disk: partition offsets in sectors, EBRs, the disk's size, and the
checks that nothing written to the disk overlaps anything else.

`plan_layout` is all the image builder, the installer and the applier renderer need to know
about where partitions sit; the layout itself (`avobuild.model.layout`) only declares them.

Placement follows genimage, so a layout ported from a genimage configuration lands on the same
sectors: a partition without `offset` starts at the first multiple of the alignment after the
end of every partition before it; a logical partition (MBR) starts one alignment unit after its
EBR, which sits on that multiple. A fixed `offset` is used as given; the EBR of a logical
partition at a fixed offset goes on the last alignment boundary before it (or in the sector
just before it when the gap is smaller). The disk, when the layout gives no size, ends at the
next multiple of the alignment after the last partition (plus the backup GPT) or raw region.

`slot_role` is the one answer to "which partition does bundle image X go to when slot S is
updated", shared by full and delta installs and the applier renderer.
"""

from __future__ import annotations

from dataclasses import dataclass

from avobuild.disk.gpt import first_usable_lba, last_usable_lba
from avobuild.disk.mbr import ExtendedPartition
from avobuild.errors import RecipeError
from avobuild.model.layout import (
    IMAGE_SLOT_CLASS,
    Layout,
    PartitionSpec,
    RawRegion,
    Role,
    Slot,
    TableType,
)
from avobuild.model.tomlcheck import format_size

_MBR_LBA_LIMIT = 1 << 32


@dataclass(frozen=True)
class PlacedPartition:
    """A partition with its place on the disk. `last_lba` is inclusive, as in GPT."""

    spec: PartitionSpec
    number: int  # GPT entry number; MBR: 1-4 primary, 5 and up logical
    first_lba: int
    last_lba: int
    sector_size: int
    ebr_lba: int | None = None  # MBR logical partitions: the sector of their EBR

    @property
    def offset(self) -> int:
        return self.first_lba * self.sector_size

    @property
    def size(self) -> int:
        return (self.last_lba - self.first_lba + 1) * self.sector_size

    @property
    def end(self) -> int:
        return (self.last_lba + 1) * self.sector_size


@dataclass(frozen=True)
class DiskPlan:
    layout: Layout
    disk_size: int
    partitions: tuple[PlacedPartition, ...]
    extended: ExtendedPartition | None = None  # MBR with logical partitions

    def by_role(self, role: Role) -> PlacedPartition | None:
        return next((part for part in self.partitions if part.spec.role is role), None)

    def by_label(self, label: str) -> PlacedPartition | None:
        return next((part for part in self.partitions if part.spec.label == label), None)

    def table_areas(self) -> list[tuple[int, int, str]]:
        """Byte ranges [start, end) the partition table owns, with what they hold.

        Bytes 0-439 are boot code on both table types, free for a raw region.
        """
        sector = self.layout.sector_size
        if self.layout.table is TableType.GPT:
            backup = (last_usable_lba(self.disk_size, sector) + 1) * sector
            return [
                (440, first_usable_lba(sector) * sector, "the GPT (MBR records, header, entries)"),
                (backup, self.disk_size, "the backup GPT"),
            ]
        areas = [(440, 512, "the MBR partition records")]
        for part in self.partitions:
            if part.ebr_lba is not None:
                start = part.ebr_lba * sector
                areas.append((start, start + sector, f"the EBR of partition {part.number}"))
        return areas

    def slot_partition(self, image: str, slot: Slot) -> PlacedPartition | None:
        """The partition that receives bundle image `image` when `slot` is updated."""
        role = slot_role(image, slot)
        return None if role is None else self.by_role(role)


def slot_role(image: str, slot: Slot) -> Role | None:
    """The role of the partition that receives bundle image `image` in `slot`, or None for an
    image name no slot takes (IMAGE_SLOT_CLASS: rootfs -> system-a/b, kernel -> kernel-a/b,
    extensions -> extensions-a/b)."""
    slot_class = IMAGE_SLOT_CLASS.get(image)
    return None if slot_class is None else Role(f"{slot_class}-{slot.value.lower()}")


def _align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def _where(layout: Layout, table: str, key: str | None = None) -> str:
    return f"{layout.path}: [{table}]" + (f" {key}" if key else "")


def _span(start: int, end: int) -> str:
    """A byte range for messages: "1M..3M" (end exclusive), exact."""
    return f"{format_size(start) if start else '0'}..{format_size(end)}"


def plan_layout(layout: Layout) -> DiskPlan:
    """Place every partition on the disk; size the disk to fit; check for overlaps."""
    sector = layout.sector_size
    gpt = layout.table is TableType.GPT
    first_free = first_usable_lba(sector) if gpt else 1
    backup_sectors = first_usable_lba(sector) - 1 if gpt else 0
    logical_from = _first_logical_index(layout)

    placed = _place(layout, first_free, logical_from, grow_extra=0)
    end = max((part.last_lba + 1 for part in placed), default=first_free)
    raw_end = max((-(-region.end // sector) for region in layout.raw_regions), default=0)
    align = layout.alignment // sector
    if layout.disk_size is None:
        disk_size = _align_up(max(end + backup_sectors, raw_end), align) * sector
    else:
        disk_size = layout.disk_size
    disk_sectors = disk_size // sector
    last_usable = last_usable_lba(disk_size, sector) if gpt else disk_sectors - 1
    if any(part.grow for part in layout.partitions):
        grow_extra = max(0, (last_usable + 1 - end) // align * align)
        placed = _place(layout, first_free, logical_from, grow_extra=grow_extra)
        end = max(part.last_lba + 1 for part in placed)
    if end - 1 > last_usable:
        needed = format_size(_align_up((end + backup_sectors) * sector, layout.alignment))
        raise RecipeError(
            f"{layout.path}: [disk] size: the partitions need at least {needed}, "
            f"got {format_size(disk_size)}"
        )
    extended = None
    logicals = [part for part in placed if part.ebr_lba is not None]
    if logicals:
        assert logical_from is not None and logicals[0].ebr_lba is not None
        extended = ExtendedPartition(
            logical_from + 1,
            logicals[0].ebr_lba,
            logicals[-1].last_lba - logicals[0].ebr_lba + 1,
        )
    plan = DiskPlan(layout, disk_size, tuple(placed), extended)
    _check_partitions(plan, first_free)
    _check_raw_regions(plan)
    return plan


def _first_logical_index(layout: Layout) -> int | None:
    """MBR: the index of the first logical partition, or None when all are primary."""
    if layout.table is TableType.GPT:
        return None
    count = len(layout.partitions)
    slot = layout.extended_partition
    if slot is None:
        return 3 if count > 4 else None
    if slot - 1 >= count:
        raise RecipeError(
            f"{_where(layout, 'disk', 'extended-partition')}: slot {slot} leaves no partition "
            f"to be logical (the layout has {count}); expected a slot of at most {count}"
        )
    return slot - 1


def _place(
    layout: Layout, first_free: int, logical_from: int | None, grow_extra: int
) -> list[PlacedPartition]:
    sector = layout.sector_size
    align = layout.alignment // sector
    cursor = first_free  # first sector after everything placed so far
    grown: PartitionSpec | None = None
    placed: list[PlacedPartition] = []
    for index, spec in enumerate(layout.partitions):
        logical = logical_from is not None and index >= logical_from
        number = 5 + index - logical_from if logical and logical_from is not None else index + 1
        sectors = spec.size // sector + (grow_extra if spec.grow else 0)
        if spec.offset is None:
            start = _align_up(cursor, align) + (align if logical else 0)
        elif grown is not None:
            raise RecipeError(
                f"{_where(layout, f'partition.{spec.label}', 'offset')}: a fixed offset cannot "
                f"follow [partition.{grown.label}], whose size depends on the disk (grow = true)"
            )
        else:
            start = spec.offset // sector
        if logical and spec.bootable:
            raise RecipeError(
                f"{_where(layout, f'partition.{spec.label}', 'bootable')}: logical partition "
                f"{number} lies in the extended partition, and firmware reads the bootable "
                "flag of primary partitions only; expected it on one of the first "
                f"{logical_from} partitions (or a larger [disk] extended-partition)"
            )
        ebr = _ebr_sector(layout, spec, number, start, cursor) if logical else None
        placed.append(PlacedPartition(spec, number, start, start + sectors - 1, sector, ebr))
        cursor = max(cursor, start + sectors)
        if spec.grow:
            grown = spec
    return placed


def _ebr_sector(layout: Layout, spec: PartitionSpec, number: int, start: int, cursor: int) -> int:
    """Where the EBR of a logical partition starting at `start` goes, after `cursor`."""
    sector = layout.sector_size
    align = layout.alignment // sector
    boundary = (start - 1) // align * align
    if boundary >= cursor:
        return boundary
    if start - 1 >= cursor:
        return start - 1
    key = "offset" if spec.offset is not None else None
    aligned = (_align_up(cursor, align) + align) * sector
    raise RecipeError(
        f"{_where(layout, f'partition.{spec.label}', key)}: logical partition {number} starts "
        f"at {format_size(start * sector)}, but its EBR needs one sector after the end of the "
        f"partitions before it ({format_size(cursor * sector)}); expected an offset of at least "
        f"{format_size((cursor + 1) * sector)} ({format_size(aligned)} keeps the "
        f"{format_size(layout.alignment)} alignment), or fewer than five partitions"
    )


def _check_partitions(plan: DiskPlan, first_free: int) -> None:
    layout = plan.layout
    sector = layout.sector_size
    gpt = layout.table is TableType.GPT
    what = "the GPT (protective MBR, header and entries)" if gpt else "the MBR (sector 0)"
    for part in plan.partitions:
        label = part.spec.label
        if part.first_lba < first_free:
            raise RecipeError(
                f"{_where(layout, f'partition.{label}', 'offset')}: {format_size(part.offset)} "
                f"is inside {what}, which ends at {format_size(first_free * sector)}; expected "
                f"an offset of at least {format_size(first_free * sector)}"
            )
        if not gpt and part.last_lba >= _MBR_LBA_LIMIT:
            raise RecipeError(
                f"{_where(layout, f'partition.{label}')}: ends at {format_size(part.end)}, past "
                f"what an MBR addresses with {sector}-byte sectors "
                f'({format_size(_MBR_LBA_LIMIT * sector)}); expected table = "gpt"'
            )
    spans = [(part.offset, part.end, f"[partition.{part.spec.label}]") for part in plan.partitions]
    spans += [area for area in plan.table_areas() if area[2].startswith("the EBR")]
    spans.sort()
    for index, (start, end, name) in enumerate(spans):
        for other_start, other_end, other in spans[index + 1 :]:
            if other_start >= end:
                break
            # Blame the partition that starts inside the other one (an EBR never moves).
            blamed, blamed_span, victim, victim_span = (
                (other, (other_start, other_end), name, (start, end))
                if other.startswith("[partition")
                else (name, (start, end), other, (other_start, other_end))
            )
            raise RecipeError(
                f"{layout.path}: {blamed} offset: {blamed} at {_span(*blamed_span)} overlaps "
                f"{victim} at {_span(*victim_span)}"
            )


def _check_raw_regions(plan: DiskPlan) -> None:
    layout = plan.layout
    first = min(plan.partitions, key=lambda part: part.first_lba, default=None)
    areas = plan.table_areas()
    regions = sorted(layout.raw_regions, key=lambda region: region.offset)
    for index, region in enumerate(regions):
        where = _where(layout, f"raw.{region.name}")
        here = _span(region.offset, region.end)
        if region.end > plan.disk_size:
            raise RecipeError(
                f"{where} offset: the region at {here} ends past the end of the disk "
                f"({format_size(plan.disk_size)}); expected a larger [disk] size"
            )
        for start, end, what in areas:
            if region.offset < end and start < region.end:
                raise RecipeError(
                    f"{where} offset: the region at {here} overlaps {what} at "
                    f"{_span(start, end)}; expected a region outside the partition table"
                    + (
                        " (a blob at offset 0 may fill the 440 bytes of boot code)"
                        if start == 440
                        else ""
                    )
                )
        for other in regions[index + 1 :]:
            if other.offset < region.end:
                raise RecipeError(
                    f"{where} offset: the region at {here} overlaps [raw.{other.name}] at "
                    f"{_span(other.offset, other.end)}"
                )
        for part in plan.partitions:
            if region.offset < part.end and part.offset < region.end:
                raise RecipeError(_region_overlap(layout, region, part, first))


def _region_overlap(
    layout: Layout, region: RawRegion, part: PlacedPartition, first: PlacedPartition | None
) -> str:
    where = _where(layout, f"raw.{region.name}")
    here = _span(region.offset, region.end)
    label = part.spec.label
    if part is first and region.offset < part.offset:
        return (
            f"{where} file: {region.file.name} ({format_size(region.size)}) at offset "
            f"{format_size(region.offset)} ends at {format_size(region.end)}, past the start of "
            f"the first partition [partition.{label}] at {format_size(part.offset)}; expected a "
            f"blob that fits before it, or [partition.{label}] offset of at least "
            f"{format_size(_align_up(region.end, layout.alignment))}"
        )
    return (
        f"{where} offset: the region at {here} overlaps [partition.{label}] at "
        f"{_span(part.offset, part.end)}"
    )
