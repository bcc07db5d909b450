"""Host-side install of a bundle into a disk image: the reference applier.

Manufacturers use it to preload factory images; the tests use it as the reference the
on-target applier must match byte for byte. Order matters and is the safety argument
(docs/architecture.md, "Safety argument of an install"):

1. the signature, then the compatibility, the policy, the version order (no downgrade unless
   asked) and the boot state: the target is the inactive slot, never the only confirmed one;
2. from a file, every chunk and, for a delta, every operation of every stream is checked in a
   pass that writes nothing, so a refused bundle leaves the disk byte-identical;
3. the boot state marks the target slot incomplete (unbootable, `avobuild status` says so)
   before its first byte is written, so an interruption never leaves a slot that looks like
   the system it held before;
4. only the inactive slot is written, each chunk or operation checked again as it is, and the
   slot is read back; the boot state is rewritten last, making it the trial slot.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from avobuild.boot.state import DEFAULT_MAX_ATTEMPTS, BootState
from avobuild.boot.statefile import read_state, write_state
from avobuild.bundle.crypt import DecryptionKey
from avobuild.bundle.keys import Keyring, load_keyring
from avobuild.bundle.manifest import BundleType, ImageRef, Manifest
from avobuild.bundle.reader import BundleReader
from avobuild.disk.gpt import GptPartition, GptTable, read_gpt
from avobuild.errors import CompatibilityError, InstallError
from avobuild.model.layout import Layout, Role, Slot
from avobuild.update.delta import check_deltas, check_sources, plan_deltas, write_deltas
from avobuild.update.policy import check_install_policy
from avobuild.update.target import SlotTarget, check_fits, role_label, slot_target, verify_written

InstallProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class InstallResult:
    slot: Slot
    previous: Slot
    version: str
    written: dict[str, int]
    state: BootState


def _no_progress(_step: str, _done: int, _total: int) -> None:
    pass


def _find(table: GptTable, disk: Path, label: str) -> GptPartition:
    part = table.find(label)
    if part is None:
        names = ", ".join(p.name for p in table.partitions) or "none"
        raise InstallError(
            f"{disk}: no partition labelled {label!r} (partitions: {names}); "
            "pass --layout if this disk uses other labels"
        )
    return part


def read_boot_state(disk: Path, layout: Layout | None = None) -> BootState:
    """The boot state stored on the disk image's boot partition."""
    with disk.open("rb") as handle:
        table = read_gpt(handle)
    boot = _find(table, disk, role_label(layout, Role.BOOT))
    return read_state(disk, table.offset(boot), f"{disk}: partition {boot.name}")


