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

A full install that was cut short resumes (avobuild/update/resume.py): a record beside the
disk, written after each frame's chunks were written and fsynced, says how far it got; it is
bound to the bundle and the slot, and every chunk it counts is read back and checked against
its signed hash before the install continues after it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from avobuild.boot.state import DEFAULT_MAX_ATTEMPTS, BootState
from avobuild.boot.statefile import read_state, write_state
from avobuild.bundle.crypt import DecryptionKey
from avobuild.bundle.keys import Keyring, load_keyring
from avobuild.bundle.manifest import BundleType, ChunkEntry, ImageEntry, ImageRef, Manifest
from avobuild.bundle.reader import BundleReader
from avobuild.disk.record import DiskRoles, read_disk_roles
from avobuild.errors import CompatibilityError, InstallError
from avobuild.model.layout import Layout, Role, Slot
from avobuild.update.delta import check_deltas, check_sources, plan_deltas, write_deltas
from avobuild.update.policy import check_install_policy
from avobuild.update.resume import (
    V1_INTERVAL,
    ResumeRecord,
    checked_prefixes,
    drop_record,
    load_record,
    record_path,
    write_record,
)
from avobuild.update.target import SlotTarget, check_fits, slot_target, verify_written

InstallProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class InstallResult:
    slot: Slot
    previous: Slot
    version: str
    written: dict[str, int]
    state: BootState
    # Chunks a resumed install found already written and did not write again, per image.
    resumed: dict[str, int] = field(default_factory=dict)
    # Why a resume record was not used (the install then started over), if there was one.
    resume_refused: str | None = None


def _no_progress(_step: str, _done: int, _total: int) -> None:
    pass


def _boot_partition(disk: Path, layout: Layout | DiskRoles | None) -> tuple[int, str]:
    roles = layout if isinstance(layout, DiskRoles) else read_disk_roles(disk, layout)
    boot = roles.require(Role.BOOT)
    return boot.offset, f"{disk}: partition {boot.label or boot.number}"


def read_boot_state(disk: Path, layout: Layout | DiskRoles | None = None) -> BootState:
    """The boot state stored on the disk image's boot partition (found as `read_disk_roles`
    finds it: by the layout's labels, else from the disk's own record)."""
    return read_state(disk, *_boot_partition(disk, layout))


def write_boot_state(
    disk: Path, state: BootState, layout: Layout | DiskRoles | None = None
) -> None:
    """Store `state` on the disk image's boot partition, durably (fsync of the image)."""
    offset, where = _boot_partition(disk, layout)
    write_state(disk, offset, where, state)
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
    check_writable(disk)
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
        roles = read_disk_roles(disk, layout)
        state = read_boot_state(disk, roles)
        check_compatible(manifest, state, disk)
        check_install_policy(manifest, state, disk, now=now, allow_downgrade=allow_downgrade)
        target = check_target_slot(state, disk)
        delta = manifest.type is BundleType.DELTA
        if delta:
            plans = plan_deltas(manifest, roles, state.active, target)
            check_sources(disk, plans, progress)
        else:
            targets = _plan_targets(manifest, roles, target)
            resume = _Resume.load(disk, reader.manifest_bytes, manifest, target, targets, state)
        if stream is not None:
            write_boot_state(disk, state.with_incomplete(target), roles)
            if delta:
                written = write_deltas(reader, disk, plans, progress)
            else:
                written = _write_verified_chunks(reader, manifest, disk, targets, progress, resume)
        else:
            total = sum(image.size for image in manifest.images)
            progress("verifying", 0, total)
            if delta:
                check_deltas(reader, disk, plans, progress)
            else:
                reader.verify_payload()
            progress("verifying", total, total)

    if stream is None:
        write_boot_state(disk, state.with_incomplete(target), roles)
        with _reopened(bundle, trusted, manifest, now, decryption) as again:
            if delta:
                written = write_deltas(again, disk, plans, progress)
            else:
                written = _write_verified_chunks(again, manifest, disk, targets, progress, resume)
    new_state = state.with_pending(
        target, manifest.version, max_attempts, manifest.policy.security_version or 0
    )
    if confirm:
        new_state = new_state.with_confirmed(target)
    write_boot_state(disk, new_state, roles)
    if delta:
        return InstallResult(target, state.active, manifest.version, written, new_state)
    resume.drop()
    return InstallResult(
        target,
        state.active,
        manifest.version,
        written,
        new_state,
        resumed=resume.skipped,
        resume_refused=resume.refused,
    )


def check_writable(disk: Path) -> None:
    """Refuse a disk that cannot be opened for writing (missing, read-only) before any work."""
    try:
        fd = os.open(disk, os.O_RDWR)
    except OSError as error:
        raise InstallError(
            f"{disk}: cannot open the disk for writing: {error.strerror}; nothing was written"
        ) from None
    os.close(fd)


def check_compatible(manifest: Manifest, state: BootState, disk: Path) -> None:
    # Patterns (manifest version 2) are judged by check_install_policy.
    if manifest.manifest_version == 1 and manifest.compatible != state.compatible:
        raise CompatibilityError(
            f"bundle is for {manifest.compatible!r} but {disk} is {state.compatible!r}; "
            "nothing was written"
        )


