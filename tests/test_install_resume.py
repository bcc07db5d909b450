"""An interrupted full install resumes: the host installer and the on-device shell applier.

Each installer is killed for real (SIGKILL) in the middle of writing slot B, then run again:
the slot must then hold the image byte for byte, the second run must have written fewer bytes
than the image (counted as they are written), and a record that is hostile, stale or names
another bundle or slot must make it start over, never write out of bounds.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from test_applier_device import Device, Setup, build_setup, read_range

from avobuild.boot.state import SlotState
from avobuild.bundle.keys import load_private_key
from avobuild.bundle.manifest import Compression, StreamParameters
from avobuild.bundle.reader import BundleReader
from avobuild.bundle.writer import ImageSource, write_bundle
from avobuild.model.layout import Role, Slot
from avobuild.update.install import install_bundle, read_boot_state, write_boot_state
from avobuild.update.resume import parse_record, record_path, render_record

CHUNK = 65536
FRAME = 4


def _image() -> bytes:
    """40 chunks (10 frames): seeded random runs between compressible ones, so that the
    frames are real zstd streams and a slot of it is quick to write in busybox."""
    rng = random.Random(20261202)
    parts = [rng.randbytes(40_000) + bytes(rng.randrange(1, 90_000)) for _ in range(40)]
    return b"".join(parts)[: 40 * CHUNK - 1234]


IMAGE = _image()

# Runs the host installer in a child process that SIGKILLs itself after its N-th chunk write.
KILLER = """
import os, signal, sys
from pathlib import Path
from avobuild.update.install import install_bundle
limit, writes = int(sys.argv[4]), [0]
def progress(step, done, total):
    if step == "writing":
        writes[0] += 1
        if writes[0] >= limit:
            os.kill(os.getpid(), signal.SIGKILL)
install_bundle(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), progress=progress)
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    return build_setup(tmp_path_factory.mktemp("applier"))


