"""Hybrid ISO images: an ISO 9660 filesystem that boots as a CD and as a disk.

The filesystem is written by pycdlib (ECMA-119 at interchange level 3, with Rock Ridge 1.09
for POSIX names and modes, which Linux and GRUB read, and Joliet for other systems). Its boot
catalog (El Torito 1.0) has two no-emulation entries: a BIOS image loaded 4 sectors at a time
with a boot information table patched in (ISOLINUX needs both), and optionally a UEFI entry
(platform 0xEF) pointing at a FAT image stored as a file of the ISO.

The "hybrid" part is avobuild's own (pycdlib's isohybrid support carries its own copy of the
boot code and random GPT GUIDs). Sector 0, which ISO 9660 leaves to the system (the first
32 KiB are the "system area", ECMA-119 6.2.1), gets an MBR in the classic isohybrid layout:

- bytes 0-431: the boot code of ISOLINUX's `isohdpfx.bin`; bytes 432-439 hold the 512-byte
  LBA of the BIOS image (its 2048-byte block times four), where that code finds it;
- record 1: bootable, type 0x00, from LBA 0 over the whole ISO, so BIOSes that insist on an
  active partition boot it and partition tools see the medium as in use;
- record 2: type 0xEF over the UEFI image's bytes, so UEFI firmware booting the medium as a
  disk finds an EFI system partition (UEFI 2.10 section 5.2.2 allows MBR system partitions;
  firmware ignores the overlapping record 1 because its type is 0x00).

Reproducible: pycdlib reads the clock in each of its modules (`time.time()`) and renders dates
in the host's time zone (`time.localtime`), with no SOURCE_DATE_EPOCH support. While an image
is built, `_fixed_clock` gives those modules a clock that stands at SOURCE_DATE_EPOCH in UTC,
so every volume, directory and Rock Ridge date is that instant with a zero offset. Files are
added in sorted order, with fixed modes and owner 0.
"""

from __future__ import annotations

import contextlib
import os
import stat
import struct
import time as real_time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pycdlib
import pycdlib.dates
import pycdlib.headervd
import pycdlib.inplaceeditor
import pycdlib.pycdlib
import pycdlib.udf
import pycdlib.utils

from avobuild.disk.mbr import MbrRecord, pack_boot_sector
from avobuild.errors import BuildError

BLOCK = 2048
ISOHYBRID_CODE_SIZE = 432
_ISO_NAME_LIMIT = 30  # file identifier characters at level 2 and 3 (ECMA-119 7.5.2)
_DIRECTORY_DEPTH_LIMIT = 8  # ECMA-119 6.8.2.1, without Rock Ridge relocation
_EFI_IMAGE_LIMIT = 0xFFFF * 512  # the 16-bit sector count of a boot catalog entry
_D_CHARACTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_CLOCK_USERS: tuple[ModuleType, ...] = (
    pycdlib.pycdlib,
    pycdlib.headervd,
    pycdlib.dates,
    pycdlib.utils,
    pycdlib.udf,
    pycdlib.inplaceeditor,
)


@dataclass(frozen=True)
class IsoBoot:
    """The El Torito boot images, as paths inside the tree (POSIX, relative)."""

    bios_image: str  # e.g. "isolinux/isolinux.bin"
    catalog: str  # e.g. "isolinux/boot.cat" (created, must not exist in the tree)
    efi_image: str | None = None  # e.g. "boot/grub/efi.img", a FAT image in the tree


@dataclass(frozen=True)
class IsoImage:
    path: Path
    size: int
    bios_image_block: int  # 2048-byte block of the BIOS image
    efi_image_block: int | None
    efi_image_size: int


