"""The arm64 U-Boot device's life in QEMU (`-machine virt`, software emulation), driven over
its serial console like the x86 demo device (tests/test_device_lifecycle.py):

  Debian's U-Boot for QEMU (u-boot-qemu, as -bios) runs /boot.scr from the FAT boot partition,
  which picks the slot from /uboot.env beside it and counts trial boots there (env import,
  env export + fatwrite) -> Debian's arm64 kernel with the slot initramfs -> busybox init
  boot A 1.0.0, write a file to /data
  -> full bundle 1.1.0 into B (the on-target applier, fw_setenv on /boot/efi/uboot.env),
     reboot, U-Boot trial-boots B, the health check confirms B
  -> delta bundle 1.1.0 -> 1.2.0 into A (stream version 2: six of the device's own arm64
     libraries recompiled, so bspatch operations against their old versions, applied with
     the device's bspatch), reboot, trial boot, confirmed
  -> 1.3.0 (a delta too), whose init crashes (kernel panic): U-Boot trial-boots B
     max_attempts times, then A
  -> the /data file is intact, and U-Boot's /uboot.env reads back on the host (avobuild's
     parser and fw_printenv agree) with B spent and A primary.

The recipe is recipes/demo-arm64.toml on layouts/aarch64-uboot-ab.toml with its slots,
recovery and data partitions scaled down (the applier writes every byte of a slot under
emulation), everything else unchanged.
"""

from __future__ import annotations

import hashlib
import random
import re
import shutil
import subprocess
import time
import tomllib
from pathlib import Path

import pytest
import tomli_w
from conftest import REPO, avobuild_cli
from elf_edits import arm64_elf_files, recompile_arm64
from test_device_boot import ext4_dump, partition_bytes, partition_span
from test_device_lifecycle import (
    CRASHING_INIT,
    SAMPLE_LIBRARIES,
    Device,
    delta_operations,
    demo_variant,
)
from test_media_boot import AARCH64_VIRT, POWER_OFF, qemu

from avobuild.boot.uboot import read_uboot_env
from avobuild.fs import read_vfat_file

pytestmark = pytest.mark.slow

DEMO_ARM64 = REPO / "recipes" / "demo-arm64.toml"
LAYOUT = REPO / "layouts" / "aarch64-uboot-ab.toml"
ARM64 = REPO / "build" / "debian-arm64"
UBOOT_BIOS = Path("/usr/lib/u-boot/qemu_arm64/u-boot.bin")
KEY = REPO / "keys-example" / "insecure-example.key.pem"
DATA_FILE = "lifecycle/keep.bin"
MEDIA = "/run/updates"
# What the test shrinks in the layout: the partitions the device writes or formats.
SMALL_SIZES = {"system-a": "64M", "system-b": "64M", "recovery": "16M", "data": "32M"}

if not (ARM64 / "modules" / ".complete").exists() or not (ARM64 / "sysroot/.complete").exists():
    pytest.skip(
        "build/debian-arm64 missing: run make setup (scripts/fetch-kernel build/debian-arm64 "
        "arm64 and scripts/fetch-sysroot, see the Makefile)",
        allow_module_level=True,
    )


def small_layout(tmp_path: Path) -> Path:
    """layouts/aarch64-uboot-ab.toml with smaller partitions (SMALL_SIZES), else the same."""
    lines = LAYOUT.read_text().splitlines(keepends=True)
    section = ""
    changed = set()
    for index, line in enumerate(lines):
        if line.startswith("[partition."):
            section = line.strip()[len("[partition.") : -1]
        elif line.startswith("size = ") and section in SMALL_SIZES:
            lines[index] = f'size = "{SMALL_SIZES[section]}"\n'
            changed.add(section)
    assert changed == set(SMALL_SIZES)
    path = tmp_path / "aarch64-uboot-ab-small.toml"
    path.write_text("".join(lines))
    return path


