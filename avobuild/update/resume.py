"""Resuming an interrupted full-bundle install: the progress record and what checks it.

The record is a small text file beside the disk image (`record_path`), written atomically
(temporary name, fsync, rename, fsync of the directory) only after the chunks it counts were
written to the slot and the disk was fsynced:

    avobuild-resume 1
    manifest <sha256 of the signed manifest bytes>
    slot <A|B>
    image <name> <partition byte offset> <chunks written>     (one line per bundle image)

It is a hint, never trusted for a write: `load_record` takes it only when it parses strictly,
names this bundle (its signed manifest's hash), the slot this install writes and the partition
each image goes to, counts no more chunks than the image has and stops at a frame's end, and
the boot state still marks that slot incomplete (so no install finished since). Then
`checked_prefixes` reads every counted chunk back from the slot and compares it with the
signed data hash of its chunk line (zstd-stream, docs/bundle-format.md 5.2): the install
resumes at the first frame not wholly intact. Anything else starts over from chunk 0.
Version 1 payloads (`zstd`, `none`) have no per-chunk data hash: there the record only says
where the installer compares each decoded chunk with the slot before writing it, and skips
the write of an identical chunk (docs/applier.md, "Resuming an interrupted install").
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from avobuild.boot.state import BootState
from avobuild.bundle.manifest import Manifest
from avobuild.bundle.reader import ResumedPrefix
from avobuild.errors import InstallError
from avobuild.model.layout import Slot
from avobuild.model.names import IMAGE_NAME
from avobuild.update.target import SlotTarget

MAGIC = "avobuild-resume 1"
# A record is a few lines per image; anything larger is not one of ours.
MAX_RECORD = 65536
# Version 1 payloads: chunks between two records (zstd-stream records at every frame's end).
V1_INTERVAL = 16


@dataclass(frozen=True)
class ResumeRecord:
    manifest: str
    slot: Slot
    # (image name, partition byte offset, chunks written), in manifest order
    images: tuple[tuple[str, int, int], ...]


def record_path(disk: Path) -> Path:
    """Where the record of an install into `disk` lives: beside it."""
    return disk.with_name(disk.name + ".avobuild-resume")


def render_record(record: ResumeRecord) -> bytes:
    lines = [MAGIC, f"manifest {record.manifest}", f"slot {record.slot.value}"]
    lines += [f"image {name} {offset} {done}" for name, offset, done in record.images]
    return ("\n".join(lines) + "\n").encode("ascii")


def _number(word: str, what: str) -> int:
    if not word.isascii() or not word.isdigit() or (len(word) > 1 and word[0] == "0"):
        raise InstallError(f"{what}: {word[:40]!r} is not a number")
    if len(word) > 19 or int(word) > 2**63 - 1:
        raise InstallError(f"{what}: out of range")
    return int(word)


def parse_record(data: bytes) -> ResumeRecord:
    """The record's strict syntax; InstallError naming the line otherwise."""
    if len(data) > MAX_RECORD:
        raise InstallError(f"larger than {MAX_RECORD} bytes")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise InstallError("not ASCII text") from None
    if not text.endswith("\n"):
        raise InstallError("not terminated by a newline")
    lines = text[:-1].split("\n")
    if lines[0] != MAGIC:
        raise InstallError(f"line 1: expected {MAGIC!r}")
    if len(lines) < 4:
        raise InstallError("lacks the manifest, slot or image lines")
    manifest = lines[1].removeprefix("manifest ")
    if (
        not lines[1].startswith("manifest ")
        or len(manifest) != 64
        or manifest.strip("0123456789abcdef")
    ):
        raise InstallError("line 2: expected 'manifest <sha256>'")
    if lines[2] not in ("slot A", "slot B"):
        raise InstallError("line 3: expected 'slot A' or 'slot B'")
    images: list[tuple[str, int, int]] = []
    for number, line in enumerate(lines[3:], start=4):
        words = line.split(" ")
        if len(words) != 4 or words[0] != "image" or not IMAGE_NAME.matches(words[1]):
            raise InstallError(f"line {number}: expected 'image <name> <offset> <chunks>'")
        offset = _number(words[2], f"line {number}")
        done = _number(words[3], f"line {number}")
        images.append((words[1], offset, done))
    return ResumeRecord(manifest, Slot(lines[2][-1]), tuple(images))


