"""A real distribution through the device's life: Debian bookworm with systemd, in QEMU.

The root filesystem is what `mmdebstrap` makes from Debian's packages (systemd as init, udev,
device nodes in /dev, absolute symlinks, setuid binaries, file capabilities), given to
avobuild as the tar archive build systems emit. The slot is read-only; `[persist]` keeps
/var, an overlay on /etc and /root on the data partition. The device:

  boots A 1.0.0: the applier's systemd units are enabled and print the boot marker;
  a file is written under /var, an /etc setting is changed, a file put in /root
  -> full bundle 1.1.0 into B, trial boot, the health check (a systemd unit) confirms it
  -> delta 1.1.0 -> 1.2.0 into A, confirmed
  -> delta 1.2.0 -> 1.3.0, whose application self-test fails: rolled back to A by itself
  and the three changes are there after every update and after the rollback.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import tomli_w
from conftest import REPO, avobuild_cli
from test_device_lifecycle import MARKER, MEDIA, Device
from test_media_boot import qemu, uefi_args

pytestmark = pytest.mark.slow

KERNEL = REPO / "build" / "debian" / "vmlinuz"
LAYOUT = REPO / "layouts" / "x86_64-efi-ab.toml"
KEY = REPO / "keys-example" / "insecure-example.key.pem"
PACKAGES = ("systemd-sysv", "udev", "dbus")
# A serial console that logs in as root: the test types commands there.
AUTOLOGIN = """[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --noclear --keep-baud 115200 %I $TERM
"""
FAILING_SELF_TEST = """#!/bin/sh
echo "debian-app 1.3.0: self-test failed" >&2
exit 1
"""


@pytest.fixture(scope="module")
def bookworm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Debian bookworm root filesystem with systemd, as mmdebstrap writes it (a tar)."""
    archive = tmp_path_factory.mktemp("mmdebstrap") / "bookworm.tar"
    subprocess.run(
        [
            "mmdebstrap",
            "--quiet",
            "--variant=minbase",
            f"--include={','.join(PACKAGES)}",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            "--customize-hook=echo debian-device > $1/etc/hostname",
            "bookworm",
            str(archive),
            "http://deb.debian.org/debian",
        ],
        check=True,
        capture_output=True,
    )
    return archive


class DebianDevice(Device):
    """The serial console of the Debian guest: a bash logged in as root."""

    def booted(self, slot: str, version: str, timeout: float = 600) -> bytes:
        boot = super().booted(slot, version, timeout)
        # bash's bracketed paste would wrap every command's output in escape sequences
        self.check("bind 'set enable-bracketed-paste off'")
        return boot

    def install(self, bundle: Path, timeout: float = 1800) -> str:
        # A 256 MiB slot written by the emulated CPU: give a loaded host time.
        return super().install(bundle, timeout)


def write_recipe(tmp_path: Path, archive: Path, version: str, *, failing: bool = False) -> Path:
    files = tmp_path / f"files-{version}"
    files.mkdir()
    (files / "autologin.conf").write_text(AUTOLOGIN)
    (files / "version").write_text(f"debian-device {version}\n")
    rootfs_files = [
        {
            "source": str(files / "autologin.conf"),
            "dest": "/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf",
        },
        {"source": str(files / "version"), "dest": "/usr/share/debian-device/version"},
    ]
    if failing:
        (files / "validate").write_text(FAILING_SELF_TEST)
        rootfs_files.append(
            {"source": str(files / "validate"), "dest": "/usr/local/bin/validate", "mode": "0755"}
        )
    recipe = {
        "product": {
            "name": "debian-device",
            "version": version,
            "compatible": "debian-device-x86_64",
            "architecture": "x86_64",
            "layout": str(LAYOUT),
        },
        "rootfs": {"archive": str(archive), "file": rootfs_files},
        "kernel": {"file": str(KERNEL), "dest": "/boot/vmlinuz"},
        "persist": {"var": True, "overlay": ["/etc"], "bind": ["/root"], "tmpfs": ["/tmp"]},
        "signing": {"key": str(KEY)},
        "applier": {
            "bootloader": "grub",
            "init": "systemd",
            "target-tools": ["busybox", "openssl", "zstd", "systemctl"],
            "esp-mount": "/boot/efi",
            "data-mount": "/data",
            "state-dir": "/data/avocado-update",
            "panic-reboot": 5,
        },
        "rollback": {
            "boot_failure": {"max_attempts": 3, "timeout": "300s"},
            "service_health": {
                "critical_services": ["systemd-journald", "systemd-logind"],
                "check_interval": "30s",
                "failure_threshold": 2,
            },
            "app_validation": {
                "enabled": failing,
                "script": "/usr/local/bin/validate",
                "timeout": "60s",
            },
        },
    }
    path = tmp_path / f"debian-{version}.toml"
    path.write_text(tomli_w.dumps(recipe))
    return path


def test_debian_with_systemd_updates_persists_and_rolls_back(
    bookworm: Path, tmp_path: Path
) -> None:
    started = time.monotonic()
    phases: list[tuple[str, float]] = []

    def phase(name: str) -> None:
        phases.append((name, time.monotonic() - started))

    out = tmp_path / "out"
    avobuild_cli("image", write_recipe(tmp_path, bookworm, "1.0.0"), "-o", out)
    stick = tmp_path / "stick"
    stick.mkdir()
    full = stick / "debian-1.1.0.avb"
    avobuild_cli("bundle", "create", write_recipe(tmp_path, bookworm, "1.1.0"), "-o", full)
    full_v12 = tmp_path / "debian-1.2.0.avb"
    avobuild_cli("bundle", "create", write_recipe(tmp_path, bookworm, "1.2.0"), "-o", full_v12)
    delta = stick / "debian-1.1.0-1.2.0.avb"
    avobuild_cli("delta", "create", "--from", full, "--to", full_v12, "--key", KEY, "-o", delta)
    # 1.3.0 arrives as a delta too (from the running 1.2.0): one full install is enough.
    full_v13 = tmp_path / "debian-1.3.0.avb"
    recipe = write_recipe(tmp_path, bookworm, "1.3.0", failing=True)
    avobuild_cli("bundle", "create", recipe, "-o", full_v13)
    failing = stick / "debian-1.2.0-1.3.0.avb"
    avobuild_cli(
        "delta", "create", "--from", full_v12, "--to", full_v13, "--key", KEY, "-o", failing
    )
    stick_image = tmp_path / "stick.img"
    subprocess.run(
        ["mke2fs", "-q", "-t", "ext4", "-d", str(stick), str(stick_image), "512M"], check=True
    )
    disk = tmp_path / "disk.img"
    shutil.copyfile(out / "debian-device-1.0.0.img", disk)
    phase("host: Debian image and bundles built")

    args = [
        *uefi_args(tmp_path),
        "-m",
        "1024",
        "-drive",
        f"file={disk},format=raw,if=virtio",
        "-drive",
        f"file={stick_image},format=raw,if=virtio,readonly=on",
        "-net",
        "none",
    ]
    kept = hashlib.sha256(b"written under /var by 1.0.0\n").hexdigest()
    with qemu(args, tmp_path / "console.log", reboot=True) as machine:
        device = DebianDevice(machine)
        boot = device.booted("A", "1.0.0", timeout=600)
        assert b"booted slot A (1.0.0)" in boot
        device.check("systemctl is-system-running --wait; true", 300)
        failed = device.check("systemctl --failed --no-legend --plain").strip()
        assert not failed, f"failed units on a read-only Debian root:\n{failed}"
        enabled = device.check("systemctl is-enabled avocado-update-boot avocado-update-health")
        assert enabled.split() == ["enabled", "enabled"], enabled
        target, fstype, options = device.check("findmnt -no TARGET,FSTYPE,OPTIONS /").split()
        assert (target, fstype) == ("/", "ext4") and options.startswith("ro,"), options
        device.check("mkdir -p /var/lib/debian-device")
        device.check("echo 'written under /var by 1.0.0' > /var/lib/debian-device/keep")
        device.check("echo 'LogLevel=debug' >> /etc/systemd/system.conf")
        device.check("echo 'a note in /root' > /root/note && sync")
        phase("booted A 1.0.0 (systemd), data written")

        def persisted() -> None:
            digest = device.check("sha256sum /var/lib/debian-device/keep").split()[0]
            assert digest == kept
            assert "LogLevel=debug" in device.check("tail -n 1 /etc/systemd/system.conf")
            assert device.check("cat /root/note").strip() == "a note in /root"

        device.mount_media()
        device.install(Path(MEDIA) / full.name)
        mark = machine.position
        boot = device.booted("B", "1.1.0", timeout=600)
        assert b"booted slot B (1.1.0), state Testing" in boot
        machine.seen(b"confirmed slot B (1.1.0)", mark, timeout=600)
        assert "debian-device 1.1.0" in device.check("cat /usr/share/debian-device/version")
        persisted()
        phase("full 1.1.0 confirmed on B; /var, /etc and /root kept")

        device.mount_media()
        applied = device.install(Path(MEDIA) / delta.name)
        assert "applied 1.2.0 to slot A" in applied, applied
        mark = machine.position
        device.booted("A", "1.2.0", timeout=600)
        machine.seen(b"confirmed slot A (1.2.0)", mark, timeout=600)
        persisted()
        phase("delta 1.1.0 -> 1.2.0 confirmed on A")

        device.mount_media()
        device.install(Path(MEDIA) / failing.name)
        mark = machine.position
        # The health check fails and the device reboots by itself: a command typed into
        # this boot's shell could be read by the next boot's login instead.
        machine.expect(MARKER + b" slot=B version=1.3.0\r\n", timeout=600)
        machine.seen(b"rolled back: app_validation", mark, timeout=600)
        device.booted("A", "1.2.0", timeout=600)
        status = device.check("avocado-update status")
        assert "Current: 1.2.0 (Partition A)" in status and "Slot A: confirmed" in status
        persisted()
        machine.send("systemctl poweroff\n")
        assert machine.ended.wait(timeout=300)
        phase("1.3.0 failed its health check, rolled back to A; data kept")

    for name, at in phases:
        print(f"{at:7.1f} s  {name}")