def build_updates(tmp_path: Path, layout: Path) -> tuple[Path, dict[str, Path], bytes]:
    """The factory recipe, the bundles (on an ext4 'update stick') and the seeded data file."""
    factory = demo_variant(tmp_path, "1.0.0", base=DEMO_ARM64, layout=layout)
    # The factory image's boot script carries panic=N: reset 1 s after a panic, not 5.
    factory.write_text(factory.read_text().replace("panic-reboot = 5", "panic-reboot = 1"))
    assert "panic-reboot = 1" in factory.read_text()
    stick = tmp_path / "stick"
    stick.mkdir()
    # 1.1.0 -> 1.2.0 recompiles six of the sysroot's arm64 libraries (B/BL targets moved at
    # six places each), so the delta (stream version 2) holds bspatch operations, which the
    # device applies with the bspatch (and xz, for the arm64 filter where it pays) of its
    # target-tools.
    rng = random.Random(14)
    libraries = {
        f"{SAMPLE_LIBRARIES}/lib{letter}.so": path.read_bytes()
        for letter, path in zip("abcdef", arm64_elf_files(6), strict=True)
    }
    full_v11 = stick / "demo-1.1.0.avb"
    recipe = demo_variant(tmp_path, "1.1.0", base=DEMO_ARM64, layout=layout, binaries=libraries)
    avobuild_cli("bundle", "create", recipe, "-o", full_v11)
    full_v12 = tmp_path / "demo-1.2.0.avb"
    recompiled = {dest: recompile_arm64(rng, data) for dest, data in libraries.items()}
    recipe = demo_variant(tmp_path, "1.2.0", base=DEMO_ARM64, layout=layout, binaries=recompiled)
    avobuild_cli("bundle", "create", recipe, "-o", full_v12)
    delta = stick / "demo-1.1.0-1.2.0.delta.avb"
    avobuild_cli("delta", "create", "--from", full_v11, "--to", full_v12, "-o", delta, "--key", KEY)
    operations = delta_operations(delta)
    assert operations.startswith(b"avobuild-delta 2\n"), operations[:40]
    assert re.search(rb"\nbspatch \d+ \d+ (raw|arm64) ", operations), "no bspatch in the delta"
    # The crashing 1.3.0 travels as a delta from the running 1.2.0 as well: a full bundle
    # would cost another ~2 minutes of writing a whole slot under emulation.
    full_v13 = tmp_path / "demo-1.3.0.avb"
    recipe = demo_variant(
        tmp_path,
        "1.3.0",
        base=DEMO_ARM64,
        layout=layout,
        files={"/sbin/init": CRASHING_INIT},
        binaries=recompiled,
    )
    avobuild_cli("bundle", "create", recipe, "-o", full_v13)
    panic = stick / "demo-1.2.0-1.3.0.delta.avb"
    avobuild_cli("delta", "create", "--from", full_v12, "--to", full_v13, "-o", panic, "--key", KEY)
    data = random.Random(20261202).randbytes(256 << 10)
    (stick / "keep.bin").write_bytes(data)
    image = tmp_path / "stick.img"
    subprocess.run(
        ["mke2fs", "-q", "-t", "ext4", "-E", "root_owner=0:0", "-d", str(stick), str(image), "96M"],
        check=True,
    )
    bundles = {"full": full_v11, "delta": delta, "panic": panic}
    return factory, {name: Path(MEDIA) / path.name for name, path in bundles.items()}, data


def uboot_state(disk: Path, tmp_path: Path) -> dict[str, str]:
    """/uboot.env of the disk's boot partition, parsed by avobuild (CRC checked) and checked
    against what the host's fw_printenv (libubootenv) reads from the same bytes."""
    offset, _size = partition_span(disk, "boot")
    data = read_vfat_file(disk, offset, "uboot.env")
    assert len(data) == 0x4000, "U-Boot wrote the environment back at the configured size"
    ours = read_uboot_env(data)
    copy = tmp_path / "uboot.env"
    copy.write_bytes(data)
    config = tmp_path / "fw_env.config"
    config.write_text(f"{copy} 0x0 0x4000\n")
    printed = subprocess.run(
        ["fw_printenv", "-c", str(config)], capture_output=True, text=True, check=True
    ).stdout
    assert dict(line.split("=", 1) for line in printed.splitlines()) == ours
    return ours


