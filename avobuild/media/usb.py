"""USB recovery media: one hybrid image that boots from a stick or an optical drive.

The image is ISO 9660 written by pycdlib (`avobuild/disk/iso.py`: Rock Ridge and Joliet names)
with two El Torito boot entries: ISOLINUX for BIOS machines and a FAT image
(`/boot/grub/efi.img`) holding a GRUB EFI binary (EFI/BOOT/BOOTX64.EFI) for UEFI. An isohybrid
MBR written by avobuild makes the same bytes a disk: ISOLINUX's isohdpfx.bin boot code finds
isolinux.bin for BIOS firmware, and a partition record of type 0xEF over efi.img is the EFI
system partition UEFI firmware boots from a stick. The medium carries the recovery kernel and
initramfs, the factory image (gzip, with the sha256 of the raw image) and optionally a bundle;
the initramfs finds the medium again by the marker /avobuild/medium-id.

Reproducible: staged files are dated SOURCE_DATE_EPOCH and added in sorted order, the ISO's
dates are SOURCE_DATE_EPOCH in UTC and the MBR disk signature derives from the recipe seed.

Writing to a stick (`check_target_device`, `write_to_device`) refuses any disk that holds a
mounted filesystem or active swap, in particular the disk the host runs from."""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from avobuild.boot.bootfiles import (
    GRUB_COMMON_MODULES,
    GRUB_DISK_MODULES,
    ISOHYBRID_MBR,
    ISOLINUX_BIN,
    LDLINUX_C32,
    build_grub_efi,
    copy_host_file,
    host_file,
)
from avobuild.disk.iso import IsoBoot, write_iso, write_isohybrid_mbr
from avobuild.disk.mbr import derive_disk_signature
from avobuild.errors import InstallError
from avobuild.fs import build_filesystem
from avobuild.image.factory import build_factory_image
from avobuild.media.recovery import (
    INITRD_NAME,
    KERNEL_NAME,
    Mode,
    RecoverySystem,
    build_initramfs,
    medium_id,
    render_template,
)
from avobuild.model.layout import FsType
from avobuild.model.recipe import Recipe, ToolSet
from avobuild.run import source_date_epoch

Progress = Callable[[str], None]
FACTORY_NAME = "factory.img.gz"
BIOS_IMAGE = "isolinux/isolinux.bin"
BOOT_CATALOG = "isolinux/boot.cat"
EFI_IMAGE = "boot/grub/efi.img"
BUNDLE_NAME = "update.avb"
_MiB = 1 << 20
_COPY_BLOCK = 4 * _MiB
_VOLUME_ID = re.compile(r"[^A-Z0-9_]")


@dataclass(frozen=True)
class UsbMedium:
    path: Path
    size: int
    system: RecoverySystem
    factory_image: Path | None
    bundle: Path | None


def boot_parameters(recipe: Recipe) -> dict[str, str | int]:
    """Serial unit and speed of the recipe's console, for boot-loader configurations."""
    console = recipe.recovery.console
    tty, _, speed = console.partition(",")
    unit = int(tty.removeprefix("ttyS")) if tty.startswith("ttyS") else 0
    return {"serial_unit": unit, "serial_speed": int((speed or "115200").rstrip("n8"))}


def volume_id(recipe: Recipe) -> str:
    return _VOLUME_ID.sub("_", f"{recipe.name}_RECOVERY".upper())[:32]


