"""Reproducible squashfs images built with mksquashfs, read back with unsquashfs.

mksquashfs writes the same bytes for the same input whatever its thread count (-reproducible
is the default since squashfs-tools 4.5) and sorts directories itself; what remains is to pin
what it takes from the host: -all-time and -mkfs-time set every inode's and the superblock's
time to SOURCE_DATE_EPOCH, -all-root makes every entry 0:0 and -no-xattrs keeps host xattrs
(SELinux labels) out. mksquashfs refuses -all-time while SOURCE_DATE_EPOCH is in its
environment at all, even with the same value, so it runs without the variable.
squashfs has no UUID or label: the seed and label are not stored.
"""

from __future__ import annotations

import re
import stat
import tempfile
from pathlib import Path

from avobuild.errors import BuildError
from avobuild.fs.common import EntryKind, FsEntry, scan_source_tree, without_source_date_epoch
from avobuild.run import run, source_date_epoch

COMPRESSOR = "zstd"

_ROOT = b"squashfs-root"
_LISTING = re.compile(rb"(\S{10}) (\d+)/(\d+) +(\d+) \d{4}-\d\d-\d\d \d\d:\d\d (.*)")
_KINDS = {"-": EntryKind.FILE, "d": EntryKind.DIRECTORY, "l": EntryKind.SYMLINK}
_GLOB_SPECIAL = re.compile(r"([\\*?\[\]])")


def build_squashfs(source: Path | None, output: Path, *, seed: str) -> None:
    """Build a reproducible squashfs image of `source` (None: an empty one) in `output`."""
    del seed  # squashfs has no UUID; accepted so every builder takes the same arguments
    if source is not None:
        scan_source_tree(source)
    epoch = str(source_date_epoch())
    output.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="avobuild-squashfs-") as workdir:
        if source is None:
            source = Path(workdir)
            source.chmod(0o755)
        run(
            [
                *without_source_date_epoch("mksquashfs"),
                source,
                output,
                "-noappend",
                "-all-root",
                "-no-xattrs",
                "-all-time",
                epoch,
                "-mkfs-time",
                epoch,
                "-comp",
                COMPRESSOR,
                "-quiet",
                "-no-progress",
            ],
            input_bytes=b"",
        )


def list_squashfs_tree(image: Path) -> dict[str, FsEntry]:
    """Every entry of the squashfs `image` except its root, sorted by path."""
    listing = run(["unsquashfs", "-lln", image]).stdout
    entries: dict[str, FsEntry] = {}
    for line in listing.splitlines():
        match = _LISTING.fullmatch(line)
        if match is None:
            continue  # unsquashfs's summary lines
        permissions, uid, gid, size_text, rest = match.groups()
        kind = _KINDS.get(chr(permissions[0]))
        if kind is None:
            raise BuildError(f"{image}: unsupported entry in listing: {line!r}")
        size = int(size_text)
        target = None
        if kind is EntryKind.SYMLINK:
            # "path -> target"; the size is the target's length, so a name holding " -> "
            # cannot confuse the split.
            target = rest[len(rest) - size :].decode(errors="surrogateescape")
            rest = rest[: len(rest) - size - len(b" -> ")]
        if rest == _ROOT:
            continue
        if not rest.startswith(_ROOT + b"/"):
            raise BuildError(f"{image}: unexpected path in listing: {line!r}")
        path = rest[len(_ROOT) + 1 :].decode(errors="surrogateescape")
        mode = _permission_bits(permissions.decode())
        size = 0 if kind is EntryKind.DIRECTORY else size
        entries[path] = FsEntry(kind, mode, size, target, int(uid), int(gid))
    return dict(sorted(entries.items()))


def read_squashfs_file(image: Path, path: str) -> bytes:
    """The content of the regular file `path` in the squashfs `image`."""
    # unsquashfs matches paths as globs; escape the characters it would expand.
    pattern = _GLOB_SPECIAL.sub(r"\\\1", path.strip("/"))
    return run(["unsquashfs", "-cat", image, pattern]).stdout


def _permission_bits(permissions: str) -> int:
    """Mode bits from an `ls -l` permission string such as "-rwsr-xr-t"."""
    mode = 0
    bits = (0o400, 0o200, 0o100, 0o040, 0o020, 0o010, 0o004, 0o002, 0o001)
    for char, bit in zip(permissions[1:], bits, strict=True):
        if char in "rwxst":
            mode |= bit
    if permissions[3] in "sS":
        mode |= stat.S_ISUID
    if permissions[6] in "sS":
        mode |= stat.S_ISGID
    if permissions[9] in "tT":
        mode |= stat.S_ISVTX
    return mode
