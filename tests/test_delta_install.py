"""Delta bundles end to end: `delta create/apply/stats` and `avobuild install` of a delta.

Oracles: slot B after installing the v1->v2 delta holds exactly v2's rootfs image; a refused
install leaves the disk byte-identical; `delta apply` output equals the new image.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest
from conftest import avobuild_cli, write_product

from avobuild.bundle.keys import (
    KeyAlgorithm,
    generate_keypair,
    key_id,
    load_keyring,
    load_private_key,
)
from avobuild.bundle.manifest import BundleType, ImageRef
from avobuild.bundle.reader import BundleReader
from avobuild.bundle.writer import ImageSource, write_bundle
from avobuild.disk.plan import plan_layout
from avobuild.errors import BundleError, RecipeError
from avobuild.image.factory import build_factory_image, build_slot_images
from avobuild.model.layout import Role, Slot
from avobuild.model.recipe import load_recipe
from avobuild.update.install import install_bundle, read_boot_state


def read_range(path: Path, offset: int, size: int) -> bytes:
    with path.open("rb") as handle:
        handle.seek(offset)
        return handle.read(size)


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Factory image and full bundle of 1.0.0, full bundle and rootfs of 2.0.0, the delta."""
    root = tmp_path_factory.mktemp("delta-install")
    v1 = write_product(root / "product", version="1.0.0")
    image = build_factory_image(load_recipe(v1.recipe), root / "out", root / "work1")
    old = root / "v1.avb"
    avobuild_cli("bundle", "create", v1.recipe, "-o", old)
    rng = random.Random(41)
    (v1.rootfs / "etc" / "motd").write_text("version 2\n")
    (v1.rootfs / "new-file.bin").write_bytes(rng.randbytes(150_000))
    v2 = write_product(root / "product", version="2.0.0")
    new = root / "v2.avb"
    avobuild_cli("bundle", "create", v2.recipe, "-o", new)
    rootfs = build_slot_images(load_recipe(v2.recipe), root / "work2")["rootfs"]
    delta = root / "v1-v2.avb"
    avobuild_cli(
        "delta", "create", "--from", old, "--to", new, "-o", delta, "--key", v2.private_key
    )
    return {
        "disk": image.path,
        "old": old,
        "new": new,
        "delta": delta,
        "rootfs": rootfs,
        "keyring": v2.public_key,
        "key": v2.private_key,
        "recipe": v2.recipe,
        "root": root,
    }


def test_delta_bundle_is_signed_small_and_names_its_source(releases: dict[str, Path]) -> None:
    with BundleReader.open(releases["delta"]) as reader:
        reader.verify_signature(load_keyring(releases["keyring"]))
        manifest = reader.manifest
    with BundleReader.open(releases["old"]) as reader:
        old_rootfs = reader.unverified_manifest().image("rootfs")
    assert manifest.type is BundleType.DELTA
    assert manifest.version == "2.0.0"
    image = manifest.image("rootfs")
    assert image is not None and image.source is not None and image.target is not None
    assert old_rootfs is not None
    assert (image.source.size, image.source.sha256) == (old_rootfs.size, old_rootfs.sha256)
    assert image.target.size == releases["rootfs"].stat().st_size
    assert releases["delta"].stat().st_size < releases["new"].stat().st_size / 5


