"""Installing a delta bundle into a disk image (called by avobuild.update.install).

Each image's delta is applied with the ACTIVE slot's partition as the source and the inactive
slot's partition as the target. Before anything is written, the first `source.size` bytes of
every active partition are hashed and compared with the signed source hash, and the target
sizes are checked against the inactive partitions; from a file, every chunk is also verified
in a first pass. Then the streams are applied chunk by verified chunk, each operation checked
against its hash, and each written slot is read back and compared with the target hash. The
caller switches slots only after all of that succeeded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from avobuild.bundle.manifest import ImageEntry, ImageRef, Manifest
from avobuild.bundle.reader import BundleReader
from avobuild.delta.apply import ChunkStream, Region, apply_delta, check_source, image_chunks
from avobuild.disk.gpt import GptTable
from avobuild.errors import CompatibilityError
from avobuild.model.layout import Layout, Slot
from avobuild.model.tomlcheck import format_size
from avobuild.update.target import SlotTarget, check_fits, slot_target, verify_written

InstallProgress = Callable[[str, int, int], None]


def install_delta(
    reader: BundleReader,
    manifest: Manifest,
    disk: Path,
    table: GptTable,
    layout: Layout | None,
    active: Slot,
    inactive: Slot,
    progress: InstallProgress,
    *,
    streamed: bool,
) -> dict[str, int]:
    """Check every source, then apply every delta from `active` into `inactive`."""
    plans: list[tuple[ImageEntry, ImageRef, ImageRef, Region, Region, SlotTarget]] = []
    fd = os.open(disk, os.O_RDWR)
    try:
        for image in manifest.images:
            assert image.source is not None and image.target is not None
            active_part = slot_target(table, disk, layout, image.name, active)
            inactive_part = slot_target(table, disk, layout, image.name, inactive)
            if image.source.size > active_part.size:
                raise CompatibilityError(
                    f"bundle image {image.name!r}: the delta needs a source of "
                    f"{format_size(image.source.size)}, partition {active_part.label} holds "
                    f"{format_size(active_part.size)}; nothing was written"
                )
            check_fits(inactive_part, image.target.size)
            source = Region(
                fd, active_part.offset, f"{disk}: partition {active_part.label} (active)"
            )
            target = Region(fd, inactive_part.offset, f"{disk}: partition {inactive_part.label}")
            plans.append((image, image.source, image.target, source, target, inactive_part))
        for image, source_ref, _target_ref, source, _target, _part in plans:
            progress(f"checking source of {image.name}", 0, source_ref.size)
            check_source(source, source_ref)
            progress(f"checking source of {image.name}", source_ref.size, source_ref.size)
        if not streamed:
            total = sum(image.size for image in manifest.images)
            progress("verifying", 0, total)
            reader.verify_payload()
            progress("verifying", total, total)
        chunks = reader.iter_chunks()
        written: dict[str, int] = {}
        for image, source_ref, target_ref, source, target, _part in plans:

            def report(done: int, total: int, name: str = image.name) -> None:
                progress(f"applying {name}", done, total)

            apply_delta(
                ChunkStream(image_chunks(chunks, image)),
                f"{reader.name}: image {image.name}",
                source,
                target,
                expected=(source_ref, target_ref),
                check_source_first=False,
                progress=report,
            )
            written[image.name] = target_ref.size
        for _ in chunks:
            pass
        os.fsync(fd)
        for _image, _source_ref, target_ref, _source, _target, part in plans:
            verify_written(fd, disk, part, target_ref)
    finally:
        os.close(fd)
    return written
