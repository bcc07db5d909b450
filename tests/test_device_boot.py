"""The demo factory image boots: OVMF -> GRUB (/EFI/BOOT/BOOTX64.EFI) with the applier's
grub.cfg -> Debian's kernel with the slot's device initramfs -> busybox init, which prints
the boot marker and offers a shell on the serial console. QEMU runs in software emulation.
"""

from __future__ import annotations

import gzip
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, avobuild_cli
from test_media_boot import qemu, uefi_args

from avobuild.applier.render import render_applier
from avobuild.binaries.kmod import module_name
from avobuild.device.boot import DEVICE_MODULES, build_device_initramfs
from avobuild.disk.gpt import read_gpt
from avobuild.fs import read_vfat_file
from avobuild.fs.cpio import read_newc
from avobuild.model.recipe import load_recipe

DEMO = REPO / "recipes" / "demo.toml"
MARKER = b"AVOBUILD-BOOT-OK"


@pytest.fixture(scope="module")
def demo_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo-device")
    avobuild_cli("image", DEMO, "-o", out)
    return out / "avobuild-demo-1.0.0.img"


def partition_span(disk: Path, label: str) -> tuple[int, int]:
    """Byte offset and size of the partition named `label` in a disk image."""
    with disk.open("rb") as handle:
        table = read_gpt(handle)
    part = table.find(label)
    assert part is not None
    return table.offset(part), table.size(part)


def partition_bytes(disk: Path, label: str) -> bytes:
    """The whole partition named `label` of a disk image."""
    offset, size = partition_span(disk, label)
    with disk.open("rb") as handle:
        handle.seek(offset)
        return handle.read(size)


def ext4_dump(image: Path, path: str, tmp_path: Path) -> bytes:
    """A file read out of an ext4 filesystem image by debugfs."""
    dump = tmp_path / "dumped"
    subprocess.run(
        ["debugfs", "-R", f"dump {path} {dump}", str(image)], check=True, capture_output=True
    )
    return dump.read_bytes()


def _slot_file(disk: Path, label: str, path: str, tmp_path: Path) -> bytes:
    slot = tmp_path / f"{label}.img"
    slot.write_bytes(partition_bytes(disk, label))
    return ext4_dump(slot, path, tmp_path)


def test_device_initramfs_is_reproducible_and_carries_the_disk_modules(tmp_path: Path) -> None:
    recipe = load_recipe(DEMO)
    first, second = tmp_path / "one.img", tmp_path / "two.img"
    count = build_device_initramfs(recipe, first)
    build_device_initramfs(recipe, second)
    assert first.read_bytes() == second.read_bytes()
    members = {m.name: m for m in read_newc(gzip.decompress(first.read_bytes()))}
    init = members["init"].data.decode()
    assert "label='system-a'" in init and "label='system-b'" in init
    # the slot is mounted without loading its journal: its block device stays bit-exact
    assert """mount -t 'ext4' -o ro,noload "$device" /newroot""" in init
    order = members["lib/modules/load-order"].data.decode().split()
    assert len(order) == count
    loaded = {module_name(line) for line in order}
    assert {module_name(name) for name in DEVICE_MODULES} <= loaded
    # a module comes after the modules it depends on (ext4 needs jbd2 and mbcache)
    names = [module_name(line) for line in order]
    assert names.index("jbd2") < names.index("ext4")
    assert names.index("mbcache") < names.index("ext4")


def test_factory_image_carries_grub_and_the_slot_initramfs(
    demo_image: Path, tmp_path: Path
) -> None:
    recipe = load_recipe(DEMO)
    rendered = tmp_path / "applier"
    render_applier(recipe, rendered)
    esp_offset, _ = partition_span(demo_image, "boot")
    grub_cfg = read_vfat_file(demo_image, esp_offset, "EFI/BOOT/grub.cfg")
    assert grub_cfg == (rendered / "boot/efi/EFI/BOOT/grub.cfg").read_bytes()
    assert read_vfat_file(demo_image, esp_offset, "EFI/BOOT/BOOTX64.EFI")[:2] == b"MZ"
    initrd = _slot_file(demo_image, "system-a", "/boot/initrd.img", tmp_path)
    build_device_initramfs(recipe, tmp_path / "initrd.img")
    assert initrd == (tmp_path / "initrd.img").read_bytes()
    applier = _slot_file(demo_image, "system-a", "/usr/sbin/avocado-update", tmp_path)
    assert applier == (rendered / "usr/sbin/avocado-update").read_bytes()


@pytest.mark.slow
def test_demo_image_boots_to_the_marker_and_a_shell(demo_image: Path, tmp_path: Path) -> None:
    args = [
        *uefi_args(tmp_path),
        "-drive",
        f"file={demo_image},format=raw,if=virtio,snapshot=on",
        "-net",
        "none",
    ]
    started = time.monotonic()
    with qemu(args, tmp_path / "console.log") as machine:
        machine.expect(b"Booting `avobuild-demo (slot A)'", timeout=180)
        boot = machine.expect(MARKER + b" slot=A version=1.0.0\r\n", timeout=180)
        elapsed = time.monotonic() - started
        assert b"booted slot A (1.0.0)" in boot  # the applier's boot hook ran
        machine.expect(b"# ", timeout=60)
        machine.send("cat /usr/lib/avobuild/release; echo END-$((6 * 7))\n")
        release = machine.expect(b"END-42", timeout=60)
        assert b"AVOBUILD_VERSION=1.0.0" in release
        machine.send("mount; echo END-$((6 * 8))\n")
        mounts = machine.expect(b"END-48", timeout=60)
        assert b" on /data type ext4 (rw" in mounts
        assert b" on /boot/efi type vfat (rw" in mounts
        assert b"/dev/vda2 on / type ext4 (ro" in mounts
    assert machine.output.count(MARKER) == 1
    print(f"boot to marker: {elapsed:.1f} s")
