"""Host-side install of a bundle into a disk image: the reference applier.

Manufacturers use it to preload factory images; the tests use it as the reference the
on-target applier must match byte for byte. Order matters and is the safety argument:
signature, compatibility, sizes and every chunk hash are checked in full before the first byte
is written, and only the inactive slot is written. The boot state on the boot partition is
rewritten last, so an interruption leaves the previous slot booting.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from avobuild.boot.grubenv import parse_grubenv, render_grubenv
from avobuild.boot.state import BOOT_STATE_PATH, DEFAULT_MAX_ATTEMPTS, BootState
from avobuild.bundle.crypt import DecryptionKey
from avobuild.bundle.keys import Keyring, load_keyring
from avobuild.bundle.manifest import BundleType, ImageRef, Manifest
from avobuild.bundle.reader import BundleReader
from avobuild.disk.gpt import GptPartition, GptTable, read_gpt
from avobuild.errors import CompatibilityError, InstallError, ToolFailed
from avobuild.fs import read_vfat_file, write_vfat_file
from avobuild.model.layout import Layout, Role, Slot
from avobuild.update.delta import install_delta
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
    source = f"{disk}: partition {boot.name}: {BOOT_STATE_PATH}"
    try:
        data = read_vfat_file(disk, table.offset(boot), BOOT_STATE_PATH)
    except ToolFailed as error:
        raise InstallError(f"{source}: cannot be read: {error}") from None
    return BootState.from_variables(parse_grubenv(data, source), source)


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
) -> InstallResult:
    """Verify `bundle` completely, write it to the inactive slot of `disk`, switch slots.

    With `stream` (a pipe; `bundle` is then only its name) the bundle is read once: each
    chunk is written to the inactive slot as soon as it verified, and the slots switch only
    after the whole bundle verified. A refused stream leaves the inactive slot's content
    undefined; the running slot, the boot state and the data partition are untouched.
    `now` is the time certificates and `expires` are judged at (default: the clock).
    `decryption` opens an encrypted payload (see `load_decryption_key`).
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
        check_install_policy(manifest, state, disk, now=now)
        target = state.inactive
        # A delta is applied from the active slot into the inactive one (avobuild/delta).
        delta = manifest.type is BundleType.DELTA
        targets = {} if delta else _plan_targets(manifest, table, disk, layout, target)
        total = sum(image.size for image in manifest.images)
        if delta:
            written = install_delta(
                reader,
                manifest,
                disk,
                table,
                layout,
                state.active,
                target,
                progress,
                streamed=stream is not None,
            )
        elif stream is not None:
            written = _write_verified_chunks(reader, manifest, disk, targets, progress)
        else:
            progress("verifying", 0, total)
            reader.verify_payload()
            progress("verifying", total, total)

    if stream is None and not delta:
        written = _write_images(bundle, trusted, manifest, disk, targets, progress, now, decryption)
    new_state = state.with_pending(
        target, manifest.version, max_attempts, manifest.policy.security_version or 0
    )
    if confirm:
        new_state = new_state.with_confirmed(target)
    boot = _find(table, disk, role_label(layout, Role.BOOT))
    write_vfat_file(
        disk, table.offset(boot), BOOT_STATE_PATH, render_grubenv(new_state.to_variables())
    )
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


def _write_images(
    bundle: Path,
    trusted: Keyring,
    manifest: Manifest,
    disk: Path,
    targets: dict[str, SlotTarget],
    progress: InstallProgress,
    now: int | None = None,
    decryption: DecryptionKey | None = None,
) -> dict[str, int]:
    with BundleReader.open(bundle) as reader:
        reader.verify_signature(trusted, now=now)
        reader.unlock(decryption)
        if reader.manifest != manifest:
            raise InstallError(f"{bundle}: changed while it was being installed")
        return _write_verified_chunks(reader, manifest, disk, targets, progress)


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
