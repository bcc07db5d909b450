"""USB recovery media and PXE trees: structure read back with independent tools (xorriso,
sfdisk, mtools, file listings), reproducibility, and refusal of disks in use."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, Product, avobuild_cli

from avobuild.disk.mbr import derive_disk_signature
from avobuild.errors import BuildError, InstallError
from avobuild.media.pxe import parse_device, parse_server
from avobuild.media.usb import busy_disks, check_target_device
from avobuild.model.recipe import load_recipe


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


def test_usb_media_is_reproducible(usb_media: tuple[Product, Path, Path], tmp_path: Path) -> None:
    product, first, second = usb_media
    assert first.read_bytes() == second.read_bytes()
    # pycdlib renders dates in the local time zone unless avobuild pins them: a build in a
    # zone 13:45 ahead, seconds later, must give the same bytes.
    third = tmp_path / "third.iso"
    exe = shutil.which("avobuild") or REPO / ".venv" / "bin" / "avobuild"
    subprocess.run(
        [str(exe), "media", "usb", str(product.recipe), "-o", str(third)],
        env={**os.environ, "TZ": "Pacific/Chatham"},
        capture_output=True,
        check=True,
    )
    assert third.read_bytes() == first.read_bytes()


def _xorriso(image: Path, *commands: str, before: tuple[str, ...] = ()) -> str:
    """xorriso's report (it writes some of it on stderr, so both streams, merged)."""
    return subprocess.run(
        ["xorriso", *before, "-indev", str(image), *commands],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    ).stdout


def _report_lba(image: Path, path: str) -> tuple[int, int]:
    """(2048-byte block, size) of a file of the ISO, as xorriso finds it."""
    report = _xorriso(image, "-find", path, "-exec", "report_lba", "--")
    line = next(line for line in report.splitlines() if line.startswith("File data lba:"))
    fields = [field.strip() for field in line.split(":", 1)[1].split(",")]
    return int(fields[1]), int(fields[3])


