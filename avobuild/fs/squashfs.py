"""Reproducible squashfs images built with mksquashfs, read back with unsquashfs.

mksquashfs writes the same bytes for the same input whatever its thread count (-reproducible
is the default since squashfs-tools 4.5) and sorts directories itself; what remains is to pin
what it takes from the host: -all-time and -mkfs-time set every inode's and the superblock's
time to SOURCE_DATE_EPOCH; with `ownership = "root"` -all-root makes every entry 0:0, and
`xattrs = false` (and avobuild's own trees) add -no-xattrs. mksquashfs refuses -all-time
while SOURCE_DATE_EPOCH is in its environment at all, even with the same value, so it runs
without the variable. squashfs has no UUID or label: the seed and label are not stored.

mksquashfs reads a directory with lstat: device nodes, FIFOs and sockets become inodes of
the image, symlinks stay links, hard links share an inode; nothing is opened but regular
files. It reads tar streams too (-tar): an archive is re-written by `fs.archive` as a
validated stream, so mksquashfs never sees a member avobuild refused. squashfs stores the
user, trusted and security xattr namespaces; POSIX ACLs (system.*) cannot be held and are
dropped by mksquashfs with a warning.
"""

from __future__ import annotations

import re
import shlex
import stat
import tarfile
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from avobuild.errors import BuildError
from avobuild.fs.archive import ArchiveMember, iter_members, member_tarinfo, read_tar
from avobuild.fs.common import EntryKind, FsEntry, scan_source_tree, without_source_date_epoch
from avobuild.fs.overlay import check_overlay, check_safe_path, check_safe_target
from avobuild.model.tree import Ownership, TreeKind, TreeSource
from avobuild.run import run, run_feeding, source_date_epoch

COMPRESSOR = "zstd"

_ROOT = b"squashfs-root"
_LISTING = re.compile(rb"(\S{10}) (\d+)/(\d+) +(\d+|\d+, *\d+) \d{4}-\d\d-\d\d \d\d:\d\d (.*)")
_KINDS = {
    "-": EntryKind.FILE,
    "d": EntryKind.DIRECTORY,
    "l": EntryKind.SYMLINK,
    "c": EntryKind.CHAR_DEVICE,
    "b": EntryKind.BLOCK_DEVICE,
    "p": EntryKind.FIFO,
    "s": EntryKind.SOCKET,
}
_GLOB_SPECIAL = re.compile(r"([\\*?\[\]])")


def build_squashfs(
    source: TreeSource | None,
    output: Path,
    *,
    seed: str,
    overlay: Path | None = None,
    known: Mapping[str, FsEntry] | None = None,
) -> None:
    """Build a reproducible squashfs image of `source` (None: an empty one) in `output`.

    A directory is read by mksquashfs itself, with avobuild's additions (`overlay`) given as
    pseudo definitions (and the tree's files they replace excluded); an archive is re-written
    as a validated tar stream with the additions appended and read with `mksquashfs -tar`.
    """
    del seed  # squashfs has no UUID; accepted so every builder takes the same arguments
    epoch = str(source_date_epoch())
    output.unlink(missing_ok=True)
    options: list[str | Path] = [
        "-noappend",
        "-all-time",
        epoch,
        "-mkfs-time",
        epoch,
        "-comp",
        COMPRESSOR,
        "-quiet",
        "-no-progress",
    ]
    if source is None or source.ownership is Ownership.ROOT:
        options.append("-all-root")
    if source is None or not source.xattrs:
        options.append("-no-xattrs")
    additions = scan_source_tree(overlay) if overlay is not None else {}
    with tempfile.TemporaryDirectory(prefix="avobuild-squashfs-", dir=output.parent) as workdir:
        scratch = Path(workdir)
        try:
            if source is not None and source.kind is TreeKind.ARCHIVE:
                _build_from_archive(source, output, options, overlay, additions)
                return
            if source is None:
                tree = scratch / "empty"
                tree.mkdir(mode=0o755)
                entries: dict[str, FsEntry] = {}
            else:
                tree = source.path
                entries = (
                    dict(known) if known is not None else scan_source_tree(tree, source.ownership)
                )
            if overlay is not None:
                replaced = check_overlay(entries, additions, str(tree))
                options += _pseudo_options(scratch, overlay, additions, entries, replaced)
            run([*without_source_date_epoch("mksquashfs"), tree, output, *options], input_bytes=b"")
        except BaseException:
            output.unlink(missing_ok=True)
            raise