def write_boot_state(disk: Path, state: BootState, layout: Layout | None = None) -> None:
    """Store `state` on the disk image's boot partition, durably (fsync of the image)."""
    with disk.open("rb") as handle:
        table = read_gpt(handle)
    boot = _find(table, disk, role_label(layout, Role.BOOT))
    write_state(disk, table.offset(boot), f"{disk}: partition {boot.name}", state)
    fd = os.open(disk, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_target_slot(state: BootState, disk: Path) -> Slot:
    """The slot an install writes: the inactive one, unless it is the only confirmed slot
    (then the active slot is an unconfirmed trial, and writing the other would leave the
    device nothing known to boot)."""
    target, active = state.inactive, state.active
    if state.slots[target].ok and not state.slots[active].ok:
        raise InstallError(
            f"{disk}: slot {target.value} ({state.slots[target].version or 'no version'}) is "
            f"the only confirmed slot, and slot {active.value} "
            f"({state.slots[active].version or 'no version'}) has not been confirmed yet; "
            f"an install would overwrite slot {target.value}. Boot and confirm slot "
            f"{active.value} first (when preloading disk images, install with --confirm, which "
            "confirms each install at once); nothing was written"
        )
    return target


def install_bundle(
    bundle: Path,
    disk: Path,
    keyring: Path,
    *,
    layout: Layout | None = None,
    confirm: bool = False,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    progress: InstallProgress = _no_progress,
    stream: BinaryIO | None = None,
    now: int | None = None,
    decryption: DecryptionKey | None = None,
    allow_downgrade: bool = False,
) -> InstallResult:
    """Verify `bundle` completely, write it to the inactive slot of `disk`, switch slots.

    With `stream` (a pipe; `bundle` is then only its name) the bundle is read once: the
    target slot is marked incomplete in the boot state, then each chunk (each delta
    operation) is written as soon as it verified, and the slots switch only after the whole
    bundle verified. A refused stream leaves the target slot incomplete; the running slot, its
    boot entry and the data partition are untouched. `now` is the time certificates and
    `expires` are judged at (default: the clock). `decryption` opens an encrypted payload
    (see `load_decryption_key`). `allow_downgrade` installs a version older than the running
    slot's.
    """
    trusted = load_keyring(keyring)
    opened = (
        BundleReader.open(bundle)
        if stream is None
        else BundleReader.from_stream(stream, str(bundle))
    )
    with opened as reader:
        reader.verify_signature(trusted, now=now)
        reader.unlock(decryption)
        manifest = reader.manifest
        with disk.open("rb") as handle:
            table = read_gpt(handle)
        state = read_boot_state(disk, layout)
        check_compatible(manifest, state, disk)
        check_install_policy(manifest, state, disk, now=now, allow_downgrade=allow_downgrade)
        target = check_target_slot(state, disk)
        delta = manifest.type is BundleType.DELTA
        if delta:
            plans = plan_deltas(manifest, table, disk, layout, state.active, target)
            check_sources(disk, plans, progress)
        else:
            targets = _plan_targets(manifest, table, disk, layout, target)
        if stream is not None:
            write_boot_state(disk, state.with_incomplete(target), layout)
            if delta:
                written = write_deltas(reader, disk, plans, progress)
            else:
                written = _write_verified_chunks(reader, manifest, disk, targets, progress)
        else:
            total = sum(image.size for image in manifest.images)
            progress("verifying", 0, total)
            if delta:
                check_deltas(reader, disk, plans, progress)
            else:
                reader.verify_payload()
            progress("verifying", total, total)

    if stream is None:
        write_boot_state(disk, state.with_incomplete(target), layout)
        with _reopened(bundle, trusted, manifest, now, decryption) as again:
            if delta:
                written = write_deltas(again, disk, plans, progress)
            else:
                written = _write_verified_chunks(again, manifest, disk, targets, progress)
    new_state = state.with_pending(
        target, manifest.version, max_attempts, manifest.policy.security_version or 0
    )
    if confirm:
        new_state = new_state.with_confirmed(target)
    write_boot_state(disk, new_state, layout)
    return InstallResult(target, state.active, manifest.version, written, new_state)


def check_compatible(manifest: Manifest, state: BootState, disk: Path) -> None:
    # Patterns (manifest version 2) are judged by check_install_policy.
    if manifest.manifest_version == 1 and manifest.compatible != state.compatible:
        raise CompatibilityError(
            f"bundle is for {manifest.compatible!r} but {disk} is {state.compatible!r}; "
            "nothing was written"
        )


def _plan_targets(
    manifest: Manifest, table: GptTable, disk: Path, layout: Layout | None, slot: Slot
) -> dict[str, SlotTarget]:
    """The partition each bundle image goes to; every image must fit."""
    targets: dict[str, SlotTarget] = {}
    for image in manifest.images:
        target = slot_target(table, disk, layout, image.name, slot)
        check_fits(target, image.size)
        targets[image.name] = target
    return targets


@contextmanager
def _reopened(
    bundle: Path,
    trusted: Keyring,
    manifest: Manifest,
    now: int | None,
    decryption: DecryptionKey | None,
) -> Iterator[BundleReader]:
    """The bundle file read again for the writing pass, checked again: its signature, and
    the same manifest as the verifying pass saw (every chunk is checked as it is written)."""
    with BundleReader.open(bundle) as reader:
        reader.verify_signature(trusted, now=now)
        reader.unlock(decryption)
        if reader.manifest != manifest:
            raise InstallError(f"{bundle}: changed while it was being installed")
        yield reader


def _write_verified_chunks(
    reader: BundleReader,
    manifest: Manifest,
    disk: Path,
    targets: dict[str, SlotTarget],
    progress: InstallProgress,
) -> dict[str, int]:
    """Write each chunk as `iter_chunks` releases it (verified), then read the slots back."""
    total = sum(image.size for image in manifest.images)
    done = 0
    written: dict[str, int] = {}
    fd = os.open(disk, os.O_RDWR)
    try:
        for image, chunk, data in reader.iter_chunks():
            offset = targets[image.name].offset + chunk.index * manifest.chunk_size
            os.pwrite(fd, data, offset)
            written[image.name] = written.get(image.name, 0) + len(data)
            done += len(data)
            progress("writing", done, total)
        os.fsync(fd)
        for image in manifest.images:
            verify_written(fd, disk, targets[image.name], ImageRef(image.size, image.sha256))
    finally:
        os.close(fd)
    return written