class _FixedClock:
    """The parts of the `time` module pycdlib uses, standing at `epoch`, in UTC."""

    def __init__(self, epoch: int) -> None:
        self._epoch = epoch

    def time(self) -> float:
        return float(self._epoch)

    def localtime(self, seconds: float | None = None) -> real_time.struct_time:
        return real_time.gmtime(self._epoch if seconds is None else seconds)

    def gmtime(self, seconds: float | None = None) -> real_time.struct_time:
        return real_time.gmtime(self._epoch if seconds is None else seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(real_time, name)


@contextlib.contextmanager
def _fixed_clock(epoch: int) -> Iterator[None]:
    saved = [(module, getattr(module, "time")) for module in _CLOCK_USERS]  # noqa: B009
    clock = _FixedClock(epoch)
    try:
        for module, _ in saved:
            setattr(module, "time", clock)  # noqa: B010
        yield
    finally:
        for module, original in saved:
            setattr(module, "time", original)  # noqa: B010


def iso_names(names: list[str], *, directories: bool) -> dict[str, str]:
    """ECMA-119 level 3 identifiers for the entries of one directory, unique, in the style of
    mkisofs: upper case, other characters as "_", files as NAME.EXT;1 (the dot always)."""
    mapped: dict[str, str] = {}
    used: set[str] = set()
    for name in sorted(names):
        if directories:
            base, extension = name, ""
        else:
            base, dot, extension = name.rpartition(".")
            if not dot:
                base, extension = name, ""
        base = "".join(c if c in _D_CHARACTERS else "_" for c in base.upper())
        extension = "".join(c if c in _D_CHARACTERS else "_" for c in extension.upper())
        extension = extension[: _ISO_NAME_LIMIT - 2]
        room = _ISO_NAME_LIMIT - len(extension) - (0 if directories else 1)
        base = base[:room] or "_"
        candidate = base if directories else f"{base}.{extension}"
        counter = 0
        while candidate in used:
            counter += 1
            suffix = str(counter)
            stem = base[: room - len(suffix)] + suffix
            candidate = stem if directories else f"{stem}.{extension}"
        used.add(candidate)
        mapped[name] = candidate if directories else candidate + ";1"
    return mapped


def write_iso(tree: Path, output: Path, *, volume_id: str, boot: IsoBoot, epoch: int) -> IsoImage:
    """Write `tree` as an ISO 9660 image with El Torito entries for `boot` (no hybrid MBR).

    Symbolic links and special files are refused: the staged tree holds regular files only.
    """
    if output.exists():
        output.unlink()
    if not volume_id or len(volume_id) > 32 or set(volume_id) - _D_CHARACTERS:
        raise BuildError(f"volume id {volume_id!r}: expected 1-32 characters of A-Z, 0-9, _")
    with _fixed_clock(epoch):
        iso = pycdlib.PyCdlib()
        try:
            # A Joliet volume id holds 16 UCS-2 characters and pycdlib gives both volume
            # descriptors the same one; the primary one (what Linux and xorriso show) gets the
            # whole id, as mkisofs does it.
            iso.new(
                interchange_level=3,
                vol_ident=volume_id[:16],
                app_ident_str="AVOBUILD",
                joliet=3,
                rock_ridge="1.09",
            )
            iso.pvd.volume_identifier = pycdlib.utils.encode_space_pad(
                volume_id.encode(), 32, "utf-8"
            )
            iso_paths = _add_tree(iso, tree, boot.catalog)
            bios = iso_paths.get(boot.bios_image)
            if bios is None:
                raise BuildError(f"{tree}: the BIOS boot image {boot.bios_image} is missing")
            catalog_dir, _, catalog_name = boot.catalog.rpartition("/")
            if catalog_dir not in iso_paths:
                raise BuildError(f"{tree}: the boot catalog's directory {catalog_dir} is missing")
            catalog_path = (
                f"{iso_paths[catalog_dir]}/"
                f"{iso_names([catalog_name], directories=False)[catalog_name]}"
            )
            iso.add_eltorito(
                bios,
                bootcatfile=catalog_path,
                rr_bootcatname=catalog_name,
                joliet_bootcatfile="/" + boot.catalog,
                boot_load_size=4,
                boot_info_table=True,
                media_name="noemul",
            )
            efi_path = None
            efi_size = 0
            if boot.efi_image is not None:
                efi_path = iso_paths.get(boot.efi_image)
                if efi_path is None:
                    raise BuildError(f"{tree}: the UEFI boot image {boot.efi_image} is missing")
                efi_size = (tree / boot.efi_image).stat().st_size
                if efi_size > _EFI_IMAGE_LIMIT or efi_size % 512:
                    raise BuildError(
                        f"{tree / boot.efi_image}: {efi_size} bytes; a UEFI boot image must be "
                        f"a multiple of 512 bytes and at most {_EFI_IMAGE_LIMIT}"
                    )
                iso.add_eltorito(
                    efi_path,
                    bootcatfile=catalog_path,
                    rr_bootcatname=catalog_name,
                    joliet_bootcatfile="/" + boot.catalog,
                    boot_load_size=efi_size // 512,
                    efi=True,
                    media_name="noemul",
                )
            iso.write(str(output))
            bios_block = iso.get_record(iso_path=bios).extent_location()
            efi_block = iso.get_record(iso_path=efi_path).extent_location() if efi_path else None
        except pycdlib.pycdlibexception.PyCdlibException as error:
            raise BuildError(f"{output}: pycdlib refused the ISO: {error}") from None
        finally:
            with contextlib.suppress(pycdlib.pycdlibexception.PyCdlibException):
                iso.close()  # refuses when new() failed
    return IsoImage(output, output.stat().st_size, bios_block, efi_block, efi_size)


def _add_tree(iso: Any, tree: Path, catalog: str) -> dict[str, str]:
    """Add every directory and file of `tree` in sorted order; map tree paths to ISO paths."""
    iso_paths: dict[str, str] = {"": ""}
    for directory, dirs, files in sorted(os.walk(tree)):
        dirs.sort()
        relative = Path(directory).relative_to(tree).as_posix()
        relative = "" if relative == "." else relative
        if relative.count("/") + 1 >= _DIRECTORY_DEPTH_LIMIT and relative:
            raise BuildError(f"{directory}: deeper than ISO 9660's 8 directory levels")
        parent = iso_paths[relative]
        for name in dirs + files:
            path = Path(directory) / name
            mode = path.lstat().st_mode
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise BuildError(f"{path}: not a regular file or directory; refused on the ISO")
        if catalog in {f"{relative}/{name}".lstrip("/") for name in files}:
            raise BuildError(f"{tree / catalog}: the boot catalog must not exist in the tree")
        directory_names = iso_names(dirs, directories=True)
        file_names = iso_names(files, directories=False)
        clash = set(directory_names.values()) & {n[:-2].rstrip(".") for n in file_names.values()}
        if clash:
            raise BuildError(f"{directory}: a file and a directory share the ISO name {clash}")
        for name in sorted(dirs):
            iso_path = f"{parent}/{directory_names[name]}"
            child = f"{relative}/{name}".lstrip("/")
            iso.add_directory(iso_path, rr_name=name, joliet_path="/" + child, file_mode=0o040755)
            iso_paths[child] = iso_path
        for name in sorted(files):
            path = Path(directory) / name
            child = f"{relative}/{name}".lstrip("/")
            executable = path.stat().st_mode & 0o111
            iso_path = f"{parent}/{file_names[name]}"
            iso.add_file(
                str(path),
                iso_path,
                rr_name=name,
                joliet_path="/" + child,
                file_mode=0o100755 if executable else 0o100644,
            )
            iso_paths[child] = iso_path
    return iso_paths


def write_isohybrid_mbr(image: IsoImage, boot_code: bytes, disk_signature: int) -> None:
    """Write the MBR that makes `image` boot as a disk (see the module docstring)."""
    if len(boot_code) < ISOHYBRID_CODE_SIZE:
        raise BuildError(
            f"isohybrid boot code is {len(boot_code)} bytes, expected {ISOHYBRID_CODE_SIZE}"
        )
    if image.size % 512:
        raise BuildError(f"{image.path}: {image.size} bytes is not a whole number of sectors")
    records: list[MbrRecord | None] = [MbrRecord(0x00, 0, image.size // 512, bootable=True)]
    if image.efi_image_block is not None:
        records.append(MbrRecord(0xEF, image.efi_image_block * 4, image.efi_image_size // 512))
    code = bytearray(boot_code[:ISOHYBRID_CODE_SIZE])
    code += struct.pack("<Q", image.bios_image_block * 4)
    sector = pack_boot_sector(records, disk_signature, bytes(code))
    with image.path.open("r+b") as handle:
        if handle.read(512) != bytes(512):
            raise BuildError(f"{image.path}: sector 0 is not empty; refusing to overwrite it")
        handle.seek(0)
        handle.write(sector)
