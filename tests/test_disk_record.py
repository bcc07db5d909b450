"""A disk describes itself: `status` and `install` find the slots of an avobuild-made disk
without --layout, on a GPT with labels that are not role names and on an MBR with logical
partitions; the applier's PARTUUIDs are what sfdisk reads from the built image."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, Product, avobuild_cli, write_product

from avobuild.disk.record import RECORD_PATH, read_disk_roles
from avobuild.model.layout import Role

GPT_CUSTOM = """\
[disk]
table = "gpt"

[partition.esp]
role = "boot"
type = "esp"
filesystem = "vfat"
size = "34M"

[partition.root_a]
role = "system-a"
type = "root-x86-64"
filesystem = "ext4"
size = "24M"
uuid = "3c5f6e2a-8d47-4b1e-9f00-5eed00000a0a"

[partition.root_b]
role = "system-b"
type = "root-x86-64"
filesystem = "ext4"
size = "24M"

[partition.userdata]
role = "data"
type = "linux-generic"
filesystem = "ext4"
size = "8M"

[partition.rescue]
role = "recovery"
filesystem = "ext4"
size = "8M"
"""

MBR_LOGICAL = """\
[disk]
table = "mbr"
signature = "0x5eed0042"

[partition.firmware]
role = "boot"
type = "fat32-lba"
bootable = true
filesystem = "vfat"
size = "34M"

[partition.rootfs1]
role = "system-a"
type = "linux"
filesystem = "ext4"
size = "24M"

[partition.rootfs2]
role = "system-b"
type = "linux"
filesystem = "ext4"
size = "24M"

[partition.rescue]
role = "recovery"
type = "linux"
filesystem = "ext4"
size = "8M"

