"""Host-side install: the reference applier. Refusals leave the disk byte-identical."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import avobuild_cli, file_sha256, write_product

from avobuild.bundle.keys import generate_keypair
from avobuild.disk.plan import plan_layout
from avobuild.errors import BundleError, CompatibilityError, SignatureError
from avobuild.image.factory import build_factory_image, build_slot_images
from avobuild.model.layout import Role, Slot
from avobuild.model.recipe import load_recipe
from avobuild.update.install import install_bundle, read_boot_state


def read_range(path: Path, offset: int, size: int) -> bytes:
    with path.open("rb") as handle:
        handle.seek(offset)
        return handle.read(size)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A factory image of version 1.0.0 and a CLI-built full bundle of version 2.0.0."""
    root = tmp_path_factory.mktemp("install")
    v1 = write_product(root / "product", version="1.0.0")
    image = build_factory_image(load_recipe(v1.recipe), root / "out", root / "work1")
    (v1.rootfs / "etc" / "motd").write_text("version 2\n")
    v2 = write_product(root / "product", version="2.0.0")
    bundle = root / "out" / "v2.avb"
    avobuild_cli("bundle", "create", v2.recipe, "-o", bundle)
    slot = build_slot_images(load_recipe(v2.recipe), root / "work2")["rootfs"]
    return {
        "disk": image.path,
        "bundle": bundle,
        "keyring": v1.public_key,
        "recipe": v2.recipe,
        "rootfs": slot,
        "root": root,
    }


def fresh_disk(setup: dict[str, Path], tmp_path: Path) -> Path:
    disk = tmp_path / "disk.img"
    shutil.copyfile(setup["disk"], disk)
    return disk


def test_install_writes_inactive_slot_and_switches(setup: dict[str, Path], tmp_path: Path) -> None:
    disk = fresh_disk(setup, tmp_path)
    plan = plan_layout(load_recipe(setup["recipe"]).layout)
    untouched = {
        role: read_range(disk, part.offset, part.size)
        for role in (Role.SYSTEM_A, Role.DATA, Role.RECOVERY)
        if (part := plan.by_role(role)) is not None
    }
    result = install_bundle(setup["bundle"], disk, setup["keyring"])
    assert (result.slot, result.previous, result.version) == (Slot.B, Slot.A, "2.0.0")
    system_b = plan.by_role(Role.SYSTEM_B)
    assert system_b is not None
    expected = setup["rootfs"].read_bytes()
    assert read_range(disk, system_b.offset, len(expected)) == expected
    for role, before in untouched.items():
        part = plan.by_role(role)
        assert part is not None
        assert read_range(disk, part.offset, part.size) == before, role
    state = read_boot_state(disk)
    assert state.primary is Slot.B
    assert state.slots[Slot.B].version == "2.0.0"
    assert not state.slots[Slot.B].ok and state.slots[Slot.B].tries == 3
    assert state.slots[Slot.A].ok and state.slots[Slot.A].version == "1.0.0"
    # The slot just written mounts as a clean filesystem with the new content.
    raw = tmp_path / "b.img"
    raw.write_bytes(read_range(disk, system_b.offset, system_b.size))
    subprocess.run(["e2fsck", "-fn", str(raw)], check=True, capture_output=True)
    motd = subprocess.run(
        ["debugfs", "-R", "cat /etc/motd", str(raw)], capture_output=True, check=True
    ).stdout
    assert motd == b"version 2\n"
    # The ESP is still a clean FAT filesystem after the boot state was rewritten.
    boot = plan.by_role(Role.BOOT)
    assert boot is not None
    esp = tmp_path / "esp.img"
    esp.write_bytes(read_range(disk, boot.offset, boot.size))
    subprocess.run(["fsck.vfat", "-n", str(esp)], check=True, capture_output=True)


def test_second_install_goes_back_to_a(setup: dict[str, Path], tmp_path: Path) -> None:
    disk = fresh_disk(setup, tmp_path)
    install_bundle(setup["bundle"], disk, setup["keyring"], confirm=True)
    state = read_boot_state(disk)
    assert state.primary is Slot.B and state.slots[Slot.B].ok
    result = install_bundle(setup["bundle"], disk, setup["keyring"])
    assert result.slot is Slot.A
    assert read_boot_state(disk).slots[Slot.B].ok


def _refused(setup: dict[str, Path], tmp_path: Path, bundle: Path, keyring: Path) -> Exception:
    disk = fresh_disk(setup, tmp_path)
    before = file_sha256(disk)
    with pytest.raises(BundleError) as error:
        install_bundle(bundle, disk, keyring)
    assert file_sha256(disk) == before, "a refused bundle changed the disk"
    return error.value


