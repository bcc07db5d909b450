"""Boot the recovery media in QEMU (software emulation, no KVM) up to the recovery menu, read
from the serial console, and drive the menu: restore a factory image from the USB stick onto
a blank disk, repair the boot state from the recovery partition, run diagnostics over PXE.

Firmware, boot loaders and the kernel all come from Debian packages (seabios, ovmf, ipxe-qemu,
isolinux, pxelinux, grub-efi-amd64-bin, linux-image via scripts/fetch-kernel).
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import REPO, Product, avobuild_cli, write_product

from avobuild.boot.bootfiles import GRUB_COMMON_MODULES, GRUB_DISK_MODULES, build_grub_efi
from avobuild.boot.grubenv import parse_grubenv, render_grubenv
from avobuild.disk.gpt import read_gpt
from avobuild.fs import list_ext4_tree, read_vfat_file, write_vfat_file

pytestmark = pytest.mark.slow

DEBIAN = REPO / "build" / "debian"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
MENU = b"Select option: "
POWER_OFF = b"reboot: Power down"
BOOT_TIMEOUT = 240
X86_64_PC = ("-accel", "tcg", "-m", "512")
# QEMU's arm64 "virt" board: cortex-a57 (the default "max" CPU emulates pointer authentication
# about 5x slower, and Debian's kernel uses it), one CPU (MTTCG on a 2-core host is slower),
# no network card (U-Boot would try DHCP boot when no script is found).
AARCH64_VIRT = ("-machine", "virt", "-cpu", "cortex-a57", "-m", "512", "-nic", "none")

if not (DEBIAN / "vmlinuz").exists() or not (DEBIAN / "modules" / ".complete").exists():
    pytest.skip(
        "build/debian/vmlinuz or modules missing: run scripts/fetch-kernel build/debian",
        allow_module_level=True,
    )


class Qemu:
    """A QEMU process whose serial console is its stdin/stdout, read by a thread.

    QEMU runs with -no-reboot: a guest reset ends the process. With `reboot`, the reader
    starts QEMU again at once on the same drives and UEFI variables, so the console goes on
    as on a machine that resets (a cold start: OVMF's warm reset under TCG sometimes stalls
    for minutes); unless the guest powered off (Linux prints "reboot: Power down").

    `binary` and `machine` choose the emulator and its machine arguments (the default: an
    x86_64 PC in software emulation with 512 MiB; `AARCH64_VIRT` for arm64)."""

    def __init__(
        self,
        args: list[str],
        log: Path,
        *,
        reboot: bool = False,
        binary: str = "qemu-system-x86_64",
        machine: tuple[str, ...] = X86_64_PC,
    ) -> None:
        self.args = args
        self.binary = binary
        self.machine = machine
        self.reboot = reboot
        self.resets = 0
        self.stopping = False
        self.ended = threading.Event()
        self.log = log
        # written as it arrives: `tail -f console.log` watches a running test
        self.log_file = log.open("wb", buffering=0)
        self.output = bytearray()
        self.lock = threading.Lock()
        self.process = self._start()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.position = 0

    def _start(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                shutil.which(self.binary) or self.binary,
                *self.machine,
                "-display",
                "none",
                "-monitor",
                "none",
                "-serial",
                "stdio",
                "-no-reboot",
                *self.args,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

    def _read(self) -> None:
        while True:
            process = self.process
            started = len(self.output)
            assert process.stdout is not None
            while chunk := process.stdout.read1(4096):
                with self.lock:
                    self.output += chunk
                self.log_file.write(chunk)
            status = process.wait()
            with self.lock:
                powered_off = POWER_OFF in self.output[started:]
                if not self.reboot or self.stopping or status != 0 or powered_off:
                    self.ended.set()
                    return
                self.resets += 1
                self.process = self._start()

    def expect(self, pattern: bytes, timeout: float = BOOT_TIMEOUT) -> bytes:
        """Wait until `pattern` appears after the previous match; return the text up to it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                found = self.output.find(pattern, self.position)
                if found >= 0:
                    text = bytes(self.output[self.position : found + len(pattern)])
                    self.position = found + len(pattern)
                    return text
            if self.ended.is_set():
                break
            time.sleep(0.2)
        tail = bytes(self.output[-3000:]).decode(errors="replace")
        raise AssertionError(f"{pattern!r} not seen within {timeout} s; console ends:\n{tail}")

    def seen(self, pattern: bytes, since: int, timeout: float = BOOT_TIMEOUT) -> None:
        """Wait until `pattern` appears at or after offset `since`; leave the position alone.

        For messages that race the console's own commands (a confirm printed by the init
        system while the test logs in): `expect` would miss them once a later match has
        moved the position past them.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self.output.find(pattern, since) >= 0:
                    return
            if self.ended.is_set():
                break
            time.sleep(0.2)
        tail = bytes(self.output[-3000:]).decode(errors="replace")
        raise AssertionError(f"{pattern!r} not seen within {timeout} s; console ends:\n{tail}")

    def send(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text.encode())
        self.process.stdin.flush()

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            process = self.process
        process.kill()
        process.wait()
        self.reader.join(timeout=10)
        self.log_file.close()


@contextmanager
def qemu(
    args: list[str],
    log: Path,
    *,
    reboot: bool = False,
    binary: str = "qemu-system-x86_64",
    machine: tuple[str, ...] = X86_64_PC,
) -> Iterator[Qemu]:
    """QEMU on the serial console; a guest reboot ends QEMU unless `reboot` is true."""
    machine_process = Qemu(args, log, reboot=reboot, binary=binary, machine=machine)
    try:
        yield machine_process
    finally:
        machine_process.stop()


def restore_factory_image(machine: Qemu, disk: str, timeout: float = 600) -> None:
    """At the recovery menu: "1. Restore factory image" onto `disk`, confirmed."""
    machine.send("1\n")
    listing = machine.expect(b"Disk to write (e.g. /dev/sda): ")
    assert disk.encode() in listing
    machine.send(f"{disk}\n")
    machine.expect(b'Type "yes" to continue: ')
    machine.send("yes\n")
    machine.expect(b"factory image restored and verified", timeout=timeout)
    machine.expect(MENU)


def uefi_args(tmp_path: Path) -> list[str]:
    variables = tmp_path / "OVMF_VARS.fd"
    shutil.copyfile(OVMF_VARS, variables)
    return [
        "-drive",
        f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
        "-drive",
        f"if=pflash,format=raw,file={variables}",
    ]


@pytest.fixture(scope="module")
def device_product(tmp_path_factory: pytest.TempPathFactory) -> tuple[Product, Path]:
    """A small product recovered with Debian's kernel; its factory image, built once."""
    root = tmp_path_factory.mktemp("boot")
    product = write_product(root / "product")
    layout = product.layout.read_text()
    recovery = layout.index("[partition.recovery]")
    product.layout.write_text(
        layout[:recovery] + layout[recovery:].replace('size = "8M"', 'size = "32M"')
    )
    product.recipe.write_text(
        product.recipe.read_text()
        + f'\n[recovery]\nkernel = "{DEBIAN / "vmlinuz"}"\nmodules = "{DEBIAN / "modules"}"\n'
    )
    avobuild_cli("image", product.recipe, "-o", root / "out")
    return product, next((root / "out").glob("*.img"))