def test_usb_media_boot_records(usb_media: tuple[Product, Path, Path]) -> None:
    product, image, _ = usb_media
    report = _xorriso(image, "-report_el_torito", "plain")
    assert "Volume id    : 'TESTPROD_RECOVERY'" in report
    assert "Boot record  : El Torito , MBR isohybrid" in report
    boot_lines = [line for line in report.splitlines() if line.startswith("El Torito boot img")]
    platforms = [line.split(":")[1].split()[1] for line in boot_lines]
    assert platforms == ["BIOS", "UEFI"]
    assert "El Torito img path :   1  /isolinux/isolinux.bin" in report
    assert "El Torito img opts :   1  boot-info-table isohybrid-suitable" in report
    assert "El Torito img path :   2  /boot/grub/efi.img" in report
    assert "El Torito cat path : /isolinux/boot.cat" in report

    # the same as mkisofs options: what a user would have typed for xorriso
    options = _xorriso(image, "-report_el_torito", "as_mkisofs")
    for expected in (
        "-V 'TESTPROD_RECOVERY'",
        "--modification-date='2026010100000000'",
        "-c '/isolinux/boot.cat'",
        "-b '/isolinux/isolinux.bin'\n-no-emul-boot\n-boot-load-size 4\n-boot-info-table",
        "-e '/boot/grub/efi.img'\n-no-emul-boot",
        "--mbr-force-bootable",
        "-iso_mbr_part_type 0x00",
    ):
        assert expected in options, expected

    # the system area: isohybrid MBR, partition 1 over the ISO, partition 2 over efi.img
    efi_block, efi_size = _report_lba(image, "/boot/grub/efi.img")
    bios_block, bios_size = _report_lba(image, "/isolinux/isolinux.bin")
    area = _xorriso(image, "-report_system_area", "plain")
    sectors = image.stat().st_size // 512
    assert "System area summary: MBR isohybrid" in area
    assert f"ISO image size/512 : {sectors}" in area
    assert re.search(rf"MBR partition      :   1   0x80  0x00 +0 +{sectors}\n", area), area
    assert re.search(
        rf"MBR partition      :   2   0x00  0xef +{efi_block * 4} +{efi_size // 512}\n", area
    )
    assert "MBR partition path :   2  /boot/grub/efi.img" in area

    dump = json.loads(
        subprocess.run(
            ["sfdisk", "--json", str(image)], capture_output=True, text=True, check=True
        ).stdout
    )["partitiontable"]
    assert dump["label"] == "dos"
    assert int(dump["id"], 16) == derive_disk_signature(f"{load_recipe(product.recipe).seed}/usb")
    assert [(p["start"], p["size"], p["type"]) for p in dump["partitions"]] == [
        (0, sectors, "0"),
        (efi_block * 4, efi_size // 512, "ef"),
    ]
    listing = subprocess.run(
        ["mdir", "-b", "-i", f"{image}@@{efi_block * 4 * 512}", "::/EFI/BOOT"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "MTOOLS_SKIP_CHECK": "1"},
    ).stdout
    assert "BOOTX64.EFI" in listing.upper()

    # sector 0: isohdpfx.bin's code, then where it finds isolinux.bin (512-byte LBA), 55 AA
    with image.open("rb") as handle:
        mbr = handle.read(512)
    code = Path("/usr/lib/ISOLINUX/isohdpfx.bin").read_bytes()
    assert mbr[:432] == code[:432]
    assert struct.unpack_from("<Q", mbr, 432)[0] == bios_block * 4
    assert mbr[510:] == b"\x55\xaa"

    # the boot information table ISOLINUX reads (El Torito: bytes 8-63 of the boot file),
    # computed here from the package's isolinux.bin
    original = Path("/usr/lib/ISOLINUX/isolinux.bin").read_bytes()
    assert bios_size == len(original)
    patched = _iso_file(image, "/isolinux/isolinux.bin")
    words = struct.unpack_from(f"<{(len(original) - 64) // 4}I", original, 64)
    checksum = sum(words) & 0xFFFFFFFF
    assert struct.unpack_from("<4I", patched, 8) == (16, bios_block, len(original), checksum)
    assert patched[:8] == original[:8] and patched[64:] == original[64:]


def test_usb_media_dates_names_and_modes(usb_media: tuple[Product, Path, Path]) -> None:
    _, image, _ = usb_media
    pvd = _xorriso(image, "-pvd_info")
    for field in ("Creation Time", "Modif. Time", "Eff. Time"):
        assert re.search(rf"{re.escape(field)} *: 2026010100000000\n", pvd), field
    assert re.search(r"Expir. Time  : 0000000000000000\n", pvd)
    listing = _xorriso(image, "-find", "/", "-exec", "lsdl", "--")
    entries = [line for line in listing.splitlines() if line[:1] in "d-" and line.endswith("'")]
    assert len(entries) >= 17
    for line in entries:
        mode, _links, owner, group = line.split()[:4]
        assert (owner, group) == ("0", "0"), line
        assert " Jan  1  2026 '" in line, line
        assert mode in ("drwxr-xr-x", "dr-xr-xr-x", "-rw-r--r--"), line
    # plain ECMA-119 names, as ISOLINUX reads them, and Joliet names as Windows does
    ecma = _xorriso(image, "-find", "/", before=("-read_fs", "ecma119"))
    for name in (
        "/ISOLINUX/ISOLINUX.CFG",
        "/BOOT/VMLINUZ",
        "/BOOT/INITRD.IMG",
        "/AVOBUILD/FACTORY_IMG.GZ",
        "/AVOBUILD/MEDIUM_ID",
    ):
        assert f"'{name}'" in ecma, name
    joliet = _xorriso(image, "-find", "/", before=("-read_fs", "norock"))
    assert "'/avobuild/factory.img.gz.sha256'" in joliet and "'/boot/grub/grub.cfg'" in joliet


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