@pytest.mark.parametrize("seed", range(6))
def test_flipped_byte_refused_disk_unchanged(
    setup: dict[str, Path], tmp_path: Path, seed: int
) -> None:
    data = bytearray(setup["bundle"].read_bytes())
    rng = random.Random(seed)
    # Seeds 0-1 hit the header/manifest/signature region, the rest the payload.
    payload_start = 34 + int(data[12:22]) + int(data[23:33])
    position = (
        rng.randrange(0, payload_start) if seed < 2 else rng.randrange(payload_start, len(data))
    )
    data[position] ^= 1 << rng.randrange(8)
    bad = tmp_path / "bad.avb"
    bad.write_bytes(bytes(data))
    _refused(setup, tmp_path, bad, setup["keyring"])


def test_truncated_bundle_refused(setup: dict[str, Path], tmp_path: Path) -> None:
    data = setup["bundle"].read_bytes()
    bad = tmp_path / "short.avb"
    bad.write_bytes(data[: len(data) - 1000])
    error = _refused(setup, tmp_path, bad, setup["keyring"])
    assert "truncated" in str(error)


def test_untrusted_key_refused(setup: dict[str, Path], tmp_path: Path) -> None:
    _private, public = generate_keypair(tmp_path / "other")
    error = _refused(setup, tmp_path, setup["bundle"], public)
    assert isinstance(error, SignatureError)


def test_other_compatible_refused(setup: dict[str, Path], tmp_path: Path) -> None:
    other = tmp_path / "other.avb"
    avobuild_cli(
        "bundle", "create", "--image", f"rootfs={setup['rootfs']}",
        "--name", "testprod", "--version", "3.0.0", "--compatible", "another-board",
        "--key", setup["root"] / "product" / "keys" / "bundle-signing.key.pem",
        "-o", other,
    )  # fmt: skip
    error = _refused(setup, tmp_path, other, setup["keyring"])
    assert isinstance(error, CompatibilityError)
    assert "another-board" in str(error) and "testprod-x86_64" in str(error)


def test_image_too_big_for_slot_refused(setup: dict[str, Path], tmp_path: Path) -> None:
    big = tmp_path / "big.img"
    with big.open("wb") as handle:
        handle.truncate(64 << 20)
    bundle = tmp_path / "big.avb"
    avobuild_cli(
        "bundle", "create", "--image", f"rootfs={big}",
        "--name", "testprod", "--version", "3.0.0", "--compatible", "testprod-x86_64",
        "--key", setup["root"] / "product" / "keys" / "bundle-signing.key.pem",
        "-o", bundle,
    )  # fmt: skip
    error = _refused(setup, tmp_path, bundle, setup["keyring"])
    assert "larger than partition system-b" in str(error)


def test_install_command_line(setup: dict[str, Path], tmp_path: Path) -> None:
    disk = fresh_disk(setup, tmp_path)
    result = avobuild_cli("install", setup["bundle"], "--disk", disk, "--keyring", setup["keyring"])
    assert "installed 2.0.0 into slot B (previous: A)" in result.stdout
    status = avobuild_cli("status", "--disk", disk, "--json")
    assert '"primary": "B"' in status.stdout
    other = write_product(tmp_path / "x")
    refused = avobuild_cli(
        "install", setup["bundle"], "--disk", disk, "--keyring", other.public_key, check=False
    )
    assert refused.returncode == 7
    assert "Traceback" not in refused.stderr


def test_one_slot_resolution_for_installer_and_renderer(setup: dict[str, Path]) -> None:
    """The installer (reading the disk's partition table and its record, or the layout) and
    the applier renderer (placing the layout) resolve every bundle image of every slot to the
    same partition."""
    from avobuild.applier.render import slot_partitions
    from avobuild.disk.record import read_disk_roles
    from avobuild.update.target import slot_target

    recipe = load_recipe(setup["recipe"])
    rendered = {(part.image, part.slot): part for part in slot_partitions(recipe)}
    assert set(rendered) == {("rootfs", "A"), ("rootfs", "B")}
    for (image, slot), part in rendered.items():
        for layout in (None, recipe.layout):
            roles = read_disk_roles(setup["disk"], layout)
            assert roles.source == ("disk record" if layout is None else f"layout {layout.path}")
            target = slot_target(roles, image, Slot(slot))
            assert (target.label, target.offset, target.size) == (
                part.label, part.offset, part.size
            )  # fmt: skip
    roles = read_disk_roles(setup["disk"])
    with pytest.raises(CompatibilityError, match="known images: rootfs, kernel, extensions"):
        slot_target(roles, "firmware", Slot.B)
    with pytest.raises(CompatibilityError, match="needs a partition with role 'kernel-b'"):
        slot_target(roles, "kernel", Slot.B)