def write_record(path: Path, record: ResumeRecord) -> None:
    """Replace the record durably: a power cut leaves the old record or the new one."""
    partial = path.with_name(path.name + ".new")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            os.write(fd, render_record(record))
            os.fsync(fd)
        finally:
            os.close(fd)
        partial.replace(path)
    except OSError:
        partial.unlink(missing_ok=True)
        raise
    _sync_directory(path.parent)


def drop_record(path: Path) -> None:
    if path.exists() or path.is_symlink():
        path.unlink()
        _sync_directory(path.parent)


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_record(
    path: Path,
    manifest_sha: str,
    manifest: Manifest,
    slot: Slot,
    targets: dict[str, SlotTarget],
    state: BootState,
) -> dict[str, int]:
    """The chunks of each image the record says are written, once the record is bound to this
    bundle, slot and layout, and bounded; InstallError with the reason to start over."""
    if path.is_symlink() or not path.is_file():
        raise InstallError("not a regular file")
    with path.open("rb") as handle:
        record = parse_record(handle.read(MAX_RECORD + 1))
    if record.manifest != manifest_sha:
        raise InstallError("it records another bundle")
    if record.slot is not slot:
        raise InstallError(f"it records slot {record.slot.value}, this install writes {slot.value}")
    if not state.slots[slot].incomplete:
        raise InstallError(f"the boot state does not mark slot {slot.value} incomplete")
    if [name for name, _, _ in record.images] != [image.name for image in manifest.images]:
        raise InstallError("its images are not the bundle's")
    done: dict[str, int] = {}
    unfinished = False
    for image, (name, offset, chunks) in zip(manifest.images, record.images, strict=True):
        if offset != targets[name].offset:
            raise InstallError(f"image {name}: another partition (byte offset {offset})")
        if chunks > image.chunk_count:
            raise InstallError(f"image {name}: {chunks} chunks of {image.chunk_count}")
        step = manifest.stream.frame_chunks if manifest.stream is not None else 1
        if chunks % step and chunks != image.chunk_count:
            raise InstallError(f"image {name}: chunk {chunks} does not start a frame")
        if unfinished and chunks:
            raise InstallError(f"image {name}: written before the image ahead of it was done")
        unfinished = unfinished or chunks < image.chunk_count
        done[name] = chunks
    return done


def checked_prefixes(
    fd: int, manifest: Manifest, targets: dict[str, SlotTarget], done: dict[str, int]
) -> dict[str, ResumedPrefix]:
    """zstd-stream: each image's recorded chunks read back from the slot and compared with
    their signed data hashes; the prefix ends at the start of the first frame holding a chunk
    that differs (every later image then starts over too)."""
    assert manifest.stream is not None
    step = manifest.stream.frame_chunks
    prefixes: dict[str, ResumedPrefix] = {}
    for image in manifest.images:
        wanted = done.get(image.name, 0)
        image_hash = hashlib.sha256()
        at_frame = image_hash.copy()
        good = 0
        for chunk in image.chunks[:wanted]:
            if chunk.index % step == 0:
                at_frame = image_hash.copy()
            size = manifest.chunk_data_size(image, chunk.index)
            data = os.pread(
                fd, size, targets[image.name].offset + chunk.index * manifest.chunk_size
            )
            if hashlib.sha256(data).hexdigest() != chunk.data_sha256:  # the slot changed
                good = chunk.index - chunk.index % step
                image_hash = at_frame
                break
            image_hash.update(data)
            good = chunk.index + 1
        prefixes[image.name] = ResumedPrefix(good, image_hash)
        if good < image.chunk_count:
            break
    return prefixes