def test_arm64_uboot_device_lifecycle(tmp_path: Path) -> None:
    started = time.monotonic()
    phases: list[tuple[str, float]] = []

    def phase(name: str) -> None:
        phases.append((name, time.monotonic() - started))
        print(f"{phases[-1][1]:7.1f} s  {name}", flush=True)

    layout = small_layout(tmp_path)
    factory_recipe, bundles, data = build_updates(tmp_path, layout)
    out = tmp_path / "out"
    avobuild_cli("image", factory_recipe, "-o", out)
    disk = tmp_path / "disk.img"
    shutil.copyfile(out / "avobuild-demo-arm64-1.0.0.img", disk)
    phase("host: factory image and bundles built")

    args = [
        "-bios",
        str(UBOOT_BIOS),
        "-drive",
        f"file={disk},format=raw,if=none,id=disk",
        "-device",
        "virtio-blk-pci,drive=disk",
        "-drive",
        f"file={tmp_path / 'stick.img'},format=raw,if=none,id=stick,readonly=on",
        "-device",
        "virtio-blk-pci,drive=stick",
    ]
    with qemu(
        args,
        tmp_path / "console.log",
        reboot=True,
        binary="qemu-system-aarch64",
        machine=AARCH64_VIRT,
    ) as machine:
        device = Device(machine)
        powered_on = time.monotonic()
        boot = device.booted("A", "1.0.0")
        print(f"power-on to the boot marker: {time.monotonic() - powered_on:.1f} s", flush=True)
        assert b"U-Boot 20" in boot and b"avo: booting slot A (primary A)" in boot
        assert b"Machine model: linux,dummy-virt" in boot  # the arm64 kernel on QEMU virt
        phase("booted A 1.0.0")
        device.mount_media()
        device.check(f"mkdir -p /data/lifecycle && cp {MEDIA}/keep.bin /data/{DATA_FILE} && sync")
        state = device.check("fw_printenv -c /etc/fw_env.config")
        assert "avo_primary=A" in state and "avo_A_version=1.0.0" in state

        # 1. a full bundle into B; U-Boot counts the trial boot; the health check confirms
        device.install(bundles["full"])
        phase("full bundle 1.1.0 installed into B")
        boot = device.booted("B", "1.1.0")
        assert b"avo: trial boot of slot B recorded" in boot
        assert b"avo: booting slot B (primary B)" in boot
        assert b"booted slot B (1.1.0), state Testing" in boot
        machine.expect(b"confirmed slot B (1.1.0)", timeout=180)
        status = device.check("avocado-update status")
        assert "Current: 1.1.0 (Partition B)" in status and "Slot B: confirmed" in status
        assert "avo_B_ok=1" in device.check("fw_printenv -c /etc/fw_env.config avo_B_ok")
        phase("full bundle 1.1.0 installed, B confirmed")

        # 2. a delta bundle from the running 1.1.0 into A
        device.mount_media()
        applied = device.install(bundles["delta"])
        assert "applied 1.2.0 to slot A" in applied, applied
        boot = device.booted("A", "1.2.0")
        assert b"avo: trial boot of slot A recorded" in boot
        assert b"booted slot A (1.2.0), state Testing" in boot
        machine.expect(b"confirmed slot A (1.2.0)", timeout=180)
        assert "avobuild demo 1.2.0" in device.check("cat /etc/motd")
        phase("delta bundle 1.1.0 -> 1.2.0 installed, A confirmed")

        # 3. 1.3.0 panics on every trial boot; U-Boot falls back after max_attempts
        device.mount_media()
        applied = device.install(bundles["panic"])
        assert "applied 1.3.0 to slot B" in applied, applied
        phase("delta bundle 1.2.0 -> 1.3.0 (init crashes) installed into B")
        for _ in range(3):  # [rollback.boot_failure] max_attempts = 3
            machine.expect(b"avo: booting slot B (primary B)", timeout=240)
            machine.expect(b"Kernel panic - not syncing", timeout=240)
        boot = device.booted("A", "1.2.0")
        assert b"avo: booting slot A (primary B)" in boot  # tries spent: the fallback
        assert b"avo: trial boot" not in boot  # nothing left to count
        status = device.check("avocado-update status")
        assert "Current: 1.2.0 (Partition A)" in status and "Next boot: slot A" in status
        history = device.check("avocado-update history")
        assert "boot_failure" in history and "from=B" in history, history
        digest = device.check(f"sha256sum /data/{DATA_FILE}").split()[0]
        assert digest == hashlib.sha256(data).hexdigest()
        machine.send("sync; poweroff -f\n")
        machine.expect(POWER_OFF, timeout=120)
        assert machine.ended.wait(timeout=60)
        assert machine.resets == 6, "a reset per reboot: 3 installs, 3 panics"
        phase("1.3.0 panicked 3 times, U-Boot fell back to A")

    state = uboot_state(disk, tmp_path)
    assert state["avo_primary"] == "A" and state["avo_A_ok"] == "1"
    assert (state["avo_B_ok"], state["avo_B_tries"], state["avo_B_version"]) == ("0", "0", "1.3.0")
    assert state["avo_A_version"] == "1.2.0"
    data_image = tmp_path / "data.img"
    data_image.write_bytes(partition_bytes(disk, "data"))
    subprocess.run(["e2fsck", "-fn", str(data_image)], check=True, capture_output=True)
    assert ext4_dump(data_image, f"/{DATA_FILE}", tmp_path) == data

    for name, at in phases:
        print(f"{at:7.1f} s  {name}")