[partition.userdata]
role = "data"
type = "linux"
filesystem = "ext4"
size = "8M"
"""


def _product(root: Path, layout: str) -> Product:
    product = write_product(root)
    product.layout.write_text(layout)
    return product


def _sfdisk(disk: Path) -> dict[str, object]:
    result = subprocess.run(["sfdisk", "-J", str(disk)], capture_output=True, text=True, check=True)
    table: dict[str, object] = json.loads(result.stdout)["partitiontable"]
    return table


def _partition_sha256(disk: Path, start_sector: int, size: int) -> str:
    with disk.open("rb") as handle:
        handle.seek(start_sector * 512)
        return hashlib.sha256(handle.read(size)).hexdigest()


@pytest.mark.parametrize(
    ("layout", "labels"),
    [
        (GPT_CUSTOM, {"boot": "esp", "system-b": "root_b"}),
        (MBR_LOGICAL, {"boot": "firmware", "system-b": "rootfs2"}),
    ],
    ids=["gpt-custom-labels", "mbr-logical"],
)
def test_status_and_install_without_layout(
    tmp_path: Path, layout: str, labels: dict[str, str]
) -> None:
    product = _product(tmp_path / "product", layout)
    avobuild_cli("image", product.recipe, "-o", tmp_path / "out")
    disk = tmp_path / "out" / "testprod-1.0.0.img"
    roles = read_disk_roles(disk)
    assert roles.source == "disk record"
    assert roles.require(Role.BOOT).label == labels["boot"]
    # the record is on the FAT partition, readable with mtools like any file
    boot = roles.require(Role.BOOT)
    record = subprocess.run(
        ["mtype", "-i", f"{disk}@@{boot.offset}", f"::{RECORD_PATH}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert f"[partition.{labels['system-b']}]" in record and 'role = "system-b"' in record

    status = json.loads(avobuild_cli("status", "--disk", disk, "--json").stdout)
    assert status["primary"] == "A" and status["slots"]["A"]["version"] == "1.0.0"

    v2 = write_product(tmp_path / "product", version="2.0.0")
    bundle = tmp_path / "v2.avb"
    avobuild_cli("bundle", "create", v2.recipe, "-o", bundle)
    result = avobuild_cli("install", bundle, "--disk", disk, "--keyring", product.public_key)
    assert "installed 2.0.0 into slot B" in result.stdout
    after = json.loads(avobuild_cli("status", "--disk", disk, "--json").stdout)
    assert after["primary"] == "B" and after["slots"]["B"]["version"] == "2.0.0"

    # Oracle: the partition sfdisk reports as system-b's holds the bundle's rootfs image.
    info = json.loads(avobuild_cli("bundle", "info", bundle, "--json").stdout)
    rootfs = next(image for image in info["images"] if image["name"] == "rootfs")
    table = _sfdisk(disk)
    partitions = table["partitions"]
    assert isinstance(partitions, list)
    number = roles.require(Role.SYSTEM_B).number
    entry = next(p for p in partitions if p["node"].endswith(str(number)))
    assert entry["start"] * 512 == roles.require(Role.SYSTEM_B).offset
    assert _partition_sha256(disk, entry["start"], rootfs["size"]) == rootfs["sha256"]


def test_a_layout_still_wins_and_a_foreign_mbr_needs_one(tmp_path: Path) -> None:
    product = _product(tmp_path / "product", MBR_LOGICAL)
    avobuild_cli("image", product.recipe, "-o", tmp_path / "out")
    disk = tmp_path / "out" / "testprod-1.0.0.img"
    with_layout = json.loads(
        avobuild_cli("status", "--disk", disk, "--layout", product.layout, "--json").stdout
    )
    assert with_layout["slots"]["A"]["version"] == "1.0.0"
    # A foreign MBR disk: the same table, no record on its FAT partition.
    roles = read_disk_roles(disk)
    boot = roles.require(Role.BOOT)
    subprocess.run(["mdel", "-i", f"{disk}@@{boot.offset}", f"::{RECORD_PATH}"], check=True)
    refused = avobuild_cli("status", "--disk", disk, check=False)
    assert refused.returncode == 10
    assert f"{disk}: an MBR disk without a disk record" in refused.stderr
    assert "--layout" in refused.stderr
    again = json.loads(
        avobuild_cli("status", "--disk", disk, "--layout", product.layout, "--json").stdout
    )
    assert again == with_layout


@pytest.mark.parametrize("layout", [GPT_CUSTOM, MBR_LOGICAL], ids=["gpt-fixed-uuid", "mbr"])
def test_applier_partuuids_are_what_sfdisk_reads(tmp_path: Path, layout: str) -> None:
    from avobuild.applier.render import slot_partitions
    from avobuild.model.recipe import load_recipe

    product = _product(tmp_path / "product", layout)
    avobuild_cli("image", product.recipe, "-o", tmp_path / "out")
    disk = tmp_path / "out" / "testprod-1.0.0.img"
    table = _sfdisk(disk)
    rendered = {part.slot: part for part in slot_partitions(load_recipe(product.recipe))}
    for slot, part in rendered.items():
        if table["label"] == "gpt":
            read = subprocess.run(
                ["sfdisk", "--part-uuid", str(disk), str(part.number)],
                capture_output=True, text=True, check=True,
            ).stdout.strip().lower()  # fmt: skip
        else:
            # Linux's PARTUUID of an MBR partition: the disk identifier, "-", the number.
            identifier = str(table["id"]).removeprefix("0x")
            read = f"{int(identifier, 16):08x}-{part.number:02x}"
        assert part.partuuid == read, slot
    if table["label"] == "gpt":
        assert rendered["A"].partuuid == "3c5f6e2a-8d47-4b1e-9f00-5eed00000a0a"
    else:
        assert rendered["A"].partuuid == "5eed0042-02"


ARM64 = REPO / "build" / "debian-arm64"
PINE64 = Path("/usr/lib/u-boot/pine64_plus")


def _arm64_recipe(directory: Path, version: str) -> Path:
    """recipes/demo-arm64.toml on the Pine64+ MBR layout, its paths made absolute."""
    text = (REPO / "recipes" / "demo-arm64.toml").read_text()
    text = text.replace('"../', f'"{REPO}/').replace('"demo/', f'"{REPO}/recipes/demo/')
    text = text.replace('"demo-arm64/', f'"{REPO}/recipes/demo-arm64/')
    text = text.replace("aarch64-uboot-ab.toml", "aarch64-uboot-mbr.toml")
    text = text.replace('version = "1.0.0"', f'version = "{version}"')
    text = text.replace("[applier]\n", '[applier]\ndisk = "/dev/mmcblk0"\n')  # an SD card
    path = directory / f"arm64-{version}.toml"
    path.write_text(text)
    return path


@pytest.mark.skipif(
    not (ARM64 / "vmlinuz").is_file() or not PINE64.is_dir(),
    reason="needs scripts/fetch-kernel and fetch-sysroot for arm64, and u-boot-sunxi",
)
def test_host_install_onto_the_pine64_mbr_factory_image(tmp_path: Path) -> None:
    """layouts/aarch64-uboot-mbr.toml: an MBR with an extended partition and raw boot loader
    regions; status and install find the slots from the disk alone."""
    avobuild_cli("image", _arm64_recipe(tmp_path, "1.0.0"), "-o", tmp_path / "out")
    disk = tmp_path / "out" / "avobuild-demo-arm64-1.0.0.img"
    assert _sfdisk(disk)["label"] == "dos"
    spl = (PINE64 / "sunxi-spl.bin").read_bytes()
    with disk.open("rb") as handle:
        handle.seek(8 * 1024)
        assert handle.read(len(spl)) == spl
    bundle = tmp_path / "v2.avb"
    avobuild_cli("bundle", "create", _arm64_recipe(tmp_path, "1.1.0"), "-o", bundle)
    public = REPO / "keys-example" / "insecure-example.pub.pem"
    installed = json.loads(
        avobuild_cli("install", bundle, "--disk", disk, "--keyring", public, "--json").stdout
    )
    assert (installed["slot"], installed["version"]) == ("B", "1.1.0")
    status = json.loads(avobuild_cli("status", "--disk", disk, "--json").stdout)
    assert status["primary"] == "B" and status["slots"]["A"]["version"] == "1.0.0"
    info = json.loads(avobuild_cli("bundle", "info", bundle, "--json").stdout)
    rootfs = next(image for image in info["images"] if image["name"] == "rootfs")
    entry = next(p for p in _sfdisk(disk)["partitions"] if p["node"].endswith("3"))  # type: ignore[union-attr, attr-defined]
    assert _partition_sha256(disk, entry["start"], rootfs["size"]) == rootfs["sha256"]
