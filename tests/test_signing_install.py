"""Policy in the signed manifest checked on install, and installs streamed from a pipe.

Oracles: the boot state read back from the disk image, partition bytes compared before and
after, and tracemalloc's peak for the memory bound of a streamed verification.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import threading
import tracemalloc
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from conftest import REPO, avobuild_cli, write_product

from avobuild.bundle.keys import load_keyring, load_private_key
from avobuild.bundle.manifest import Compression, Policy
from avobuild.bundle.reader import BundleReader
from avobuild.bundle.writer import ImageSource, write_bundle
from avobuild.disk.gpt import read_gpt
from avobuild.errors import BundleError, CompatibilityError
from avobuild.image.factory import build_factory_image, build_slot_images
from avobuild.model.layout import Slot
from avobuild.model.recipe import load_recipe
from avobuild.update.install import install_bundle, read_boot_state, write_boot_state

CHUNK = 64 << 10


@dataclass(frozen=True)
class Setup:
    root: Path
    disk: Path
    rootfs: Path
    private_key: Path
    keyring: Path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    root = tmp_path_factory.mktemp("policy")
    product = write_product(root / "product", version="1.0.0")
    image = build_factory_image(load_recipe(product.recipe), root / "out", root / "work1")
    rootfs = build_slot_images(load_recipe(product.recipe), root / "work2")["rootfs"]
    return Setup(root, image.path, rootfs, product.private_key, product.public_key)


def fresh_disk(setup: Setup, tmp_path: Path) -> Path:
    disk = tmp_path / "disk.img"
    shutil.copyfile(setup.disk, disk)
    return disk


def make_bundle(setup: Setup, output: Path, **options: object) -> Path:
    arguments: dict[str, object] = {
        "name": "testprod",
        "version": "2.0.0",
        "compatible": "testprod-x86_64",
        "build_date": 1767225600,
        "private_key": load_private_key(setup.private_key),
        "chunk_size": CHUNK,
        "level": 1,
    }
    arguments.update(options)
    write_bundle(output, [ImageSource("rootfs", setup.rootfs)], **arguments)  # type: ignore[arg-type]
    return output


def partitions(disk: Path) -> dict[str, bytes]:
    """The sha256 of every partition, by label."""
    with disk.open("rb") as handle:
        table = read_gpt(handle)
        hashes = {}
        for part in table.partitions:
            handle.seek(table.offset(part))
            hashes[part.name] = hashlib.sha256(handle.read(table.size(part))).digest()
    return hashes


def refused(setup: Setup, disk: Path, bundle: Path, **options: object) -> BundleError:
    before = hashlib.sha256(disk.read_bytes()).hexdigest()
    with pytest.raises(BundleError) as caught:
        install_bundle(bundle, disk, setup.keyring, **options)  # type: ignore[arg-type]
    assert hashlib.sha256(disk.read_bytes()).hexdigest() == before
    return caught.value


# --- policy ----------------------------------------------------------------------------------


def test_security_version_is_anti_rollback(setup: Setup, tmp_path: Path) -> None:
    disk = fresh_disk(setup, tmp_path)
    five = make_bundle(setup, tmp_path / "five.avb", policy=Policy(security_version=5))
    four = make_bundle(
        setup, tmp_path / "four.avb", version="1.9.0", policy=Policy(security_version=4)
    )
    none = make_bundle(setup, tmp_path / "none.avb", version="1.8.0")
    # Unconfirmed, the floor stays: a failed trial boot may still be followed by an older one.
    install_bundle(five, disk, setup.keyring)
    state = read_boot_state(disk)
    assert (state.security_version, state.slots[Slot.B].security_version) == (0, 5)
    # The trial boot of B fails and the device falls back to A, as its bootloader does.
    write_boot_state(disk, replace(state, primary=Slot.A))
    install_bundle(four, disk, setup.keyring, confirm=True)
    assert read_boot_state(disk).security_version == 4
    result = install_bundle(five, disk, setup.keyring, confirm=True)
    assert result.state.security_version == 5 == read_boot_state(disk).security_version
    error = refused(setup, disk, four)
    assert isinstance(error, CompatibilityError)
    assert "security version 4, lower than 5" in str(error) and "anti-rollback" in str(error)
    assert "security version 0, lower than 5" in str(refused(setup, disk, none))
    install_bundle(five, disk, setup.keyring)
    status = avobuild_cli("status", "--disk", disk, "--json")
    assert json.loads(status.stdout)["security_version"] == 5


def test_compatible_patterns(setup: Setup, tmp_path: Path) -> None:
    disk = fresh_disk(setup, tmp_path)
    for pattern in ("testprod-*", "testprod-x86_6?", "*"):
        bundle = make_bundle(setup, tmp_path / "p.avb", compatible=pattern)
        with BundleReader.open(bundle) as reader:
            assert reader.manifest_bytes.startswith(b"avobuild-manifest 2\n")
        install_bundle(bundle, disk, setup.keyring, confirm=True)
    other = make_bundle(setup, tmp_path / "o.avb", compatible="otherprod-*")
    error = refused(setup, disk, other)
    assert "bundle is for 'otherprod-*' (pattern) but" in str(error)
    assert "'testprod-x86_64'" in str(error)
    with pytest.raises(BundleError, match="compatible: expected"):
        make_bundle(setup, tmp_path / "bad.avb", compatible="testprod-[x]")


def test_min_applier_version_and_expiry(setup: Setup, tmp_path: Path) -> None:
    disk = fresh_disk(setup, tmp_path)
    newer = make_bundle(setup, tmp_path / "n.avb", policy=Policy(min_applier_version="99.1"))
    assert "needs applier version 99.1 or later" in str(refused(setup, disk, newer))
    install_bundle(
        make_bundle(setup, tmp_path / "ok.avb", policy=Policy(min_applier_version="0.1")),
        disk,
        setup.keyring,
        confirm=True,
    )
    expiring = make_bundle(setup, tmp_path / "e.avb", policy=Policy(expires=1800000000))
    error = refused(setup, disk, expiring, now=1800000001)
    assert "expired at 1800000000" in str(error)
    install_bundle(expiring, disk, setup.keyring, now=1800000000)
    with pytest.raises(BundleError, match="min-applier-version: expected"):
        make_bundle(setup, tmp_path / "x.avb", policy=Policy(min_applier_version="1.02"))


def test_policy_lines_are_signed_and_shown(setup: Setup, tmp_path: Path) -> None:
    bundle = tmp_path / "cli.avb"
    avobuild_cli(
        "bundle", "create", "--image", f"rootfs={setup.rootfs}", "--name", "testprod",
        "--version", "3.0", "--compatible", "testprod-*", "--key", setup.private_key,
        "--security-version", "7", "--min-applier-version", "0.1", "--expires",
        "2030-01-01T00:00:00Z", "-o", bundle,
    )  # fmt: skip
    with BundleReader.open(bundle) as reader:
        reader.verify_signature(load_keyring(setup.keyring))
        text = reader.manifest_bytes.decode()
        policy = reader.manifest.policy
    assert policy == Policy(7, "0.1", 1893456000)
    assert "build-date 1767225600\nsecurity-version 7\nmin-applier-version 0.1\n" in text
    assert "expires 1893456000\nchunk-size" in text
    info = avobuild_cli("bundle", "info", bundle).stdout
    assert "security version: 7" in info and "expires:     1893456000" in info


# --- streaming -------------------------------------------------------------------------------


def test_install_from_a_pipe(setup: Setup, tmp_path: Path) -> None:
    disk = fresh_disk(setup, tmp_path)
    bundle = make_bundle(setup, tmp_path / "s.avb")
    before = partitions(disk)
    with bundle.open("rb") as stdin:
        result = subprocess.run(
            [str(REPO / ".venv/bin/avobuild"), "install", "-", "--disk", str(disk), "--keyring",
             str(setup.keyring)],
            stdin=stdin, capture_output=True, text=True, check=False,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "installed 2.0.0 into slot B" in result.stdout
    after = partitions(disk)
    changed = {label for label in before if before[label] != after[label]}
    assert changed == {"system-b", "boot"}
    expected = setup.rootfs.read_bytes()
    with disk.open("rb") as handle:
        table = read_gpt(handle)
        part = table.find("system-b")
        assert part is not None
        handle.seek(table.offset(part))
        assert handle.read(len(expected)) == expected
    assert read_boot_state(disk).primary is Slot.B


def test_refused_streaming_install_leaves_running_slot_and_data(
    setup: Setup, tmp_path: Path
) -> None:
    """A chunk tampered with late in the stream: earlier chunks already reached slot B, which
    the boot state marked incomplete before the first of them; slot A, its boot entry and the
    data partition are untouched and A still boots."""
    disk = fresh_disk(setup, tmp_path)
    data = bytearray(make_bundle(setup, tmp_path / "s.avb").read_bytes())
    data[-100] ^= 0x10
    before = partitions(disk)
    state_before = read_boot_state(disk)
    with pytest.raises(BundleError, match="sha256 mismatch"):
        install_bundle(Path("<stdin>"), disk, setup.keyring, stream=io.BytesIO(bytes(data)))
    after = partitions(disk)
    for label in before:
        if label not in ("system-b", "boot"):
            assert before[label] == after[label], label
    assert read_boot_state(disk) == state_before.with_incomplete(Slot.B)
    assert "slot B: (incomplete" in avobuild_cli("status", "--disk", disk).stdout
    # Refused before the first write: a bad signature writes nothing at all.
    data = bytearray(make_bundle(setup, tmp_path / "s.avb").read_bytes())
    data[40] ^= 0x01
    with pytest.raises(BundleError):
        install_bundle(Path("<stdin>"), disk, setup.keyring, stream=io.BytesIO(bytes(data)))
    assert partitions(disk) == after


def test_verify_from_standard_input(setup: Setup, tmp_path: Path) -> None:
    bundle = make_bundle(setup, tmp_path / "s.avb")
    with bundle.open("rb") as stdin:
        result = subprocess.run(
            [str(REPO / ".venv/bin/avobuild"), "bundle", "verify", "-", "--keyring",
             str(setup.keyring)],
            stdin=stdin, capture_output=True, text=True, check=False,
        )  # fmt: skip
    assert result.returncode == 0 and result.stdout.startswith("<stdin>: OK: testprod 2.0.0")
    truncated = bundle.read_bytes()[:-10]
    result = subprocess.run(
        [str(REPO / ".venv/bin/avobuild"), "bundle", "verify", "-", "--keyring",
         str(setup.keyring)],
        input=truncated, capture_output=True, check=False,
    )  # fmt: skip
    assert result.returncode == BundleError.exit_code and b"truncated" in result.stderr


def test_streamed_verification_memory_is_bounded_by_a_chunk(setup: Setup, tmp_path: Path) -> None:
    """48 MiB of images through a pipe in 1 MiB chunks: the peak stays a few chunks."""
    image = tmp_path / "big.img"
    rng = random.Random(6)
    with image.open("wb") as handle:
        for _ in range(48):
            handle.write(rng.randbytes(1 << 19) + bytes(1 << 19))
    bundle = tmp_path / "big.avb"
    write_bundle(bundle, [ImageSource("rootfs", image)], name="p", version="1",
                 compatible="c", build_date=0, private_key=load_private_key(setup.private_key),
                 chunk_size=1 << 20, level=1, compression=Compression.ZSTD)  # fmt: skip
    keyring = load_keyring(setup.keyring)
    read_end, write_end = os.pipe()

    def feed() -> None:
        with bundle.open("rb") as source, open(write_end, "wb") as sink:
            shutil.copyfileobj(source, sink, 1 << 16)

    feeder = threading.Thread(target=feed)
    feeder.start()
    tracemalloc.start()
    try:
        with open(read_end, "rb", buffering=0) as pipe:
            reader = BundleReader.from_stream(pipe)
            reader.verify_signature(keyring)
            reader.verify_payload()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        feeder.join()
    assert peak < 6 << 20, f"peak {peak} bytes for 48 MiB of images"


def test_encrypted_bundle_installs_only_with_its_key(setup: Setup, tmp_path: Path) -> None:
    disk = fresh_disk(setup, tmp_path)
    key = bytes(range(32))
    bundle = make_bundle(setup, tmp_path / "enc.avb", encryption_key=key)
    error = refused(setup, disk, bundle)
    assert "payload is encrypted" in str(error)
    with bundle.open("rb") as stream:
        install_bundle(Path("<stdin>"), disk, setup.keyring, stream=stream, decryption=key)
    expected = setup.rootfs.read_bytes()
    with disk.open("rb") as handle:
        table = read_gpt(handle)
        part = table.find("system-b")
        assert part is not None
        handle.seek(table.offset(part))
        assert handle.read(len(expected)) == expected


def test_bundle_verify_judges_the_policy_it_can_and_says_what_it_did_not(
    setup: Setup, tmp_path: Path
) -> None:
    bundle = make_bundle(setup, tmp_path / "p.avb", compatible="testprod-*",
                         policy=Policy(security_version=3, min_applier_version="0.1",
                                       expires=4000000000))  # fmt: skip
    plain = avobuild_cli("bundle", "verify", bundle, "--keyring", setup.keyring).stdout
    assert plain.startswith(f"{bundle}: OK: testprod 2.0.0")
    assert "policy expires 4000000000: checked (not expired at" in plain
    assert "policy security-version 3: NOT checked (no security floor was given)" in plain
    assert "policy min-applier-version 0.1: NOT checked" in plain
    assert "policy compatible testprod-*: NOT checked" in plain
    floor = avobuild_cli("bundle", "verify", bundle, "--keyring", setup.keyring,
                         "--security-floor", "3").stdout  # fmt: skip
    assert "policy security-version 3: checked (not below 3)" in floor
    below = avobuild_cli("bundle", "verify", bundle, "--keyring", setup.keyring,
                         "--security-floor", "4", check=False)  # fmt: skip
    assert below.returncode == CompatibilityError.exit_code and ": OK" not in below.stdout
    assert "security version 3, lower than 4" in below.stderr
    expired = make_bundle(setup, tmp_path / "e.avb", policy=Policy(expires=1700000000))
    refused = avobuild_cli("bundle", "verify", expired, "--keyring", setup.keyring, check=False)
    assert refused.returncode == CompatibilityError.exit_code
    assert "expired at 1700000000" in refused.stderr and refused.stdout == ""


def test_version_order_is_dpkgs(tmp_path: Path) -> None:
    """docs/bundle-format.md 3.7: the downgrade check orders versions as dpkg does (whole
    strings, no epoch or revision); dpkg itself is the oracle on seeded random versions."""
    import random

    from avobuild.update.policy import compare_versions

    rng = random.Random(1207)
    alphabet = "0123456789.~+abZ"
    pairs = [("1.0~rc1", "1.0"), ("1.0", "1.0.0"), ("1.9", "1.10"), ("1.01", "1.1")]
    for _ in range(150):
        pairs.append(tuple(  # type: ignore[arg-type]
            str(rng.randrange(3)) + "".join(rng.choice(alphabet) for _ in range(rng.randrange(7)))
            for _ in range(2)
        ))  # fmt: skip
    for left, right in pairs:
        dpkg = [
            subprocess.run(["dpkg", "--compare-versions", left, relation, right],
                           check=False).returncode == 0
            for relation in ("lt", "eq")
        ]  # fmt: skip
        expected = -1 if dpkg[0] else 0 if dpkg[1] else 1
        assert compare_versions(left, right) == expected, (left, right)