@pytest.fixture(scope="module")
def bundles(setup: Setup, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """IMAGE as a zstd-stream bundle (frames of 4 chunks of 64 KiB), a version 1
    (`zstd`) one, and another zstd-stream bundle of the same image (another manifest)."""
    root = tmp_path_factory.mktemp("resume-bundles")
    image = root / "rootfs.img"
    image.write_bytes(IMAGE)
    with BundleReader.open(setup.bundle) as reader:
        manifest = reader.unverified_manifest()
    key = load_private_key(setup.keyring.with_name("bundle-signing.key.pem"))
    made: dict[str, Path] = {}
    for name, compression, version in (
        ("stream", Compression.ZSTD_STREAM, "2.0.0"),
        ("v1", Compression.ZSTD, "2.0.0"),
        ("other", Compression.ZSTD_STREAM, "2.0.1"),
    ):
        made[name] = root / f"{name}.avb"
        write_bundle(
            made[name],
            [ImageSource("rootfs", image)],
            name=manifest.name,
            version=version,
            compatible=manifest.compatible,
            build_date=1767225600,
            private_key=key,
            chunk_size=CHUNK,
            compression=compression,
            stream=StreamParameters(frame_chunks=FRAME, window_log=18),
        )
    return made


def _slot_b(setup: Setup, disk: Path) -> bytes:
    part = setup.plan.by_role(Role.SYSTEM_B)
    assert part is not None
    return read_range(disk, part.offset, len(IMAGE))


def _chunks() -> int:
    return -(-len(IMAGE) // CHUNK)


# --- the host installer ---------------------------------------------------------------------


def _killed_host_install(setup: Setup, bundle: Path, disk: Path, after: int) -> None:
    shutil.copyfile(setup.factory, disk)
    result = subprocess.run(
        [sys.executable, "-c", KILLER, str(bundle), str(disk), str(setup.keyring), str(after)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert read_boot_state(disk).slots[Slot.B].incomplete


@pytest.mark.parametrize("kind", ["stream", "v1"])
def test_host_install_killed_mid_write_resumes(
    setup: Setup, bundles: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    chunks = _chunks()
    assert chunks >= 4 * FRAME, f"the slot image has only {chunks} chunks"
    disk = tmp_path / "disk.img"
    after = chunks // 2 + 1
    _killed_host_install(setup, bundles[kind], disk, after)
    record = parse_record(record_path(disk).read_bytes())
    recorded = record.images[0][2]
    assert record.slot is Slot.B and 0 < recorded < after, record
    if kind == "stream":
        assert recorded % FRAME == 0
    data_a = read_range(disk, *_span(setup, Role.SYSTEM_A))

    steps: list[str] = []
    result = install_bundle(
        bundles[kind], disk, setup.keyring, progress=lambda step, _d, _t: steps.append(step)
    )
    assert f"resuming at chunk {recorded} of image rootfs" in steps
    assert _slot_b(setup, disk) == IMAGE
    assert read_range(disk, *_span(setup, Role.SYSTEM_A)) == data_a
    assert result.written["rootfs"] < len(IMAGE)
    assert result.resumed["rootfs"] >= recorded
    if kind == "stream":
        assert result.written["rootfs"] == len(IMAGE) - recorded * CHUNK
    assert not record_path(disk).exists(), "a finished install drops its record"
    assert read_boot_state(disk).primary is Slot.B


def _span(setup: Setup, role: Role) -> tuple[int, int]:
    part = setup.plan.by_role(role)
    assert part is not None
    return part.offset, part.size


def _hostile_records(setup: Setup, bundles: dict[str, Path], good: bytes) -> dict[str, bytes]:
    record = parse_record(good)
    name, offset, done = record.images[0]
    chunks = _chunks()

    def with_image(value: str) -> bytes:
        return good.replace(f"image {name} {offset} {done}".encode(), value.encode())

    with BundleReader.open(bundles["other"]) as reader:
        other = hashlib.sha256(reader.manifest_bytes).hexdigest()
    return {
        "another-bundle": good.replace(record.manifest.encode(), other.encode()),
        "another-slot": good.replace(b"slot B", b"slot A"),
        "past-the-image": with_image(f"image {name} {offset} {chunks + FRAME}"),
        "huge-count": with_image(f"image {name} {offset} 9223372036854775807"),
        "over-2-63": with_image(f"image {name} {offset} 9223372036854775808"),
        "not-a-frame-start": with_image(f"image {name} {offset} {done + 1}"),
        "another-partition": with_image(f"image {name} {offset + CHUNK} {done}"),
        "leading-zero": with_image(f"image {name} {offset} 0{done}"),
        "another-image": with_image(f"image kernel {offset} {done}"),
        "extra-line": good + b"image rootfs 0 0\n",
        "no-newline": good[:-1],
        "binary": b"\x00\xff" * 100,
        "huge": good + b"#" * 70000 + b"\n",
        "empty": b"",
    }


def test_host_install_hostile_records_start_over(
    setup: Setup, bundles: dict[str, Path], tmp_path: Path
) -> None:
    disk = tmp_path / "disk.img"
    after = _chunks() // 2 + 1
    _killed_host_install(setup, bundles["stream"], disk, after)
    killed = disk.read_bytes()
    good = record_path(disk).read_bytes()
    for case, content in _hostile_records(setup, bundles, good).items():
        disk.write_bytes(killed)
        record_path(disk).write_bytes(content)
        result = install_bundle(bundles["stream"], disk, setup.keyring)
        assert result.resumed == {}, case
        assert result.resume_refused is not None and "starting over" in result.resume_refused
        assert result.written["rootfs"] == len(IMAGE), case
        assert _slot_b(setup, disk) == IMAGE, case
        assert not record_path(disk).exists(), case
    # A record that is a symlink is not followed.
    disk.write_bytes(killed)
    target = tmp_path / "elsewhere"
    target.write_bytes(good)
    record_path(disk).symlink_to(target)
    result = install_bundle(bundles["stream"], disk, setup.keyring)
    assert result.resumed == {} and target.read_bytes() == good


def test_host_install_without_a_place_for_the_record(
    setup: Setup, bundles: dict[str, Path], tmp_path: Path
) -> None:
    """Where the record cannot be written (here a directory holds its name), the install goes
    on without one and leaves nothing behind."""
    disk = tmp_path / "disk.img"
    shutil.copyfile(setup.factory, disk)
    record_path(disk).mkdir()
    result = install_bundle(bundles["stream"], disk, setup.keyring)
    assert result.resume_refused is not None and "not a regular file" in result.resume_refused
    assert _slot_b(setup, disk) == IMAGE
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "disk.img",
        "disk.img.avobuild-resume",
    ]


def test_host_install_rechecks_the_written_frames(
    setup: Setup, bundles: dict[str, Path], tmp_path: Path
) -> None:
    """A byte of slot B changed after the cut (in the second frame): the install resumes at
    that frame's start, not where the record says; a record of a slot that is no longer
    incomplete (another install finished since) starts over."""
    disk = tmp_path / "disk.img"
    _killed_host_install(setup, bundles["stream"], disk, 3 * FRAME + 2)
    assert parse_record(record_path(disk).read_bytes()).images[0][2] == 3 * FRAME
    offset, _ = _span(setup, Role.SYSTEM_B)
    with disk.open("r+b") as handle:
        handle.seek(offset + FRAME * CHUNK + 5)
        byte = handle.read(1)
        handle.seek(offset + FRAME * CHUNK + 5)
        handle.write(bytes([byte[0] ^ 0xFF]))
    result = install_bundle(bundles["stream"], disk, setup.keyring)
    assert result.resumed == {"rootfs": FRAME}
    assert _slot_b(setup, disk) == IMAGE

    # The boot state no longer marks slot B incomplete: the record is stale.
    _killed_host_install(setup, bundles["stream"], disk, 3 * FRAME + 2)
    state = read_boot_state(disk)
    slots = {**state.slots, Slot.B: SlotState(ok=False, tries=0, version="")}
    write_boot_state(disk, replace(state, slots=slots))
    result = install_bundle(bundles["stream"], disk, setup.keyring)
    assert result.resumed == {} and result.resume_refused is not None
    assert "incomplete" in result.resume_refused
    assert _slot_b(setup, disk) == IMAGE

    # Another install finished into slot B since: the next install writes slot A.
    _killed_host_install(setup, bundles["stream"], disk, 3 * FRAME + 2)
    kept = record_path(disk).read_bytes()
    install_bundle(bundles["other"], disk, setup.keyring, confirm=True)
    record_path(disk).write_bytes(kept)
    # slot B now holds 2.0.1 and is confirmed; slot A is the target of the next install
    result = install_bundle(bundles["stream"], disk, setup.keyring, allow_downgrade=True)
    assert result.slot is Slot.A and result.resumed == {}
    assert result.resume_refused is not None


# --- the shell applier on the simulated device ---------------------------------------------


def _device_cut(device: Device, bundle: Path, after: int, *, streaming: bool) -> None:
    counter = device.root / "n"
    counter.unlink(missing_ok=True)
    extra = {"AVO_TEST_KILL_AFTER": str(after), "AVO_TEST_COUNTER": str(counter)}
    source: list[str | Path] = ["-"] if streaming else ["--bundle", bundle]
    result = device.run(
        "apply",
        "--target",
        "inactive",
        *source,
        stdin=bundle.read_bytes() if streaming else None,
        check=False,
        **extra,
    )
    assert result.returncode == -signal.SIGKILL, result.stdout + result.stderr


def _device_apply(device: Device, bundle: Path, *, streaming: bool = False) -> tuple[str, int]:
    """Apply uninterrupted; (its messages, the bytes it wrote to slots)."""
    written = device.root / "written"
    written.unlink(missing_ok=True)
    source: list[str | Path] = ["-"] if streaming else ["--bundle", bundle]
    result = device.run(
        "apply",
        "--target",
        "inactive",
        *source,
        stdin=bundle.read_bytes() if streaming else None,
        AVO_TEST_WRITTEN=str(written),
    )
    return result.stderr, int(written.read_text()) if written.exists() else 0


def _steps(setup: Setup, bundle: Path, tmp_path: Path) -> int:
    """The write steps (checkpoints) of one uninterrupted apply."""
    probe = Device(setup, tmp_path / "probe")
    counter = probe.root / "n"
    probe.run(
        "apply",
        "--target",
        "inactive",
        "--bundle",
        bundle,
        AVO_TEST_KILL_AFTER="1000000",
        AVO_TEST_COUNTER=str(counter),
    )
    assert not (probe.state / "resume").exists(), "a finished apply drops its record"
    return int(counter.read_text())


@pytest.mark.parametrize(
    ("kind", "streaming"), [("stream", True), ("stream", False), ("v1", False)]
)
def test_device_apply_killed_mid_write_resumes(
    setup: Setup, bundles: dict[str, Path], tmp_path: Path, kind: str, streaming: bool
) -> None:
    bundle = bundles[kind]
    total = _steps(setup, bundle, tmp_path)
    device = Device(setup, tmp_path / "device")
    data = device.partition(Role.DATA)
    system_a = device.partition(Role.SYSTEM_A)
    _device_cut(device, bundle, total * 2 // 3, streaming=streaming)
    record = parse_record((device.state / "resume").read_bytes())
    recorded = record.images[0][2]
    assert record.slot is Slot.B and recorded > 0, record
    messages, written = _device_apply(device, bundle)
    assert f"resuming image rootfs at chunk {recorded} of {_chunks()}" in messages
    assert device.partition(Role.SYSTEM_B)[: len(IMAGE)] == IMAGE
    assert 0 < written < len(IMAGE), written
    if kind == "stream":
        assert written == len(IMAGE) - recorded * CHUNK
    assert not (device.state / "resume").exists()
    assert device.partition(Role.DATA) == data and device.partition(Role.SYSTEM_A) == system_a
    device.run("commit")
    assert device.reboot() is Slot.B


def test_device_hostile_records_start_over(
    setup: Setup, bundles: dict[str, Path], tmp_path: Path
) -> None:
    bundle = bundles["stream"]
    total = _steps(setup, bundle, tmp_path)
    device = Device(setup, tmp_path / "device")
    _device_cut(device, bundle, total * 2 // 3, streaming=True)
    killed = device.disk.read_bytes()
    grubenv = device.grubenv.read_bytes()
    good = (device.state / "resume").read_bytes()
    _, full = _device_apply(Device(setup, tmp_path / "reference"), bundle)
    assert full == len(IMAGE)
    for case, content in _hostile_records(setup, bundles, good).items():
        device.disk.write_bytes(killed)
        device.grubenv.write_bytes(grubenv)
        (device.state / "resume").write_bytes(content)
        messages, written = _device_apply(device, bundle, streaming=True)
        assert "resume record not used" in messages and "starting over" in messages, case
        assert written == len(IMAGE), case
        assert device.partition(Role.SYSTEM_B)[: len(IMAGE)] == IMAGE
        assert not (device.state / "resume").exists(), case
    # The slot changed in its second frame after the cut: resumed at that frame's start.
    device.disk.write_bytes(killed)
    device.grubenv.write_bytes(grubenv)
    (device.state / "resume").write_bytes(good)
    offset, _ = _span(setup, Role.SYSTEM_B)
    with device.disk.open("r+b") as handle:
        handle.seek(offset + FRAME * CHUNK + 5)
        byte = handle.read(1)
        handle.seek(offset + FRAME * CHUNK + 5)
        handle.write(bytes([byte[0] ^ 0xFF]))
    messages, written = _device_apply(device, bundle)
    assert f"resuming at chunk {FRAME}" in messages
    assert written == len(IMAGE) - FRAME * CHUNK
    assert device.partition(Role.SYSTEM_B)[: len(IMAGE)] == IMAGE


def test_record_round_trip() -> None:
    text = b"avobuild-resume 1\nmanifest " + b"a" * 64 + b"\nslot B\nimage rootfs 1048576 8\n"
    record = parse_record(text)
    assert render_record(record) == text
    assert os.path.basename(record_path(Path("/x/disk.img"))) == "disk.img.avobuild-resume"
