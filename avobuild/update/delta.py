"""Installing a delta bundle into a disk image (called by avobuild.update.install).

Each image's delta is applied with the ACTIVE slot's partition as the source and the inactive
slot's partition as the target. `plan_deltas` checks the sizes against both partitions;
`check_sources` hashes the first `source.size` bytes of every active partition against the
signed source hash. From a file, `check_deltas` then reads every chunk and replays every delta
stream without writing (every operation parsed, bounded by the slots, decoded and hashed),
so a malformed operation anywhere refuses the bundle before the first write. `write_deltas`
applies the streams chunk by verified chunk, each operation checked against its hash before
its bytes are written, and reads each written slot back. The caller switches slots only
after all of that succeeded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from avobuild.bundle.manifest import ImageEntry, ImageRef, Manifest
from avobuild.bundle.reader import BundleReader
from avobuild.delta.apply import (
    ChunkStream,
    Region,
    apply_delta,
    check_delta,
    check_source,
    image_chunks,
)
from avobuild.disk.record import DiskRoles
from avobuild.errors import CompatibilityError
from avobuild.model.layout import Slot
from avobuild.model.tomlcheck import format_size
from avobuild.update.target import SlotTarget, check_fits, slot_target, verify_written

InstallProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class DeltaPlan:
    """One image of a delta bundle: the stream's refs and the two partitions it joins."""

    image: ImageEntry
    source_ref: ImageRef
    target_ref: ImageRef
    source: SlotTarget
    target: SlotTarget


def plan_deltas(
    manifest: Manifest,
    roles: DiskRoles,
    active: Slot,
    inactive: Slot,
) -> list[DeltaPlan]:
    """Where every delta reads and writes; refuses sources or targets that do not fit."""
    plans = []
    for image in manifest.images:
        assert image.source is not None and image.target is not None
        source = slot_target(roles, image.name, active)
        target = slot_target(roles, image.name, inactive)
        if image.source.size > source.size:
            raise CompatibilityError(
                f"bundle image {image.name!r}: the delta needs a source of "
                f"{format_size(image.source.size)}, partition {source.label} holds "
                f"{format_size(source.size)}; nothing was written"
            )
        check_fits(target, image.target.size)
        plans.append(DeltaPlan(image, image.source, image.target, source, target))
    return plans


def _source_region(fd: int, disk: Path, plan: DeltaPlan) -> Region:
    return Region(fd, plan.source.offset, f"{disk}: partition {plan.source.label} (active)")


def check_sources(disk: Path, plans: list[DeltaPlan], progress: InstallProgress) -> None:
    """Refuse the bundle unless every active partition holds the delta's source image."""
    fd = os.open(disk, os.O_RDONLY)
    try:
        for plan in plans:
            step = f"checking source of {plan.image.name}"
            progress(step, 0, plan.source_ref.size)
            check_source(_source_region(fd, disk, plan), plan.source_ref)
            progress(step, plan.source_ref.size, plan.source_ref.size)
    finally:
        os.close(fd)


def check_deltas(
    reader: BundleReader, disk: Path, plans: list[DeltaPlan], progress: InstallProgress
) -> None:
    """Read every chunk and replay every delta without writing anything (docs/signing.md,
    "installs from a file verify everything before writing anything")."""
    fd = os.open(disk, os.O_RDONLY)
    try:
        chunks = reader.iter_chunks()
        for plan in plans:

            def report(done: int, total: int, name: str = plan.image.name) -> None:
                progress(f"checking {name}", done, total)

            check_delta(
                ChunkStream(image_chunks(chunks, plan.image)),
                f"{reader.name}: image {plan.image.name}",
                _source_region(fd, disk, plan),
                (plan.source_ref, plan.target_ref),
                report,
            )
        for _ in chunks:
            pass
    finally:
        os.close(fd)


def write_deltas(
    reader: BundleReader, disk: Path, plans: list[DeltaPlan], progress: InstallProgress
) -> dict[str, int]:
    """Apply every delta from the active into the inactive slot, then read the slots back."""
    fd = os.open(disk, os.O_RDWR)
    try:
        chunks = reader.iter_chunks()
        written: dict[str, int] = {}
        for plan in plans:

            def report(done: int, total: int, name: str = plan.image.name) -> None:
                progress(f"applying {name}", done, total)

            apply_delta(
                ChunkStream(image_chunks(chunks, plan.image)),
                f"{reader.name}: image {plan.image.name}",
                _source_region(fd, disk, plan),
                Region(fd, plan.target.offset, f"{disk}: partition {plan.target.label}"),
                expected=(plan.source_ref, plan.target_ref),
                check_source_first=False,
                progress=report,
            )
            written[plan.image.name] = plan.target_ref.size
        for _ in chunks:
            pass
        os.fsync(fd)
        for plan in plans:
            verify_written(fd, disk, plan.target, plan.target_ref)
    finally:
        os.close(fd)
    return written