AAVMF_CODE = Path("/usr/share/AAVMF/AAVMF_CODE.fd")
AAVMF_VARS = Path("/usr/share/AAVMF/AAVMF_VARS.fd")


def test_arm64_grub_efi_device_boots(tmp_path: Path) -> None:
    """[boot] method = "grub-efi" on arm64: UEFI firmware (AAVMF, Debian's qemu-efi-aarch64)
    -> /EFI/BOOT/BOOTAA64.EFI -> grub.cfg -> the same kernel and slot initramfs."""
    recipe = demo_variant(tmp_path, "1.0.0", base=DEMO_ARM64, layout=small_layout(tmp_path))
    values = tomllib.loads(recipe.read_text())
    values["boot"] = {"method": "grub-efi", "console": "ttyAMA0"}
    values["applier"]["target-tools"] = ["busybox", "openssl", "zstd"]
    recipe.write_text(tomli_w.dumps(values))
    avobuild_cli("image", recipe, "-o", tmp_path / "out")
    variables = tmp_path / "AAVMF_VARS.fd"
    shutil.copyfile(AAVMF_VARS, variables)
    args = [
        "-drive",
        f"if=pflash,format=raw,readonly=on,file={AAVMF_CODE}",
        "-drive",
        f"if=pflash,format=raw,file={variables}",
        "-drive",
        f"file={tmp_path / 'out' / 'avobuild-demo-arm64-1.0.0.img'},format=raw,if=none,id=disk",
        "-device",
        "virtio-blk-pci,drive=disk",
    ]
    started = time.monotonic()
    with qemu(
        args, tmp_path / "console.log", binary="qemu-system-aarch64", machine=AARCH64_VIRT
    ) as machine:
        machine.expect(b"Booting `avobuild-demo-arm64 (slot A)'", timeout=300)
        boot = Device(machine).booted("A", "1.0.0")
        assert b"booted slot A (1.0.0)" in boot
    print(f"AAVMF + GRUB boot to the marker: {time.monotonic() - started:.1f} s")