def compress_factory_image(image: Path, output: Path) -> str:
    """gzip `image` into `output` (no name, zero mtime); return the sha256 of `image`."""
    digest = hashlib.sha256()
    with (
        image.open("rb") as source,
        output.open("wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0) as compressed,
    ):
        while block := source.read(_COPY_BLOCK):
            digest.update(block)
            compressed.write(block)
    return digest.hexdigest()


def _date_tree(root: Path) -> None:
    epoch = source_date_epoch()
    for path in sorted(root.rglob("*"), reverse=True):
        path.chmod(0o755 if path.is_dir() else 0o644)
        os.utime(path, (epoch, epoch))
    root.chmod(0o755)
    os.utime(root, (epoch, epoch))


def build_usb_media(
    recipe: Recipe,
    output: Path,
    workdir: Path,
    *,
    factory_image: Path | None = None,
    bundle: Path | None = None,
    include_tools: bool = False,
    include_firmware: bool = False,
    applier: Path | None = None,
    progress: Progress | None = None,
) -> UsbMedium:
    """Build the hybrid ISO at `output`.

    Without `factory_image` the recipe's factory image is built first. `include_tools`
    carries every tool set (network, storage, diagnostics) instead of the recipe's.
    """
    stage = workdir / "usb-tree"
    if stage.exists():
        shutil.rmtree(stage)
    (stage / "avobuild").mkdir(parents=True)
    identifier = medium_id(recipe)
    (stage / "avobuild" / "medium-id").write_text(identifier + "\n")
    (stage / "avobuild" / f"id-{identifier}").write_text(identifier + "\n")
    tools = tuple(ToolSet) if include_tools else None
    (stage / "boot").mkdir()
    system = build_initramfs(
        recipe,
        stage / "boot" / INITRD_NAME,
        mode=Mode.USB,
        tools=tools,
        applier=applier,
        include_firmware=include_firmware,
        progress=progress,
    )
    shutil.copyfile(system.kernel, stage / "boot" / KERNEL_NAME)

    if factory_image is None:
        if progress:
            progress("building the factory image to carry")
        factory_image = build_factory_image(
            recipe, workdir / "factory", workdir / "factory-work", progress or _quiet
        ).path
    if progress:
        progress(f"compressing {factory_image.name} into {FACTORY_NAME}")
    sha256 = compress_factory_image(factory_image, stage / "avobuild" / FACTORY_NAME)
    (stage / "avobuild" / f"{FACTORY_NAME}.sha256").write_text(f"{sha256}  factory.img\n")
    if bundle is not None:
        shutil.copyfile(bundle, stage / "avobuild" / BUNDLE_NAME)

    values = {
        "product": recipe.name,
        "version": recipe.version,
        "cmdline": system.cmdline,
        "cmdline_verbose": system.cmdline.replace(" quiet", "") + " loglevel=7",
        "timeout_tenths": 20,
        "timeout_seconds": 2,
        **boot_parameters(recipe),
    }
    copy_host_file(ISOLINUX_BIN, stage / "isolinux" / "isolinux.bin", "boot USB media on BIOS")
    copy_host_file(LDLINUX_C32, stage / "isolinux" / "ldlinux.c32", "boot USB media on BIOS")
    (stage / "isolinux" / "isolinux.cfg").write_text(render_template("isolinux.cfg", **values))
    (stage / "boot" / "grub").mkdir(parents=True)
    (stage / "boot" / "grub" / "grub.cfg").write_text(render_template("usb-grub.cfg", **values))

    if progress:
        progress("building the GRUB EFI image")
    efi_tree = workdir / "efi-tree"
    if efi_tree.exists():
        shutil.rmtree(efi_tree)
    (efi_tree / "EFI" / "BOOT").mkdir(parents=True)
    grub = efi_tree / "EFI" / "BOOT" / "BOOTX64.EFI"
    build_grub_efi(
        grub,
        render_template("grub-embedded.cfg", marker=f"id-{identifier}"),
        "/boot/grub",
        GRUB_COMMON_MODULES + GRUB_DISK_MODULES,
    )
    shutil.copyfile(grub, stage / "boot" / "grub" / "bootx64.efi")
    efi_size = (grub.stat().st_size // _MiB + 2) * _MiB
    efi_image = stage / EFI_IMAGE
    build_filesystem(
        FsType.VFAT, efi_tree, efi_image, efi_size, label="EFIBOOT", seed=f"{recipe.seed}/usb-efi"
    )
    _date_tree(stage)

    if progress:
        progress(f"writing {output.name} (ISO 9660, El Torito BIOS and UEFI, isohybrid MBR)")
    image = write_iso(
        stage,
        output,
        volume_id=volume_id(recipe),
        boot=IsoBoot(bios_image=BIOS_IMAGE, catalog=BOOT_CATALOG, efi_image=EFI_IMAGE),
        epoch=source_date_epoch(),
    )
    boot_code = host_file(ISOHYBRID_MBR, "make USB media bootable from a disk on BIOS")
    write_isohybrid_mbr(image, boot_code.read_bytes(), derive_disk_signature(f"{recipe.seed}/usb"))
    return UsbMedium(output, output.stat().st_size, system, factory_image, bundle)


def _quiet(_message: str) -> None:
    pass


# --- writing to a stick -------------------------------------------------------------------


@dataclass(frozen=True)
class TargetDevice:
    path: Path
    name: str  # kernel name of the whole disk, e.g. "sdb"
    size: int


def _block_name(device: Path) -> str:
    resolved = device.resolve()
    if not resolved.exists() or not stat.S_ISBLK(resolved.stat().st_mode):
        raise InstallError(f"{device}: not a block device")
    return resolved.name


def _whole_disks(name: str, sys_block: Path) -> set[str]:
    """The whole disks under block device `name`: its parent disk, or dm/md slaves' disks."""
    entry = sys_block.parent / "class" / "block" / name
    if not entry.exists():
        return {name}
    if (entry / "partition").exists():
        return {entry.resolve().parent.name}
    slaves = sorted((entry / "slaves").iterdir()) if (entry / "slaves").is_dir() else []
    if slaves:
        disks: set[str] = set()
        for slave in slaves:
            disks |= _whole_disks(slave.name, sys_block)
        return disks
    return {name}


def busy_disks(
    mounts: Path = Path("/proc/mounts"),
    swaps: Path = Path("/proc/swaps"),
    sys_block: Path = Path("/sys/block"),
) -> dict[str, str]:
    """Whole disks in use, by kernel name, with why: mounted filesystems and active swap."""
    users: list[tuple[str, str]] = []
    for line in mounts.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0].startswith("/dev/"):
            mountpoint = fields[1].replace("\\040", " ")
            users.append((fields[0], f"{fields[0]} is mounted on {mountpoint}"))
    if swaps.exists():
        for line in swaps.read_text().splitlines()[1:]:
            fields = line.split()
            if fields and fields[0].startswith("/dev/"):
                users.append((fields[0], f"{fields[0]} is in use as swap"))
    busy: dict[str, str] = {}
    for device, reason in users:
        path = Path(device)
        if not path.exists():
            continue
        for disk in sorted(_whole_disks(path.resolve().name, sys_block)):
            busy.setdefault(disk, reason)
    return busy


def check_target_device(device: Path) -> TargetDevice:
    """Refuse anything but an unused whole disk: the host's own disk or any mounted one."""
    name = _block_name(device)
    sys_block = Path("/sys/block")
    if (Path("/sys/class/block") / name / "partition").exists():
        raise InstallError(f"{device}: is a partition; give the whole stick (e.g. /dev/sdb)")
    busy = busy_disks(sys_block=sys_block)
    if name in busy:
        root = next(
            (
                line.split()[0]
                for line in Path("/proc/mounts").read_text().splitlines()
                if len(line.split()) > 1 and line.split()[1] == "/"
            ),
            "",
        )
        host = " (the disk the host runs from)" if root and name in _root_disks(root) else ""
        raise InstallError(f"{device}: refusing to write a disk in use{host}: {busy[name]}")
    size = int((sys_block / name / "size").read_text()) * 512 if (sys_block / name).exists() else 0
    return TargetDevice(device, name, size)


def _root_disks(root_device: str) -> set[str]:
    path = Path(root_device)
    return _whole_disks(path.resolve().name, Path("/sys/block")) if path.exists() else set()


def write_to_device(
    image: Path, target: TargetDevice, progress: Callable[[int, int], None] | None = None
) -> None:
    """Write `image` to the checked device (opened exclusively), then read it back."""
    size = image.stat().st_size
    if target.size and size > target.size:
        raise InstallError(f"{target.path}: {target.size} bytes, too small for {image} ({size})")
    check_target_device(target.path)
    digest = hashlib.sha256()
    # O_EXCL on a block device fails while the kernel has it mounted: a last guard.
    fd = os.open(target.path, os.O_WRONLY | os.O_EXCL)
    try:
        with image.open("rb") as source:
            done = 0
            while block := source.read(_COPY_BLOCK):
                os.write(fd, block)
                digest.update(block)
                done += len(block)
                if progress:
                    progress(done, size)
        os.fsync(fd)
    finally:
        os.close(fd)
    check = hashlib.sha256()
    with target.path.open("rb") as written:
        remaining = size
        while remaining:
            block = written.read(min(_COPY_BLOCK, remaining))
            if not block:
                break
            check.update(block)
            remaining -= len(block)
    if check.digest() != digest.digest():
        raise InstallError(f"{target.path}: read-back does not match {image}")
