"""Placing a layout on a disk: aligned partition offsets in sectors, the disk's size.

`plan_layout` is all the image builder, the installer and the applier renderer need to know
about where partitions sit; the layout itself (`avobuild.model.layout`) only declares them.
"""

from __future__ import annotations

from dataclasses import dataclass

from avobuild.disk.gpt import first_usable_lba, last_usable_lba
from avobuild.errors import RecipeError
from avobuild.model.layout import Layout, PartitionSpec, Role
from avobuild.model.tomlcheck import format_size


@dataclass(frozen=True)
class PlacedPartition:
    """A partition with its place on the disk. `last_lba` is inclusive, as in GPT."""

    spec: PartitionSpec
    number: int
    first_lba: int
    last_lba: int
    sector_size: int

    @property
    def offset(self) -> int:
        return self.first_lba * self.sector_size

    @property
    def size(self) -> int:
        return (self.last_lba - self.first_lba + 1) * self.sector_size


@dataclass(frozen=True)
class DiskPlan:
    layout: Layout
    disk_size: int
    partitions: tuple[PlacedPartition, ...]

    def by_role(self, role: Role) -> PlacedPartition | None:
        return next((part for part in self.partitions if part.spec.role is role), None)

    def by_label(self, label: str) -> PlacedPartition | None:
        return next((part for part in self.partitions if part.spec.label == label), None)


def _align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def plan_layout(layout: Layout) -> DiskPlan:
    """Place every partition on the disk, aligned, in file order; size the disk to fit."""
    sector = layout.sector_size
    align = layout.alignment // sector
    fixed_total = sum(_align_up(part.size // sector, align) for part in layout.partitions)
    first = _align_up(first_usable_lba(sector), align)
    backup_sectors = first_usable_lba(sector) - 1  # backup entries + backup header
    if layout.disk_size is None:
        disk_size = (_align_up(first + fixed_total + backup_sectors, align)) * sector
    else:
        disk_size = layout.disk_size
    last_usable = last_usable_lba(disk_size, sector)
    grow_extra = 0
    if any(part.grow for part in layout.partitions):
        free = (last_usable + 1 - first) - fixed_total
        grow_extra = max(0, (free // align) * align)
    placed: list[PlacedPartition] = []
    lba = first
    for number, spec in enumerate(layout.partitions, start=1):
        sectors = spec.size // sector + (grow_extra if spec.grow else 0)
        placed.append(PlacedPartition(spec, number, lba, lba + sectors - 1, sector))
        lba = _align_up(lba + sectors, align)
    end = placed[-1].last_lba if placed else first
    if end > last_usable:
        needed = format_size(_align_up((end + 1 + backup_sectors) * sector, layout.alignment))
        raise RecipeError(
            f"{layout.path}: [disk] size: the partitions need at least {needed}, "
            f"got {format_size(disk_size)}"
        )
    return DiskPlan(layout, disk_size, tuple(placed))
