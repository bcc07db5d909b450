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

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from avobuild.bundle.format import BundleReader
from avobuild.bundle.manifest import ImageEntry, ImageRef, Manifest
from avobuild.delta.apply import ChunkStream, Region, apply_delta, check_source, image_chunks
from avobuild.disk.gpt import GptTable
from avobuild.errors import CompatibilityError, InstallError
from avobuild.model.layout import IMAGE_SLOT_CLASS, Layout, Role, Slot
from avobuild.model.tomlcheck import format_size
from avobuild.update.target import role_label

InstallProgress = Callable[[str, int, int], None]


def _partition(
    table: GptTable, disk: Path, layout: Layout | None, image: str, slot: Slot
) -> tuple[int, int, str]:
    slot_class = IMAGE_SLOT_CLASS.get(image)
    if slot_class is None:
        raise CompatibilityError(f"bundle image {image!r} has no slot on a device")
    label = role_label(layout, Role(f"{slot_class}-{slot.value.lower()}"))
    part = table.find(label)
    if part is None:
        raise CompatibilityError(
            f"bundle image {image!r} needs a partition labelled {label!r} on {disk}; there is none"
        )
    return table.offset(part), table.size(part), label


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
    plans: list[tuple[ImageEntry, ImageRef, ImageRef, Region, Region, str]] = []
    fd = os.open(disk, os.O_RDWR)
    try:
        for image in manifest.images:
            assert image.source is not None and image.target is not None
            source_offset, source_size, source_label = _partition(
                table, disk, layout, image.name, active
            )
            target_offset, target_size, target_label = _partition(
                table, disk, layout, image.name, inactive
            )
            if image.source.size > source_size:
                raise CompatibilityError(
                    f"bundle image {image.name!r}: the delta needs a source of "
                    f"{format_size(image.source.size)}, partition {source_label} holds "
                    f"{format_size(source_size)}; nothing was written"
                )
            if image.target.size > target_size:
                raise CompatibilityError(
                    f"bundle image {image.name!r} is {format_size(image.target.size)}, larger "
                    f"than partition {target_label} ({format_size(target_size)})"
                )
            source = Region(fd, source_offset, f"{disk}: partition {source_label} (active)")
            target = Region(fd, target_offset, f"{disk}: partition {target_label}")
            plans.append((image, image.source, image.target, source, target, target_label))
        for image, source_ref, _target_ref, source, _target, _label in plans:
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
        for image, source_ref, target_ref, source, target, _label in plans:

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
        for image, _source_ref, target_ref, _source, target, label in plans:
            _check_written(fd, target, target_ref, disk, label, image.name)
    finally:
        os.close(fd)
    return written


def _check_written(
    fd: int, target: Region, ref: ImageRef, disk: Path, label: str, name: str
) -> None:
    digest = hashlib.sha256()
    position = 0
    while position < ref.size:
        block = os.pread(fd, min(1 << 20, ref.size - position), target.offset + position)
        if not block:
            break
        digest.update(block)
        position += len(block)
    if digest.hexdigest() != ref.sha256:
        raise InstallError(
            f"{disk}: image {name} read back from partition {label} does not match its target "
            "hash; the slot stays inactive"
        )