def test_usb_stick_boots_on_bios_and_restores_the_factory_image(
    device_product: tuple[Product, Path], tmp_path: Path
) -> None:
    product, factory = device_product
    stick = tmp_path / "recovery.iso"
    avobuild_cli("media", "usb", product.recipe, "-o", stick, "--factory-image", factory)
    blank = tmp_path / "blank.img"
    with blank.open("wb") as handle:
        handle.truncate(factory.stat().st_size)
    args = [
        "-drive",
        f"file={stick},format=raw,if=virtio,readonly=on",
        "-drive",
        f"file={blank},format=raw,if=virtio",
    ]
    with qemu(args, tmp_path / "console.log") as machine:
        machine.expect(b"ISOLINUX")
        boot = machine.expect(MENU)
        assert b"recovery medium found on /dev/vda" in boot
        for item in (
            b"1. Restore factory image",
            b"2. Repair boot partition",
            b"3. Reset configuration",
            b"4. Advanced diagnostics",
        ):
            assert item in boot
        restore_factory_image(machine, "/dev/vdb")
    assert blank.read_bytes() == factory.read_bytes()


def test_usb_stick_boots_on_uefi(device_product: tuple[Product, Path], tmp_path: Path) -> None:
    product, factory = device_product
    stick = tmp_path / "recovery.iso"
    avobuild_cli("media", "usb", product.recipe, "-o", stick, "--factory-image", factory)
    args = [
        *uefi_args(tmp_path),
        "-device",
        "qemu-xhci",
        "-drive",
        f"if=none,id=stick,format=raw,readonly=on,file={stick}",
        "-device",
        "usb-storage,drive=stick",
        "-net",
        "none",
    ]
    with qemu(args, tmp_path / "console.log") as machine:
        machine.expect(b"testprod 1.0.0 recovery")  # the GRUB menu on the serial console
        boot = machine.expect(MENU)
        assert b"recovery medium found on /dev/sd" in boot
        assert b"Avocado OS Recovery - testprod 1.0.0 (usb)" in boot


