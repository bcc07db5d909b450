"""Reproducible FAT images: mkfs.vfat formats them, mtools fills, reads and edits them.

`mkfs.vfat --invariant` replaces every random or clock-derived value with a constant; the
volume ID then comes from the caller's seed (-i). mtools takes SOURCE_DATE_EPOCH as "now" for
every entry it creates, so no source timestamp reaches the image; the epoch is raised to
1980-01-01, the earliest instant a FAT timestamp holds (mtools wraps earlier ones into the
2090s). Directories are made with mmd and files copied with mcopy, both in sorted order, so
directory entries, short-name (~1) tails and cluster allocation do not depend on readdir order.
mtools is kept away from user and host settings that change name mangling (MTOOLSRC and the
MTOOLS_* flags below).

mtools opens a filesystem at a byte offset inside a disk image with `-i image@@offset`; the
installer uses that to rewrite the boot state file on a disk's ESP.
"""

from __future__ import annotations

import posixpath
import re
import subprocess
import tempfile
from pathlib import Path

from avobuild.errors import BuildError, ToolFailed
from avobuild.fs.common import (
    SPECIAL_KINDS,
    EntryKind,
    FsEntry,
    create_sparse_file,
    deterministic_uuid,
    scan_source_tree,
    tree_bytes,
)
from avobuild.run import run, source_date_epoch

MiB = 1 << 20
# UEFI wants FAT32 on a system partition; below this mkfs.vfat's own choice (FAT12/16) is
# kept, as FAT32 needs at least 65525 clusters.
FAT32_MIN_SIZE = 64 * MiB
MAX_LABEL_CHARS = 11
MAX_FILE_SIZE = (1 << 32) - 1
FAT_EPOCH_MIN = 315532800  # 1980-01-01T00:00:00Z

_LABEL = re.compile(r"[A-Z0-9 !#$%&'()\-@^_`{}~]*")
_BAD_NAME_CHARS = set('"*/:<>?\\|') | {chr(code) for code in range(0x20)} | {"\x7f"}
_MTOOLS_ENV = {
    "MTOOLSRC": "/dev/null",
    "MTOOLS_LOWER_CASE": "0",
    "MTOOLS_NO_VFAT": "0",
    "MTOOLS_NAME_NUMERIC_TAIL": "1",
}


def check_vfat_label(label: str) -> None:
    """Raise `BuildError` unless `label` is a valid FAT volume label."""
    if len(label) > MAX_LABEL_CHARS or not _LABEL.fullmatch(label):
        suggestion = "".join(c for c in label.upper() if _LABEL.fullmatch(c))[:MAX_LABEL_CHARS]
        raise BuildError(
            f"FAT label {label!r}: expected at most {MAX_LABEL_CHARS} characters from A-Z, 0-9, "
            f"space and !#$%&'()-@^_`{{}}~ (FAT labels are upper case), e.g. {suggestion!r}"
        )


def fat_epoch() -> int:
    """The timestamp of every entry mtools writes (see the module docstring)."""
    return max(source_date_epoch(), FAT_EPOCH_MIN)


def build_vfat(source: Path | None, output: Path, size: int, *, label: str, seed: str) -> None:
    """Build a reproducible FAT filesystem of `size` bytes in `output` holding `source`."""
    check_vfat_label(label)
    drive = _drive(output, 0)
    entries = scan_source_tree(source) if source is not None else {}
    if source is not None:
        _check_fat_tree(source, entries)
    create_sparse_file(output, size)
    volume_id = deterministic_uuid(seed, "vfat-volume-id").hex[:8]
    argv: list[str | Path] = ["mkfs.vfat", "--invariant", "-i", volume_id, "--mbr=n"]
    argv += ["-S", "512", "-g", "255/63"]
    if size >= FAT32_MIN_SIZE:
        argv += ["-F", "32"]
    if label:
        argv += ["-n", label]
    argv.append(output)
    run(argv)
    if source is None or not entries:
        return
    directories = [path for path, entry in entries.items() if entry.kind is EntryKind.DIRECTORY]
    files_by_parent: dict[str, list[str]] = {}
    for path, entry in entries.items():
        if entry.kind is EntryKind.FILE:
            files_by_parent.setdefault(posixpath.dirname(path), []).append(path)
    try:
        if directories:
            _mtools(["mmd", "-i", drive, *(_fat_path(path) for path in directories)])
        for parent, paths in files_by_parent.items():
            sources = [source / path for path in paths]
            _mtools(["mcopy", "-Q", "-i", drive, *sources, _fat_path(parent) + "/"])
    except ToolFailed as failure:
        if "Disk full" in failure.stderr:
            raise BuildError(
                f"{source}: the tree ({tree_bytes(entries)} bytes of files in {len(entries)} "
                f"entries) does not fit in a {size}-byte FAT filesystem; make the partition "
                "bigger"
            ) from None
        raise


