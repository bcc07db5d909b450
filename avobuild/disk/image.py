"""A disk image assembled from a plan: the partition table, the partition contents copied in
sparse, then the raw regions (last, because a boot loader blob may own the boot code bytes
of sector 0 that the table writer leaves alone)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

from avobuild.disk.plan import DiskPlan, PlacedPartition
from avobuild.disk.table import write_partition_table, write_raw_regions
from avobuild.errors import BuildError
from avobuild.model.tomlcheck import format_size

Progress = Callable[[str], None]
_COPY_BLOCK = 64 << 20


def _no_progress(_message: str) -> None:
    pass


def assemble_disk(
    output: Path,
    plan: DiskPlan,
    seed: str,
    contents: Mapping[str, Path],
    progress: Progress = _no_progress,
) -> None:
    """Write the disk image `output` for `plan`.

    `contents` maps partition labels to the images that fill them; a raw partition with a
    `file` in the layout is filled from that file unless `contents` names another. Partitions
    with neither stay zero (and sparse).
    """
    if output.exists():
        output.unlink()
    with output.open("wb") as handle:
        handle.truncate(plan.disk_size)
        write_partition_table(handle, plan, seed)
        for part in plan.partitions:
            source = contents.get(part.spec.label, part.spec.file)
            if source is not None:
                progress(f"writing {part.spec.label} at offset {part.offset}")
                copy_into(source, handle.fileno(), part)
        for region in plan.layout.raw_regions:
            progress(f"writing raw region {region.name} at offset {region.offset}")
        write_raw_regions(handle.fileno(), plan)


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