@pytest.mark.parametrize("firmware", ["bios", "uefi"])
def test_usb_image_boots_as_a_cd(
    device_product: tuple[Product, Path], tmp_path: Path, firmware: str
) -> None:
    """The same image burnt to a CD: the El Torito entries (ISOLINUX on BIOS, the FAT image
    with GRUB on UEFI), and the initramfs finds its medium on the CD drive."""
    product, factory = device_product
    disc = tmp_path / "recovery.iso"
    avobuild_cli("media", "usb", product.recipe, "-o", disc, "--factory-image", factory)
    args = [*(uefi_args(tmp_path) if firmware == "uefi" else []), "-cdrom", str(disc)]
    args += ["-net", "none"]
    with qemu(args, tmp_path / "console.log") as machine:
        machine.expect(b"ISOLINUX" if firmware == "bios" else b"testprod 1.0.0 recovery")
        boot = machine.expect(MENU)
        assert b"recovery medium found on /dev/sr0" in boot


def test_recovery_partition_boots_and_repairs_the_boot_state(
    device_product: tuple[Product, Path], tmp_path: Path
) -> None:
    product, factory = device_product
    disk = tmp_path / "disk.img"
    shutil.copyfile(factory, disk)
    recovery = tmp_path / "recovery.img"
    avobuild_cli("recovery", "build", product.recipe, "-o", recovery)
    avobuild_cli("recovery", "install", recovery, "--disk", disk)

    # The device's boot loader: GRUB on the ESP with the rendered recovery entry.
    with disk.open("rb") as handle:
        table = read_gpt(handle)
    esp = table.find("boot")
    assert esp is not None
    esp_offset = table.offset(esp)
    grub = tmp_path / "BOOTX64.EFI"
    build_grub_efi(grub, "", "/EFI/BOOT", GRUB_COMMON_MODULES + GRUB_DISK_MODULES)
    write_vfat_file(disk, esp_offset, "EFI/BOOT/BOOTX64.EFI", grub.read_bytes())
    entry = subprocess.run(
        ["debugfs", "-R", "cat /boot/grub/recovery.cfg", str(recovery)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    config = (
        "serial --unit=0 --speed=115200\nterminal_input serial\nterminal_output serial\n"
        "set timeout=0\nset default=avobuild-recovery\n" + entry
    )
    write_vfat_file(disk, esp_offset, "EFI/BOOT/grub.cfg", config.encode())

    # A broken update: slot B primary, unconfirmed, no tries left; A still confirmed.
    state = parse_grubenv(read_vfat_file(disk, esp_offset, "avobuild/grubenv"))
    assert state["avo_primary"] == "A" and state["avo_A_ok"] == "1"
    broken = {**state, "avo_primary": "B", "avo_B_ok": "0", "avo_B_tries": "0"}
    write_vfat_file(disk, esp_offset, "avobuild/grubenv", render_grubenv(broken))

    args = [*uefi_args(tmp_path), "-drive", f"file={disk},format=raw,if=virtio", "-net", "none"]
    with qemu(args, tmp_path / "console.log") as machine:
        boot = machine.expect(MENU)
        assert b"Avocado OS Recovery - testprod 1.0.0 (partition)" in boot
        machine.send("5\n")
        repair = machine.expect(MENU, timeout=120)
        assert b"making slot A primary" in repair, repair.decode(errors="replace")
        machine.send("2\n")
        repair_boot = machine.expect(MENU, timeout=120)
        assert b"boot partition /dev/vda1 is consistent" in repair_boot
        assert b"slot A primary (ok=1" in repair_boot  # the repaired state, read back
        machine.send("3\n")
        machine.expect(b'Type "yes" to continue: ')
        machine.send("yes\n")
        reset = machine.expect(MENU, timeout=120)
        assert b"no factory image: formatting /dev/vda4 empty" in reset
    repaired = parse_grubenv(read_vfat_file(disk, esp_offset, "avobuild/grubenv"))
    assert repaired == {**broken, "avo_primary": "A"}
    status = avobuild_cli("status", "--disk", disk).stdout
    assert "* slot A" in status
    # reset-config left an empty, clean ext4 data partition (the factory one held files)
    data = table.find("data")
    assert data is not None
    data_image = tmp_path / "data.img"
    with disk.open("rb") as handle:
        handle.seek(table.offset(data))
        data_image.write_bytes(handle.read(table.size(data)))
    subprocess.run(["e2fsck", "-fn", str(data_image)], check=True, capture_output=True)
    assert list_ext4_tree(data_image) == {}  # the listing leaves out lost+found
    assert product.data.is_dir()


@pytest.mark.parametrize("firmware", ["bios", "uefi"])
def test_pxe_tree_boots_over_the_network(
    device_product: tuple[Product, Path], tmp_path: Path, firmware: str
) -> None:
    """BIOS: iPXE ROM -> pxelinux.0 -> pxelinux.cfg/01-<mac>; UEFI: OVMF -> bootx64.efi
    (GRUB) -> grub/grub.cfg-01-<mac>. Both per-MAC entries autorun diagnose."""
    product, _ = device_product
    tftp = tmp_path / "tftp"
    avobuild_cli(
        "media",
        "pxe",
        product.recipe,
        "--server",
        "10.0.2.2",
        "--mac",
        "52:54:00:12:34:56=diagnose",
        "--tools",
        "network",
        "-o",
        tftp,
    )
    bootfile = "pxelinux.0" if firmware == "bios" else "bootx64.efi"
    args = [
        *(uefi_args(tmp_path) if firmware == "uefi" else ["-boot", "n"]),
        "-netdev",
        f"user,id=n0,tftp={tftp},bootfile={bootfile}",
        "-device",
        "e1000,netdev=n0,mac=52:54:00:12:34:56",
    ]
    with qemu(args, tmp_path / "console.log") as machine:
        machine.expect(b"PXELINUX" if firmware == "bios" else b"GNU GRUB")
        diagnostics = machine.expect(b"== end of diagnostics ==")
        assert b"network: eth0 10.0.2.15/24" in diagnostics  # DHCP from QEMU's user network
        assert b"== testprod 1.0.0 recovery (net) ==" in diagnostics  # the per-MAC autorun
        boot = machine.expect(MENU)
        assert b"1. Restore factory image" in boot