def _check_fat_tree(source: Path, entries: dict[str, FsEntry]) -> None:
    seen: dict[str, str] = {}
    for path, entry in entries.items():
        where = f"{source}/{path}"
        name = posixpath.basename(path)
        if entry.kind is EntryKind.SYMLINK:
            raise BuildError(f"{where}: FAT cannot hold symlinks; copy the target instead")
        if entry.kind in SPECIAL_KINDS:
            raise BuildError(f"{where}: is a {entry.kind.value}; FAT cannot hold special files")
        if entry.size > MAX_FILE_SIZE:
            raise BuildError(f"{where}: {entry.size} bytes; FAT files hold at most 4 GiB - 1")
        too_long = len(name.encode("utf-16-le", "replace")) > 2 * 255
        if _BAD_NAME_CHARS.intersection(name) or name.endswith((".", " ")) or too_long:
            raise BuildError(
                f"{where}: not a valid FAT long name (no control characters, none of "
                f'"*/:<>?\\|, no trailing dot or space, at most 255 characters)'
            )
        try:
            name.encode()
        except UnicodeEncodeError:
            raise BuildError(f"{where}: FAT long names must be valid UTF-8") from None
        folded = path.upper()
        if folded in seen:
            raise BuildError(
                f"{where}: clashes with {source}/{seen[folded]}; FAT names are case-insensitive"
            )
        seen[folded] = path


def read_vfat_file(image: Path, offset: int, path: str) -> bytes:
    """The content of `path` in the FAT filesystem at byte `offset` of `image`."""
    return _mtools(["mcopy", "-i", _drive(image, offset), _fat_path(path), "-"]).stdout


def write_vfat_file(image: Path, offset: int, dest_path: str, data: bytes) -> None:
    """Create or replace `dest_path` (and missing parent directories) with `data`.

    The filesystem lies at byte `offset` of `image`, which may be a whole disk image.
    """
    drive = _drive(image, offset)
    parent = posixpath.dirname(dest_path.strip("/"))
    if parent:
        _make_fat_directories(drive, parent)
    _mtools(["mcopy", "-o", "-i", drive, "-", _fat_path(dest_path)], input_bytes=data)


def list_vfat_tree(image: Path, offset: int = 0) -> dict[str, FsEntry]:
    """Every file and directory of the FAT filesystem at `offset` in `image`, sorted by path.

    FAT has neither owners nor permissions: entries carry 0:0 and mode 0755, which is how
    Linux shows a vfat mount with the default umask.
    """
    with tempfile.TemporaryDirectory(prefix="avobuild-vfat-") as workdir:
        tree = Path(workdir) / "tree"
        tree.mkdir()
        _mtools(["mcopy", "-s", "-i", _drive(image, offset), "::", f"{tree}/"])
        entries = scan_source_tree(tree)
    return {path: FsEntry(entry.kind, 0o755, entry.size) for path, entry in entries.items()}


def _make_fat_directories(drive: str, directory: str) -> None:
    parts = directory.split("/")
    for depth in range(1, len(parts) + 1):
        wanted = "/".join(parts[:depth])
        listing = _mtools(
            ["mdir", "-b", "-a", "-i", drive, _fat_path(posixpath.dirname(wanted))],
            ok_codes=(0, 1),  # an empty directory is "not found"
        ).stdout.decode(errors="surrogateescape")
        names = {line.upper() for line in listing.splitlines()}
        if (_fat_path(wanted) + "/").upper() in names:
            continue
        if _fat_path(wanted).upper() in names:
            raise BuildError(f"{drive}: {_fat_path(wanted)} is a file, not a directory")
        _mtools(["mmd", "-i", drive, _fat_path(wanted)])


def _mtools(
    argv: list[str | Path], *, input_bytes: bytes = b"", ok_codes: tuple[int, ...] = (0,)
) -> subprocess.CompletedProcess[bytes]:
    # Empty stdin: mtools asks on a terminal when a name clashes; it must never wait.
    env = {**_MTOOLS_ENV, "SOURCE_DATE_EPOCH": str(fat_epoch())}
    return run(argv, env=env, input_bytes=input_bytes, ok_codes=ok_codes)


def _fat_path(path: str) -> str:
    return "::/" + path.strip("/")


def _drive(image: Path, offset: int) -> str:
    if "@@" in str(image):
        raise BuildError(f"{image}: mtools cannot open image paths containing '@@'")
    if offset < 0:
        raise BuildError(f"{image}: negative filesystem offset {offset}")
    return f"{image}@@{offset}" if offset else str(image)
