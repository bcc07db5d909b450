"""Where an update writes, and checking what it wrote: one path for full and delta installs.

`slot_target` resolves the partition of a disk image that receives a bundle image in a slot
(by the roles the disk records, or a layout's labels: disk/record.py); `verify_written` reads
a written slot back and compares it with the signed hash before the boot state may change.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from avobuild.bundle.manifest import ImageRef
from avobuild.delta.apply import Region, region_sha256
from avobuild.disk.plan import slot_role
from avobuild.disk.record import DiskRoles
from avobuild.errors import CompatibilityError, InstallError
from avobuild.model.layout import IMAGE_SLOT_CLASS, Slot
from avobuild.model.tomlcheck import format_size


@dataclass(frozen=True)
class SlotTarget:
    """The partition of a disk image that receives one bundle image in one slot."""

    image: str
    label: str
    offset: int
    size: int


def slot_target(roles: DiskRoles, image: str, slot: Slot) -> SlotTarget:
    """The partition of the disk that bundle image `image` is written to when `slot` is."""
    role = slot_role(image, slot)
    if role is None:
        known = ", ".join(IMAGE_SLOT_CLASS)
        raise CompatibilityError(
            f"bundle image {image!r} has no slot on a device (known images: {known})"
        )
    part = roles.find(role)
    if part is None:
        raise CompatibilityError(
            f"bundle image {image!r} needs a partition with role {role.value!r} on "
            f"{roles.disk} (found by {roles.source}); there is none"
        )
    return SlotTarget(image, part.label or str(part.number), part.offset, part.size)


def check_fits(target: SlotTarget, size: int) -> None:
    """Refuse an image larger than its partition."""
    if size > target.size:
        raise CompatibilityError(
            f"bundle image {target.image!r} is {format_size(size)}, larger than "
            f"partition {target.label} ({format_size(target.size)})"
        )


def verify_written(fd: int, disk: Path, target: SlotTarget, ref: ImageRef) -> None:
    """Read the first `ref.size` bytes of `target` back; InstallError unless they hash right."""
    region = Region(fd, target.offset, f"{disk}: partition {target.label}")
    if region_sha256(region, ref.size) != (ref.sha256, ref.size):
        raise InstallError(
            f"{disk}: image {target.image} read back from partition {target.label} (offset "
            f"{target.offset}) does not match its hash; the slot stays inactive"
        )