def _plan_targets(manifest: Manifest, roles: DiskRoles, slot: Slot) -> dict[str, SlotTarget]:
    """The partition each bundle image goes to; every image must fit."""
    targets: dict[str, SlotTarget] = {}
    for image in manifest.images:
        target = slot_target(roles, image.name, slot)
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


@dataclass
class _Resume:
    """Where a full install starts: the record's counts once bound to this install
    (resume.load_record), else nothing; `skipped` counts the chunks not written again."""

    path: Path
    manifest_sha: str
    slot: Slot
    done: dict[str, int]
    refused: str | None
    skipped: dict[str, int] = field(default_factory=dict)
    recording: bool = True

    @classmethod
    def load(
        cls,
        disk: Path,
        manifest_bytes: bytes,
        manifest: Manifest,
        slot: Slot,
        targets: dict[str, SlotTarget],
        state: BootState,
    ) -> _Resume:
        path = record_path(disk)
        manifest_sha = hashlib.sha256(manifest_bytes).hexdigest()
        done: dict[str, int] = {}
        refused = None
        if path.exists() or path.is_symlink():
            try:
                done = load_record(path, manifest_sha, manifest, slot, targets, state)
            except (InstallError, OSError) as error:
                refused = f"{path}: resume record not used ({error}); starting over"
        return cls(path, manifest_sha, slot, done, refused)

    def save(self, record: ResumeRecord) -> None:
        """Record progress; where the disk's directory cannot hold the record (read-only),
        the install goes on without one: it cannot resume, and starts over if cut short."""
        if not self.recording:
            return
        try:
            write_record(self.path, record)
        except OSError:
            self.recording = False

    def drop(self) -> None:
        # A record left behind is harmless: it names this bundle, and what it counts is
        # read back against the signed hashes before any use.
        with suppress(OSError):
            drop_record(self.path)


def _frame_ends(manifest: Manifest, image_chunks: int, index: int) -> bool:
    """A restart point follows chunk `index`: the end of a frame (zstd-stream) or of a run of
    V1_INTERVAL chunks, or of the image."""
    step = manifest.stream.frame_chunks if manifest.stream is not None else V1_INTERVAL
    return (index + 1) % step == 0 or index == image_chunks - 1


def _write_verified_chunks(
    reader: BundleReader,
    manifest: Manifest,
    disk: Path,
    targets: dict[str, SlotTarget],
    progress: InstallProgress,
    resume: _Resume,
) -> dict[str, int]:
    """Write each chunk as `iter_chunks` releases it (verified), recording the progress at
    every restart point after an fsync; then read the slots back.

    Resuming: with zstd-stream the recorded frames are read back and checked against their
    signed data hashes first, and not decoded or written again; with version 1 chunks each
    recorded chunk is decoded and compared with the slot, and written only if it differs."""
    total = sum(image.size for image in manifest.images)
    done = 0
    written: dict[str, int] = {}
    recorded = {image.name: 0 for image in manifest.images}
    fd = os.open(disk, os.O_RDWR)
    try:
        chunks: Iterator[tuple[ImageEntry, ChunkEntry, bytes | None]]
        if manifest.stream is not None and any(resume.done.values()):
            prefixes = checked_prefixes(fd, manifest, targets, resume.done)
            skip = {name: prefix.chunks for name, prefix in prefixes.items()}
            chunks = reader.iter_chunks_resuming(prefixes)
        else:
            if not any(resume.done.values()):
                resume.drop()  # a stale record must not outlive this install's writes
            skip = dict(resume.done)
            chunks = reader.iter_chunks()
        for image in manifest.images:
            if skip.get(image.name):
                count = image.chunk_count
                progress(f"resuming at chunk {skip[image.name]} of image {image.name}", 0, count)
        for image, chunk, data in chunks:
            offset = targets[image.name].offset + chunk.index * manifest.chunk_size
            size = manifest.chunk_data_size(image, chunk.index)
            fresh = data is not None and not (
                chunk.index < skip.get(image.name, 0) and os.pread(fd, size, offset) == data
            )
            if fresh and data is not None:
                os.pwrite(fd, data, offset)
                written[image.name] = written.get(image.name, 0) + len(data)
            else:
                resume.skipped[image.name] = resume.skipped.get(image.name, 0) + 1
            recorded[image.name] = chunk.index + 1
            done += size
            progress("writing", done, total)
            if chunk.index >= skip.get(image.name, 0) and _frame_ends(
                manifest, image.chunk_count, chunk.index
            ):
                os.fsync(fd)
                record = tuple(
                    (entry.name, targets[entry.name].offset, recorded[entry.name])
                    for entry in manifest.images
                )
                resume.save(ResumeRecord(resume.manifest_sha, resume.slot, record))
        os.fsync(fd)
        try:
            for image in manifest.images:
                verify_written(fd, disk, targets[image.name], ImageRef(image.size, image.sha256))
        except InstallError:
            resume.drop()
            raise
    finally:
        os.close(fd)
    return written