def test_install_delta_writes_slot_b(releases: dict[str, Path], tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    shutil.copyfile(releases["disk"], disk)
    plan = plan_layout(load_recipe(releases["recipe"]).layout)
    system_a, system_b, data = (
        plan.by_role(role) for role in (Role.SYSTEM_A, Role.SYSTEM_B, Role.DATA)
    )
    assert system_a is not None and system_b is not None and data is not None
    before_a = read_range(disk, system_a.offset, system_a.size)
    before_data = read_range(disk, data.offset, data.size)
    avobuild_cli("install", releases["delta"], "--disk", disk, "--keyring", releases["keyring"])
    expected = releases["rootfs"].read_bytes()
    assert read_range(disk, system_b.offset, len(expected)) == expected
    assert read_range(disk, system_a.offset, system_a.size) == before_a
    assert read_range(disk, data.offset, data.size) == before_data
    state = read_boot_state(disk)
    assert state.primary is Slot.B
    assert state.slots[Slot.B].version == "2.0.0"


def test_install_delta_from_a_pipe(releases: dict[str, Path], tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    shutil.copyfile(releases["disk"], disk)
    with releases["delta"].open("rb") as stream:
        result = install_bundle(
            Path("<stdin>"),
            disk,
            releases["keyring"],
            stream=stream,  # type: ignore[arg-type]
        )
    assert result.slot is Slot.B
    plan = plan_layout(load_recipe(releases["recipe"]).layout)
    system_b = plan.by_role(Role.SYSTEM_B)
    assert system_b is not None
    expected = releases["rootfs"].read_bytes()
    assert read_range(disk, system_b.offset, len(expected)) == expected


def test_install_delta_refuses_wrong_source(releases: dict[str, Path], tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    shutil.copyfile(releases["disk"], disk)
    plan = plan_layout(load_recipe(releases["recipe"]).layout)
    system_a = plan.by_role(Role.SYSTEM_A)
    assert system_a is not None
    with disk.open("r+b") as handle:  # one flipped byte in the running rootfs
        handle.seek(system_a.offset + 5000)
        byte = handle.read(1)
        handle.seek(system_a.offset + 5000)
        handle.write(bytes([byte[0] ^ 1]))
    before = disk.read_bytes()
    result = avobuild_cli(
        "install", releases["delta"], "--disk", disk, "--keyring", releases["keyring"], check=False
    )
    assert result.returncode == BundleError.exit_code
    assert "not the source this delta was made from" in result.stderr
    assert "nothing was written" in result.stderr
    assert disk.read_bytes() == before


def test_delta_apply_cli(releases: dict[str, Path], tmp_path: Path) -> None:
    with BundleReader.open(releases["old"]) as reader:
        reader.verify_signature(load_keyring(releases["keyring"]))
        old_rootfs = tmp_path / "old-rootfs.img"
        with old_rootfs.open("wb") as handle:
            for _image, _chunk, data in reader.iter_chunks():
                handle.write(data)
    output = tmp_path / "new-rootfs.img"
    result = avobuild_cli(
        "delta", "apply", releases["delta"], "--keyring", releases["keyring"],
        "--source", f"rootfs={old_rootfs}", "--output", f"rootfs={output}",
    )  # fmt: skip
    assert output.read_bytes() == releases["rootfs"].read_bytes()
    assert "rootfs:" in result.stdout and "OK" in result.stdout
    refused = avobuild_cli(
        "delta", "apply", releases["delta"], "--keyring", releases["keyring"],
        "--source", f"rootfs={output}", "--output", f"rootfs={tmp_path / 'other.img'}",
        check=False,
    )  # fmt: skip
    assert refused.returncode == BundleError.exit_code
    assert not (tmp_path / "other.img").exists()


def test_delta_stats(releases: dict[str, Path]) -> None:
    text = avobuild_cli("delta", "stats", "--from", releases["old"], "--to", releases["new"])
    match = re.fullmatch(
        r"Full size: ([0-9.]+)(MB|KB|B), Delta size: ([0-9.]+)(MB|KB|B) \(([0-9]+)% reduction\)\n",
        text.stdout,
    )
    assert match is not None, text.stdout
    report = json.loads(
        avobuild_cli(
            "delta", "stats", "--from", releases["old"], "--to", releases["new"], "--json"
        ).stdout
    )
    assert report["full_size"] == releases["new"].stat().st_size
    # The measured delta is signed by a throwaway key of the same kind: the same size.
    assert report["delta_size"] == releases["delta"].stat().st_size
    assert report["reduction"] == pytest.approx(
        100 * (1 - report["delta_size"] / report["full_size"]), abs=0.01
    )
    assert int(match.group(5)) == int(report["reduction"])


def test_full_if_larger(tmp_path: Path) -> None:
    """Unrelated random images: the delta cannot win, so the full bundle is written."""
    rng = random.Random(43)
    key = Path(__file__).resolve().parent.parent / "keys-example" / "insecure-example.key.pem"
    bundles = []
    for version in ("1", "2"):
        image = tmp_path / f"rootfs-{version}.img"
        image.write_bytes(rng.randbytes(300_000))
        bundle = tmp_path / f"v{version}.avb"
        avobuild_cli(
            "bundle", "create", "--image", f"rootfs={image}", "--name", "p",
            "--version", version, "--compatible", "dev", "--key", key, "-o", bundle,
        )  # fmt: skip
        bundles.append(bundle)
    output = tmp_path / "d.avb"
    plain = avobuild_cli(
        "delta", "create", "--from", bundles[0], "--to", bundles[1], "-o", output, "--key", key
    )
    assert "not smaller than the full bundle" in plain.stderr
    assert output.read_bytes() != bundles[1].read_bytes()
    fallback = avobuild_cli(
        "delta", "create", "--from", bundles[0], "--to", bundles[1], "-o", output,
        "--key", key, "--full-if-larger",
    )  # fmt: skip
    assert "wrote the full bundle" in fallback.stderr
    assert output.read_bytes() == bundles[1].read_bytes()


def test_delta_bundle_is_reproducible(releases: dict[str, Path], tmp_path: Path) -> None:
    again = tmp_path / "again.avb"
    avobuild_cli(
        "delta", "create", "--from", releases["old"], "--to", releases["new"], "-o", again,
        "--key", releases["key"],
    )  # fmt: skip
    assert again.read_bytes() == releases["delta"].read_bytes()


def _self_signed(key_path: Path, output: Path) -> Path:
    """A self-signed certificate for the key in `key_path` (PEM)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    key = load_private_key(key_path)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "delta-signer")])
    start = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )
    output.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return output


def test_delta_create_takes_every_signing_option(releases: dict[str, Path], tmp_path: Path) -> None:
    """Two keys, a certificate, policy lines and a recipient, as `bundle create` takes them:
    the delta verifies only with both keys' signatures, carries the policy, is encrypted, and
    installs with the recipient's key to exactly the new rootfs."""
    second, second_public = generate_keypair(tmp_path / "k", "second", KeyAlgorithm.ECDSA_P256)
    device, device_public = generate_keypair(tmp_path / "k", "device", KeyAlgorithm.ECDSA_P384)
    certificate = _self_signed(second, tmp_path / "second.crt.pem")
    delta = tmp_path / "rich.avb"
    avobuild_cli(
        "delta", "create", "--from", releases["old"], "--to", releases["new"], "-o", delta,
        "--key", releases["key"], "--key", second, "--certificate", certificate,
        "--keyring", releases["keyring"], "--security-version", "4",
        "--min-applier-version", "0.1", "--expires", "2100-01-01T00:00:00Z",
        "--encrypt-for", device_public,
    )  # fmt: skip
    both = tmp_path / "both.toml"
    both.write_text(f'threshold = 2\nkeys = ["{releases["keyring"]}", "{second_public}"]\n')
    info = json.loads(avobuild_cli("bundle", "info", delta, "--json", "--keyring", both).stdout)
    assert info["type"] == "delta" and len(info["signers"]) == 2
    assert (info["security_version"], info["min_applier_version"], info["expires"]) == (
        4, "0.1", 4102444800
    )  # fmt: skip
    assert info["encryption"] == "aes-256-gcm" and info["manifest_version"] == 2
    assert info["certificates"] == [key_id(load_private_key(second).public_key())]
    disk = tmp_path / "disk.img"
    shutil.copyfile(releases["disk"], disk)
    refused = avobuild_cli("install", delta, "--disk", disk, "--keyring", both, check=False)
    assert refused.returncode == BundleError.exit_code and "encrypted" in refused.stderr
    avobuild_cli("install", delta, "--disk", disk, "--keyring", both, "--decryption-key", device)
    system_b = plan_layout(load_recipe(releases["recipe"]).layout).by_role(Role.SYSTEM_B)
    assert system_b is not None
    expected = releases["rootfs"].read_bytes()
    assert read_range(disk, system_b.offset, len(expected)) == expected
    assert read_boot_state(disk).slots[Slot.B].security_version == 4


def test_delta_create_inherits_the_new_bundles_policy(tmp_path: Path) -> None:
    key = Path(__file__).resolve().parent.parent / "keys-example" / "insecure-example.key.pem"
    image = tmp_path / "rootfs.img"
    image.write_bytes(random.Random(5).randbytes(100_000))
    bundles = []
    for version in ("1", "2"):
        bundle = tmp_path / f"v{version}.avb"
        avobuild_cli(
            "bundle", "create", "--image", f"rootfs={image}", "--name", "p", "--version",
            version, "--compatible", "dev", "--key", key, "-o", bundle,
            "--security-version", version, "--expires", "4000000000",
        )  # fmt: skip
        bundles.append(bundle)
    delta = tmp_path / "d.avb"
    avobuild_cli(
        "delta", "create", "--from", bundles[0], "--to", bundles[1], "-o", delta, "--key", key,
        "--expires", "4100000000",
    )  # fmt: skip
    info = json.loads(avobuild_cli("bundle", "info", delta, "--json").stdout)
    assert (info["security_version"], info["expires"]) == (2, 4100000000)
    missing = avobuild_cli(
        "delta", "create", "--from", bundles[0], "--to", bundles[1], "-o", delta, check=False
    )
    assert missing.returncode == RecipeError.exit_code and "--key, --pkcs11" in missing.stderr


def _signed_delta(tmp_path: Path, name: str, stream: bytes, source: ImageRef, target: ImageRef,
                  key: Path) -> Path:  # fmt: skip
    """A delta bundle around a delta stream written by hand, signed by `key`."""
    path = tmp_path / f"{name}.stream"
    path.write_bytes(stream)
    bundle = tmp_path / f"{name}.avb"
    write_bundle(bundle, [ImageSource("rootfs", path, source=source, target=target)],
                 name="testprod", version="2.0.0", compatible="testprod-x86_64",
                 build_date=0, private_key=load_private_key(key), chunk_size=64 << 10)  # fmt: skip
    return bundle


def _data_stream(payload: bytes, target: bytes) -> tuple[bytes, ImageRef, ImageRef]:
    """A delta from the empty image to `target` in one `data` operation carrying `payload`."""
    import hashlib

    from avobuild.bundle.manifest import EMPTY_SHA256

    source = ImageRef(0, EMPTY_SHA256)
    target_ref = ImageRef(len(target), hashlib.sha256(target).hexdigest())
    text = (
        f"avobuild-delta 1\nsource 0 {EMPTY_SHA256}\ntarget {len(target)} {target_ref.sha256}\n"
        f"data 0 {len(target)} {len(payload)} {target_ref.sha256}\n"
    ).encode()
    return text + payload + b"end 1\n", source, target_ref


@pytest.mark.parametrize("extra", ["trailing bytes", "a second frame", "a skippable frame"])
def test_delta_apply_refuses_a_payload_that_is_more_than_one_frame(
    releases: dict[str, Path], tmp_path: Path, extra: str
) -> None:
    """docs/delta-format.md 2.1: a payload is exactly one zstd frame; anything after it (or a
    skippable frame before it) is refused, and no output is left behind."""
    import struct

    import zstandard

    target = b"".join(b"block %d of the new image\n" % n for n in range(300))
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(target)
    skippable = struct.pack("<II", 0x184D2A50, 4) + b"junk"
    payload = {
        "trailing bytes": frame + b"junk",
        "a second frame": frame + frame,
        "a skippable frame": frame + skippable,
    }[extra]
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    good_stream, source, target_ref = _data_stream(frame, target)
    good = _signed_delta(tmp_path, "good", good_stream, source, target_ref, releases["key"])
    ok = tmp_path / "ok.img"
    avobuild_cli("delta", "apply", good, "--keyring", releases["keyring"],
                 "--source", f"rootfs={empty}", "--output", f"rootfs={ok}")  # fmt: skip
    assert ok.read_bytes() == target
    stream, source, target_ref = _data_stream(payload, target)
    bad = _signed_delta(tmp_path, "bad", stream, source, target_ref, releases["key"])
    output = tmp_path / "out.img"
    refused = avobuild_cli("delta", "apply", bad, "--keyring", releases["keyring"],
                           "--source", f"rootfs={empty}", "--output", f"rootfs={output}",
                           check=False)  # fmt: skip
    assert refused.returncode == BundleError.exit_code
    assert "the operation's payload" in refused.stderr, refused.stderr
    assert not output.exists() and not list(tmp_path.glob(".out.img*"))


def test_a_delta_of_encrypted_bundles_is_encrypted_too(tmp_path: Path) -> None:
    """The delta of an encrypted bundle carries its content: delta create refuses to write it
    in the clear, and with a key it is encrypted and rebuilds the new image."""
    key = Path(__file__).resolve().parent.parent / "keys-example" / "insecure-example.key.pem"
    content_key = tmp_path / "content.key"
    content_key.write_text("ab" * 32 + "\n")
    rng = random.Random(77)
    old_image = rng.randbytes(200_000)
    images = {"1": old_image, "2": old_image[:100_000] + rng.randbytes(1000) + old_image[101_000:]}
    bundles = []
    for version, data in images.items():
        (tmp_path / f"{version}.img").write_bytes(data)
        bundle = tmp_path / f"v{version}.avb"
        avobuild_cli("bundle", "create", "--image", f"rootfs={tmp_path / f'{version}.img'}",
                     "--name", "p", "--version", version, "--compatible", "dev", "--key", key,
                     "--encryption-key", content_key, "-o", bundle)  # fmt: skip
        bundles.append(bundle)
    delta = tmp_path / "d.avb"
    clear = avobuild_cli("delta", "create", "--from", bundles[0], "--to", bundles[1], "-o", delta,
                         "--key", key, "--decryption-key", content_key, check=False)  # fmt: skip
    assert clear.returncode == BundleError.exit_code and "encrypt the delta too" in clear.stderr
    assert not delta.exists()
    avobuild_cli("delta", "create", "--from", bundles[0], "--to", bundles[1], "-o", delta,
                 "--key", key, "--decryption-key", content_key,
                 "--encryption-key", content_key)  # fmt: skip
    output = tmp_path / "new.img"
    public = key.with_name("insecure-example.pub.pem")
    source = tmp_path / "1.img"
    avobuild_cli("delta", "apply", delta, "--keyring", public, "--decryption-key", content_key,
                 "--source", f"rootfs={source}", "--output", f"rootfs={output}")  # fmt: skip
    assert output.read_bytes() == images["2"]