def _pseudo_options(
    scratch: Path,
    overlay: Path,
    additions: dict[str, FsEntry],
    entries: dict[str, FsEntry],
    replaced: frozenset[str],
) -> list[str | Path]:
    """Pseudo definitions for the additions; `-ef` drops the tree's files they replace."""
    lines = []
    for path, entry in additions.items():
        name = check_safe_path(path)
        mode = f"{entry.mode:o}"
        if entry.kind is EntryKind.DIRECTORY:
            if path not in entries:
                lines.append(f"{name} d {mode} 0 0")
        elif entry.kind is EntryKind.SYMLINK:
            assert entry.target is not None
            lines.append(f"{name} s 777 0 0 {check_safe_target(entry.target)}")
        else:
            # mksquashfs runs the command with /bin/sh; the overlay path is avobuild's own.
            lines.append(f"{name} f {mode} 0 0 cat {shlex.quote(str(overlay / path))}")
    pseudo = scratch / "additions.pseudo"
    pseudo.write_text("".join(f"{line}\n" for line in lines))
    options: list[str | Path] = ["-pf", pseudo]
    if replaced:
        excludes = scratch / "replaced.exclude"
        excludes.write_text("".join(f"{path}\n" for path in sorted(replaced)))
        options += ["-ef", excludes]
    return options


def _build_from_archive(
    source: TreeSource,
    output: Path,
    options: list[str | Path],
    overlay: Path | None,
    additions: dict[str, FsEntry],
) -> None:
    epoch = source_date_epoch()

    def feed(pipe: IO[bytes]) -> None:
        members: dict[str, ArchiveMember] = {}
        skipped: set[str] = set()
        with (
            read_tar(source.path) as tar,
            tarfile.open(fileobj=pipe, mode="w|", format=tarfile.PAX_FORMAT) as out,
        ):
            for member, info in iter_members(source.path, tar, source.ownership):
                if not member.path:
                    continue  # the root's mode and owner are options (see below)
                members[member.path] = member
                addition = additions.get(member.path)
                if addition is not None and addition.kind is not EntryKind.DIRECTORY:
                    skipped.add(member.path)  # replaced (check_overlay below, before the end)
                    continue
                if member.link in skipped:
                    raise BuildError(
                        f"{source.path}: /{member.link} cannot be replaced by an addition: "
                        f"/{member.path} is a hard link to it"
                    )
                header = member_tarinfo(member, epoch, xattrs=source.xattrs)
                data = tar.extractfile(info) if header.type == tarfile.REGTYPE else None
                out.addfile(header, data)
            entries = {path: member.entry for path, member in members.items()}
            check_overlay(entries, additions, str(source.path))
            assert overlay is not None or not additions
            for path, entry in additions.items():
                if entry.kind is EntryKind.DIRECTORY and path in entries:
                    continue
                header = member_tarinfo(ArchiveMember(path, entry), epoch, xattrs=False)
                if entry.kind is EntryKind.FILE:
                    assert overlay is not None
                    with (overlay / path).open("rb") as handle:
                        out.addfile(header, handle)
                else:
                    out.addfile(header)

    root = _archive_root(source)
    argv = [*without_source_date_epoch("mksquashfs"), "-", output, "-tar", *options, *root]
    run_feeding(argv, feed)


def _archive_root(source: TreeSource) -> list[str | Path]:
    """mksquashfs -tar ignores the "./" member: its mode and owner become options."""
    with read_tar(source.path) as tar:
        for member, _info in iter_members(source.path, tar, source.ownership):
            if member.path:
                break
            entry = member.entry
            return [
                "-root-mode",
                f"{entry.mode:o}",
                "-root-uid",
                str(entry.uid),
                "-root-gid",
                str(entry.gid),
            ]
    return ["-root-mode", "755", "-root-uid", "0", "-root-gid", "0"]


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
        device = None
        if b"," in size_text:
            major, minor = size_text.split(b",")
            device, size = (int(major), int(minor)), 0
        else:
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
        size = size if kind in (EntryKind.FILE, EntryKind.SYMLINK) else 0
        entries[path] = FsEntry(kind, mode, size, target, int(uid), int(gid), device)
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
