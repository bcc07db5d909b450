"""USB recovery media and PXE trees: structure read back with independent tools (xorriso,
sfdisk, mtools, file listings), reproducibility, and refusal of disks in use."""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
from pathlib import Path

import pytest
from conftest import Product, avobuild_cli

from avobuild.errors import BuildError, InstallError
from avobuild.media.pxe import parse_device, parse_server
from avobuild.media.usb import busy_disks, check_target_device


def tree_digest(root: Path) -> dict[str, str]:
    """Every file of a tree with its sha256 and mode (the comparison two builds must pass)."""
    return {
        path.relative_to(root).as_posix(): (
            f"{oct(path.stat().st_mode)} "
            + (hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir")
        )
        for path in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def usb_media(tmp_path_factory: pytest.TempPathFactory) -> tuple[Product, Path, Path]:
    from conftest import write_product

    root = tmp_path_factory.mktemp("usb")
    product = write_product(root / "product")
    first = root / "first.iso"
    second = root / "second.iso"
    avobuild_cli("media", "usb", product.recipe, "-o", first)
    avobuild_cli("media", "usb", product.recipe, "-o", second, "--workdir", root / "work")
    return product, first, second


def test_usb_media_is_reproducible(usb_media: tuple[Product, Path, Path]) -> None:
    _, first, second = usb_media
    assert first.read_bytes() == second.read_bytes()


def test_usb_media_boot_records(usb_media: tuple[Product, Path, Path]) -> None:
    _, image, _ = usb_media
    # xorriso prints the volume summary on stderr and the El Torito report on stdout.
    report = subprocess.run(
        ["xorriso", "-indev", str(image), "-report_el_torito", "plain"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=True,
    ).stdout
    assert "Volume id    : 'TESTPROD_RECOVERY'" in report
    boot_lines = [line for line in report.splitlines() if line.startswith("El Torito boot img")]
    platforms = [line.split(":")[1].split()[1] for line in boot_lines]
    assert platforms == ["BIOS", "UEFI"]
    assert "/isolinux/isolinux.bin" in report
    assert "MBR isohybrid" in report and "GPT" in report

    # GPT for disk boot: partition 2 is an EFI system partition holding GRUB
    dump = subprocess.run(
        ["sfdisk", "-d", str(image)], capture_output=True, text=True, check=True
    ).stdout
    assert "label: gpt" in dump
    esp = next(line for line in dump.splitlines() if "C12A7328-F81F-11D2-BA4B-00A0C93EC93B" in line)
    start = int(esp.split("start=")[1].split(",")[0])
    listing = subprocess.run(
        ["mdir", "-b", "-i", f"{image}@@{start * 512}", "::/EFI/BOOT"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "MTOOLS_SKIP_CHECK": "1"},
    ).stdout
    assert "BOOTX64.EFI" in listing.upper()
    with image.open("rb") as handle:
        handle.seek(510)
        assert handle.read(2) == b"\x55\xaa"  # MBR boot code for BIOS disk boot


def _iso_file(image: Path, path: str) -> bytes:
    """A file of the ISO, extracted by xorriso."""
    target = image.parent / "extract" / path.strip("/")
    if not target.exists():
        subprocess.run(
            ["xorriso", "-osirrox", "on", "-indev", str(image), "-extract", path, str(target)],
            capture_output=True,
            check=True,
        )
    return target.read_bytes()


def test_usb_media_contents(usb_media: tuple[Product, Path, Path], tmp_path: Path) -> None:
    product, image, _ = usb_media
    listing = subprocess.run(
        ["xorriso", "-indev", str(image), "-find", "/", "-type", "f"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    files = {line.strip().strip("'") for line in listing.splitlines() if line.startswith("'")}
    for required in (
        "/boot/vmlinuz",
        "/boot/initrd.img",
        "/boot/grub/grub.cfg",
        "/isolinux/isolinux.cfg",
        "/isolinux/ldlinux.c32",
        "/avobuild/factory.img.gz",
        "/avobuild/factory.img.gz.sha256",
        "/avobuild/medium-id",
    ):
        assert required in files, required
    assert _iso_file(image, "/boot/vmlinuz") == product.kernel.read_bytes()
    factory = gzip.decompress(_iso_file(image, "/avobuild/factory.img.gz"))
    digest = _iso_file(image, "/avobuild/factory.img.gz.sha256").decode().split()[0]
    assert hashlib.sha256(factory).hexdigest() == digest
    disk = tmp_path / "factory.img"
    disk.write_bytes(factory)
    dump = subprocess.run(
        ["sfdisk", "-d", str(disk)], capture_output=True, text=True, check=True
    ).stdout
    assert 'name="system-a"' in dump and 'name="recovery"' in dump
    isolinux = _iso_file(image, "/isolinux/isolinux.cfg").decode()
    assert "SERIAL 0 115200" in isolinux and "avo.mode=usb" in isolinux
    grub = _iso_file(image, "/boot/grub/grub.cfg").decode()
    assert "serial --unit=0 --speed=115200" in grub and "initrd /boot/initrd.img" in grub


def test_usb_include_firmware_needs_a_firmware_tree(product: Product, tmp_path: Path) -> None:
    result = avobuild_cli(
        "media", "usb", product.recipe, "-o", tmp_path / "x.iso", "--include-firmware", check=False
    )
    assert result.returncode == BuildError.exit_code
    assert "[recovery] firmware" in result.stderr


def _root_device() -> Path:
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == "/" and fields[0].startswith("/dev/"):
            return Path(fields[0])
    pytest.skip("/ is not mounted from a /dev block device here (container overlay)")


def test_device_refuses_the_host_disk(product: Product, tmp_path: Path) -> None:
    root = _root_device()
    with pytest.raises(InstallError, match="in use"):
        check_target_device(root)
    assert busy_disks()  # the root filesystem's disk at least
    # The CLI refuses before building anything and never asks.
    output = tmp_path / "never.iso"
    result = avobuild_cli(
        "media", "usb", product.recipe, "-o", output, "--device", root, "--yes", check=False
    )
    assert result.returncode == InstallError.exit_code
    assert "refusing to write a disk in use" in result.stderr
    assert not output.exists()


def test_device_must_be_a_block_device(tmp_path: Path) -> None:
    plain = tmp_path / "file"
    plain.write_bytes(b"")
    with pytest.raises(InstallError, match="not a block device"):
        check_target_device(plain)
    with pytest.raises(InstallError, match="not a block device"):
        check_target_device(Path("/dev/null"))


def test_busy_disks_follow_partitions_and_swap(tmp_path: Path) -> None:
    root = _root_device()
    mounts = tmp_path / "mounts"
    mounts.write_text(f"{root} /mnt/x ext4 rw 0 0\nproc /proc proc rw 0 0\n")
    swaps = tmp_path / "swaps"
    swaps.write_text("Filename Type Size Used Priority\n")
    busy = busy_disks(mounts, swaps)
    assert len(busy) == 1
    assert f"{root} is mounted on /mnt/x" in next(iter(busy.values()))


def test_pxe_tree(product: Product, tmp_path: Path) -> None:
    first = tmp_path / "tftp"
    args = ["--server", "192.168.1.100", "--mac", "52:54:00:12:34:56=restore"]
    avobuild_cli("media", "pxe", product.recipe, *args, "--mac", "AA-BB-CC-DD-EE-0F", "-o", first)
    files = sorted(p.relative_to(first).as_posix() for p in first.rglob("*") if p.is_file())
    assert files == [
        "avobuild/initrd.img",
        "avobuild/mac-52-54-00-12-34-56.ipxe",
        "avobuild/mac-aa-bb-cc-dd-ee-0f.ipxe",
        "avobuild/vmlinuz",
        "boot.ipxe",
        "bootx64.efi",
        "grub/grub.cfg",
        "grub/grub.cfg-01-52-54-00-12-34-56",
        "grub/grub.cfg-01-aa-bb-cc-dd-ee-0f",
        "ldlinux.c32",
        "network-recovery.conf",
        "pxelinux.0",
        "pxelinux.cfg/01-52-54-00-12-34-56",
        "pxelinux.cfg/01-aa-bb-cc-dd-ee-0f",
        "pxelinux.cfg/default",
    ]
    assert (first / "pxelinux.0").read_bytes() == Path("/usr/lib/PXELINUX/pxelinux.0").read_bytes()
    assert (first / "bootx64.efi").read_bytes()[:2] == b"MZ"
    default = (first / "pxelinux.cfg" / "default").read_text()
    assert "KERNEL avobuild/vmlinuz" in default and "avo.mode=net" in default
    assert "avo.autorun" not in default
    assert "avo.autorun=restore" in (first / "pxelinux.cfg" / "01-52-54-00-12-34-56").read_text()
    assert "avo.autorun" not in (first / "grub" / "grub.cfg-01-aa-bb-cc-dd-ee-0f").read_text()
    assert "tftp://192.168.1.100/avobuild/vmlinuz" in (first / "boot.ipxe").read_text()
    conf = (first / "network-recovery.conf").read_text()
    for line in (
        "[Server]",
        "URL = https://192.168.1.100/recovery/testprod",
        "Certificate = /etc/ssl/recovery.crt",
        "[Network]",
        "Interface = eth0",
        "DHCP = yes",
        "Timeout = 30",
        "[Authentication]",
        "Method = certificate",
        "DeviceCert = /etc/ssl/device.crt",
        "DeviceKey = /etc/ssl/device.key",
    ):
        assert line in conf.splitlines(), line
    # the same configuration travels inside the initrd
    archive = gzip.decompress((first / "avobuild" / "initrd.img").read_bytes())
    members = subprocess.run(
        ["cpio", "-i", "--to-stdout", "etc/avocado/network-recovery.conf", "--quiet"],
        input=archive,
        capture_output=True,
        check=True,
    ).stdout
    assert members.decode() == conf

    second = tmp_path / "tftp2"
    avobuild_cli("media", "pxe", product.recipe, *args, "--mac", "AA-BB-CC-DD-EE-0F", "-o", second)
    assert tree_digest(first) == tree_digest(second)


def test_pxe_validates_its_input(product: Product, tmp_path: Path) -> None:
    assert parse_server(" 10.0.0.1 ") == "10.0.0.1"
    assert parse_server("fd00::1") == "fd00::1"
    for bad in ("recovery.example.com", "10.0.0.256", ""):
        with pytest.raises(BuildError, match="--server"):
            parse_server(bad)
    with pytest.raises(BuildError, match="--mac"):
        parse_device("52:54:00:12:34")
    with pytest.raises(BuildError, match="action"):
        parse_device("52:54:00:12:34:56=format")
    result = avobuild_cli(
        "media",
        "pxe",
        product.recipe,
        "--server",
        "server.local",
        "-o",
        tmp_path / "t",
        check=False,
    )
    assert result.returncode == BuildError.exit_code
    assert "--server: expected an IPv4 or IPv6 address" in result.stderr
    assert not (tmp_path / "t").exists()


def test_missing_boot_loader_files_name_their_package() -> None:
    from avobuild.boot.bootfiles import host_file
    from avobuild.errors import ToolMissing

    with pytest.raises(ToolMissing, match=r"apt-get install isolinux"):
        host_file(("/nonexistent/isolinux.bin", "isolinux"), "boot USB media on BIOS")
