"""Reproducible ext4 images: `mke2fs -d` builds them, debugfs normalises and reads them.

mke2fs gets every value it would otherwise draw at random or from the clock: the UUID (-U)
and the directory hash seed (-E hash_seed) derive from the caller's seed, and
E2FSPROGS_FAKE_TIME stands in for the clock. Its defaults come from a profile written here
(MKE2FS_CONFIG) instead of the host's /etc/mke2fs.conf, so the feature set and inode ratio do
not change with the build host; lazy inode table and journal init are off so the image does
not depend on the host kernel's lazy-init support. mke2fs populates each directory in sorted
order (scandir + alphasort since e2fsprogs 1.43) and, with no_copy_xattrs, ignores host
xattrs such as SELinux labels.

What `mke2fs -d` copies from a source directory is what the image keeps: modes with
setuid/setgid/sticky, owners, hard links, symlinks (never followed), device nodes, FIFOs and
sockets (made in the image, never opened), extended attributes (security.capability, POSIX
ACLs) and holes. The timestamps are then overwritten with debugfs, addressing inodes by
number: all four carry the build epoch, and with `ownership = "root"` every inode becomes
0:0; the root directory takes the source's mode. e2fsprogs reads a fake time of 0 as "use
the clock", so the epoch is SOURCE_DATE_EPOCH but at least 1.

A tar archive is unpacked (files, directories, symlinks, hard links; `fs.archive`) into a
temporary directory and built the same way; what an unprivileged unpack cannot make on the
host (owners, device nodes, FIFOs, extended attributes) is set in the image with debugfs.
avobuild's additions (`fs.overlay`) are written in with debugfs `mkdir`, `write`,
`symlink` and `rm`, so neither the user's tree nor a copy of it is ever changed.

Images are read back with debugfs, which opens a filesystem at a byte offset inside a disk
image through the unix I/O manager's `image?offset=N` syntax.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import re
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path

from avobuild.errors import BuildError, ToolFailed
from avobuild.fs.archive import ArchiveIndex, extract_archive
from avobuild.fs.common import (
    SPECIAL_KINDS,
    TYPE_BITS,
    EntryKind,
    FileBlocks,
    FileMap,
    FsEntry,
    create_sparse_file,
    deterministic_uuid,
    entry_kind,
    scan_source_tree,
    tree_bytes,
)
from avobuild.fs.overlay import check_overlay, check_safe_path
from avobuild.model.tree import Ownership, TreeKind, TreeSource
from avobuild.run import run, source_date_epoch

MAX_LABEL_BYTES = 16
BLOCK_SIZE = 4096
INODE_SIZE = 256
_ROOT_INODE = 2

# The host's /etc/mke2fs.conf is replaced by this profile. The ext4 feature list is Debian
# bookworm's (e2fsprogs 1.47.0): it leaves out newer features such as orphan_file and
# metadata_csum_seed that older kernels, bootloaders and e2fsprogs do not know.
_PROFILE = """\
[defaults]
	base_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
	default_mntopts = acl,user_xattr
	enable_periodic_fsck = 0
	blocksize = 4096
	inode_size = 256
	inode_ratio = 16384
	reserved_ratio = 5.0
	hash_alg = half_md4

[fs_types]
	ext4 = {
		features = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
	}
	avobuild = {
		inode_ratio = 16384
	}
"""

_DEBUGFS_BANNER = re.compile(rb"^debugfs \S+ \(.*\)$")
_ECHO = b"debugfs: "
_FAST_LINK = b'Fast link dest: "'
_DEVICE_NUMBER = re.compile(rb"Device major/minor number: (\d+):(\d+)")
_OUT_OF_SPACE = ("Could not allocate block", "Could not allocate inode", "No free space")
# A leaf line of `dump_extents -l`: level, entries, logical start - end, physical start - end,
# length, flags ("Uninit" for an unwritten extent, which reads as zeros).
_EXTENT_LINE = re.compile(
    rb"^\s*\d+/\s*\d+\s+\d+/\s*\d+\s+(\d+) -\s*\d+\s+(\d+) -\s*\d+\s+(\d+)\s*(\S*)\s*$"
)
_SUPERBLOCK = 1024
_EXT4_MAGIC = 0xEF53


def check_ext4_label(label: str) -> None:
    """Raise `BuildError` unless `label` fits an ext4 volume label (16 bytes of UTF-8)."""
    encoded = label.encode()
    if len(encoded) > MAX_LABEL_BYTES or "\0" in label:
        raise BuildError(
            f"ext4 label {label!r} is {len(encoded)} bytes; an ext4 label holds at most "
            f"{MAX_LABEL_BYTES} bytes of UTF-8 without NUL"
        )


def ext4_epoch() -> int:
    """The timestamp every inode and the superblock carry (see the module docstring)."""
    return max(source_date_epoch(), 1)


def build_ext4(
    source: TreeSource | None,
    output: Path,
    size: int,
    *,
    label: str,
    seed: str,
    overlay: Path | None = None,
    known: Mapping[str, FsEntry] | None = None,
) -> None:
    """Build a reproducible ext4 filesystem of `size` bytes in `output` holding `source`.

    A directory is read by `mke2fs -d` itself; an archive is unpacked into a temporary
    directory beside `output` first, and its owners, modes, device nodes, FIFOs and extended
    attributes are stored with debugfs. `overlay` (avobuild's additions, checked against the
    tree by `fs.overlay.check_overlay`) is layered in with debugfs afterwards.
    """
    check_ext4_label(label)
    _check_device_path(output)
    create_sparse_file(output, size)
    with tempfile.TemporaryDirectory(prefix="avobuild-ext4-", dir=output.parent) as workdir:
        scratch = Path(workdir)
        index: ArchiveIndex | None = None
        tree: Path | None = None
        entries: dict[str, FsEntry] = {}
        if source is not None and source.kind is TreeKind.ARCHIVE:
            tree = scratch / "tree"
            tree.mkdir(mode=0o755)
            index = extract_archive(source.path, tree, ownership=source.ownership)
            entries = index.entries()
        elif source is not None:
            tree = source.path
            entries = dict(known) if known is not None else scan_source_tree(tree, source.ownership)
        for path in entries:
            if "\n" in path or "\r" in path:
                # debugfs lists one name per line; such a name could not be read back.
                raise BuildError(f"{source}/{path}: ext4 images cannot hold names with line breaks")
        if overlay is not None:
            check_overlay(entries, scan_source_tree(overlay), str(source or "the empty image"))
        copy_xattrs = source is not None and source.kind is TreeKind.DIRECTORY and source.xattrs
        _mke2fs(scratch, tree, output, size, label, seed, copy_xattrs, source, entries)
        if source is None and overlay is None:
            return
        device = str(output)
        listed = _list_inodes(device)
        commands: list[bytes] = []
        if source is not None:
            commands += _root_commands(source, index)
        if index is not None:
            assert source is not None
            commands += _archive_commands(index, listed, scratch, xattrs=source.xattrs)
        if overlay is not None:
            commands += _overlay_commands(overlay, listed)
        # One session: inodes that existed are normalised by number; what the commands
        # above create stamps itself (by path), so the tree is listed only once.
        owners_to_root = source is None or source.ownership is Ownership.ROOT
        inodes = sorted({inode for inode, _ in listed.values()})
        commands += _normalise_commands(inodes, ext4_epoch(), owners_to_root)
        _debugfs_checked(device, commands, source, size)


def _mke2fs(
    scratch: Path,
    tree: Path | None,
    output: Path,
    size: int,
    label: str,
    seed: str,
    copy_xattrs: bool,
    source: TreeSource | None,
    entries: dict[str, FsEntry],
) -> None:
    extended = [
        "root_owner=0:0",
        f"hash_seed={deterministic_uuid(seed, 'ext4-hash-seed')}",
        "lazy_itable_init=0",
        "lazy_journal_init=0",
        "nodiscard",
    ]
    if not copy_xattrs:
        extended.append("no_copy_xattrs")
    profile = scratch / "mke2fs.conf"
    profile.write_text(_PROFILE)
    argv: list[str | Path] = [
        "mke2fs",
        "-q",
        "-t",
        "ext4",
        "-T",
        "avobuild",
        "-b",
        str(BLOCK_SIZE),
        "-I",
        str(INODE_SIZE),
        "-U",
        str(deterministic_uuid(seed, "ext4-uuid")),
        "-E",
        ",".join(extended),
    ]
    if label:
        argv += ["-L", label]
    if tree is not None:
        argv += ["-d", tree]
    argv.append(output)
    env = {"MKE2FS_CONFIG": str(profile), "E2FSPROGS_FAKE_TIME": str(ext4_epoch())}
    try:
        run(argv, env=env, input_bytes=b"")
    except ToolFailed as failure:
        if any(marker in failure.stderr for marker in _OUT_OF_SPACE):
            raise _does_not_fit(source, entries, size, failure.stderr) from None
        raise


def _does_not_fit(
    source: TreeSource | None, entries: dict[str, FsEntry] | None, size: int, reason: str
) -> BuildError:
    last = reason.strip().splitlines()[-1] if reason.strip() else "no space left"
    what = (
        "avobuild's additions to the tree"
        if entries is None
        else f"the tree ({tree_bytes(entries)} bytes of files in {len(entries)} entries)"
    )
    return BuildError(
        f"{source}: {what} does not fit in a {size}-byte ext4 filesystem ({last}); make the "
        "partition bigger"
    )


def _debugfs_checked(
    device: str, commands: list[bytes], source: TreeSource | None, size: int
) -> None:
    try:
        _debugfs(device, commands, write=True)
    except BuildError as error:
        if any(marker in str(error) for marker in _OUT_OF_SPACE):
            raise _does_not_fit(source, None, size, str(error)) from None
        raise


def _root_commands(source: TreeSource, index: ArchiveIndex | None) -> list[bytes]:
    """The image root takes the mode (and, when kept, the owner) of the tree's root."""
    if index is not None:
        root = index.root.entry if index.root else FsEntry(EntryKind.DIRECTORY, 0o755, 0)
        mode, uid, gid = root.mode, root.uid, root.gid
    else:
        info = source.path.stat()
        mode, uid, gid = stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid
    commands = [b"sif <%d> mode 0%o" % (_ROOT_INODE, stat.S_IFDIR | mode)]
    if source.ownership is Ownership.PRESERVE:
        commands += [b"sif <%d> uid %d" % (_ROOT_INODE, uid)]
        commands += [b"sif <%d> gid %d" % (_ROOT_INODE, gid)]
    return commands


_XATTR_NAME = re.compile(r"(security|trusted|user|system)\.[A-Za-z0-9._@+-]{1,200}")


def _archive_commands(
    index: ArchiveIndex, listed: dict[str, tuple[int, FsEntry]], scratch: Path, *, xattrs: bool
) -> list[bytes]:
    """Owners, modes, special files and extended attributes of an unpacked archive.

    Entries are addressed by inode number; special files, which the unpacked tree leaves
    out, are made with `mknod` from inside their parent directory (debugfs's mknod takes a
    name, not a path).
    """
    commands: list[bytes] = []
    values = scratch / "xattr-values"
    values.mkdir()
    for number, member in enumerate(index.members):
        entry = member.entry
        if entry.kind in SPECIAL_KINDS:
            parent, name = posixpath.split(member.path)
            parent_inode = listed[parent][0] if parent else _ROOT_INODE
            spec = b"p"
            if entry.device is not None:
                letter = b"c" if entry.kind is EntryKind.CHAR_DEVICE else b"b"
                spec = letter + b" %d %d" % entry.device
            target = _quote(name)
            commands += [b"cd <%d>" % parent_inode, b"mknod " + target + b" " + spec]
            commands += _stamp(target)
        else:
            target = b"<%d>" % listed[member.path][0]
        if entry.kind is not EntryKind.SYMLINK:
            commands.append(b"sif " + target + b" mode 0%o" % (TYPE_BITS[entry.kind] | entry.mode))
        commands.append(b"sif " + target + b" uid %d" % entry.uid)
        commands.append(b"sif " + target + b" gid %d" % entry.gid)
        for xattr_number, (name, value) in enumerate(member.xattrs if xattrs else ()):
            if not _XATTR_NAME.fullmatch(name):
                raise BuildError(
                    f"/{member.path}: extended attribute name {name!r} is not one ext4 stores"
                )
            holder = values / f"{number}.{xattr_number}"
            holder.write_bytes(value)
            commands.append(
                b"ea_set -f " + _quote(str(holder)) + b" " + target + b" " + name.encode()
            )
        if entry.kind in SPECIAL_KINDS:
            commands.append(b"cd <%d>" % _ROOT_INODE)
    return commands


def _overlay_commands(overlay: Path, listed: dict[str, tuple[int, FsEntry]]) -> list[bytes]:
    """debugfs commands that layer avobuild's additions (plain names, see fs.overlay) in.

    A directory the tree already has keeps its own mode and owner; a file or symlink the
    tree has is replaced (`check_overlay` has refused everything else).
    """
    commands: list[bytes] = []
    for path, entry in scan_source_tree(overlay).items():
        existing = listed.get(path)
        image_path = b"/" + check_safe_path(path).encode()
        if entry.kind is EntryKind.DIRECTORY:
            if existing is not None:
                continue
            commands.append(b"mkdir " + image_path)
        else:
            if existing is not None:
                commands.append(b"rm " + image_path)
            if entry.kind is EntryKind.SYMLINK:
                assert entry.target is not None
                commands.append(b"symlink " + image_path + b" " + _quote(entry.target))
                commands += [b"sif " + image_path + b" uid 0", b"sif " + image_path + b" gid 0"]
                commands += _stamp(image_path)
                continue
            commands.append(b"write " + _quote(str(overlay / path)) + b" " + image_path)
        commands += [
            b"sif " + image_path + b" mode 0%o" % (TYPE_BITS[entry.kind] | entry.mode),
            b"sif " + image_path + b" uid 0",
            b"sif " + image_path + b" gid 0",
            *_stamp(image_path),
        ]
    return commands


def _stamp(target: bytes) -> list[bytes]:
    """Set all four timestamps of `target` (a path or <inode>) to the build epoch."""
    commands = []
    for field in (b"atime", b"mtime", b"ctime", b"crtime"):
        # The _extra word holds nanoseconds and the epoch bits above 32; clear it first.
        commands.append(b"sif " + target + b" " + field + b"_extra 0")
        commands.append(b"sif " + target + b" " + field + b" @%d" % ext4_epoch())
    return commands


def _normalise_commands(inodes: list[int], epoch: int, owners_to_root: bool) -> list[bytes]:
    commands: list[bytes] = [b"cd <%d>" % _ROOT_INODE]
    for inode in [_ROOT_INODE, *inodes]:
        if owners_to_root:
            commands += [b"sif <%d> uid 0" % inode, b"sif <%d> gid 0" % inode]
        for field in (b"atime", b"mtime", b"ctime", b"crtime"):
            # The _extra word holds nanoseconds and the epoch bits above 32; clear it first.
            commands.append(b"sif <%d> %s_extra 0" % (inode, field))
            commands.append(b"sif <%d> %s @%d" % (inode, field, epoch))
    return commands


def read_ext4_file(image: Path, path: str, offset: int = 0) -> bytes:
    """The content of the regular file `path` in the ext4 filesystem at `offset` in `image`."""
    device = _device(image, offset)
    completed = run(["debugfs", "-R", "cat " + os.fsdecode(_quote(path)), device], env=_env())
    _raise_for_errors(device, completed.stderr)
    return completed.stdout


def list_ext4_tree(image: Path, offset: int = 0) -> dict[str, FsEntry]:
    """Every entry of the ext4 filesystem at `offset` in `image`, sorted by path.

    The root directory and the top-level lost+found (filesystem machinery, not content) are
    left out, so the result compares equal to `scan_source_tree` of the tree it was built from.
    """
    device = _device(image, offset)
    listed = _list_inodes(device)
    entries = {path: entry for path, (_, entry) in listed.items()}
    symlinks = {
        path: (inode, entry.size)
        for path, (inode, entry) in listed.items()
        if entry.kind is EntryKind.SYMLINK
    }
    for path, target in _read_symlinks(device, symlinks).items():
        entries[path] = dataclasses.replace(entries[path], target=os.fsdecode(target))
    devices = {
        path: inode
        for path, (inode, entry) in listed.items()
        if entry.kind in (EntryKind.CHAR_DEVICE, EntryKind.BLOCK_DEVICE)
    }
    if devices:
        reports = _split_echoed(
            _debugfs(device, [b"stat <%d>" % inode for inode in devices.values()]), len(devices)
        )
        for path, report in zip(devices, reports, strict=True):
            found = _DEVICE_NUMBER.search(report)
            if found is None:
                raise BuildError(f"{device}: /{path}: debugfs printed no device number")
            numbers = (int(found.group(1)), int(found.group(2)))
            entries[path] = dataclasses.replace(entries[path], device=numbers)
    return dict(sorted(entries.items()))


def ext4_block_size(image: Path, offset: int = 0) -> int | None:
    """The block size of the ext4 filesystem at `offset`, or None if there is none."""
    try:
        with image.open("rb") as handle:
            handle.seek(offset + _SUPERBLOCK)
            superblock = handle.read(64)
    except OSError:
        return None
    if len(superblock) < 64 or int.from_bytes(superblock[56:58], "little") != _EXT4_MAGIC:
        return None
    log_size = int.from_bytes(superblock[24:28], "little")
    return 1024 << log_size if log_size <= 6 else None


def ext4_file_map(image: Path, offset: int = 0) -> FileMap:
    """The block map of every regular file: one batched `ls -p` per directory level, then
    one batched `dump_extents -l` by inode number (no name is ever quoted)."""
    block_size = ext4_block_size(image, offset)
    if block_size is None:
        raise BuildError(f"{image}: no ext4 superblock at byte offset {offset + _SUPERBLOCK}")
    device = _device(image, offset)
    regular = {
        path: (inode, entry.size)
        for path, (inode, entry) in _list_inodes(device).items()
        if entry.kind is EntryKind.FILE
    }
    files: dict[str, FileBlocks] = {}
    if regular:
        output = _debugfs(
            device, [b"dump_extents -l <%d>" % inode for inode, _ in regular.values()]
        )
        reports = _split_echoed(output, len(regular))
        for (path, (_, size)), report in zip(regular.items(), reports, strict=True):
            extents = []
            for line in report.splitlines():
                found = _EXTENT_LINE.match(line)
                if found is not None and found.group(4) != b"Uninit":
                    logical, physical, count = map(int, found.group(1, 2, 3))
                    extents.append((logical, physical, count))
            files[path] = FileBlocks(size, tuple(sorted(extents)))
    return FileMap(block_size, files)


def _list_inodes(device: str) -> dict[str, tuple[int, FsEntry]]:
    """Path -> (inode, entry) for the whole tree: one batched `ls -p` per directory level.

    Directories are addressed by inode number ("<12>"), so no name is ever quoted.
    """
    found: dict[str, tuple[int, FsEntry]] = {}
    level = [("", _ROOT_INODE)]
    while level:
        output = _debugfs(device, [b"ls -p <%d>" % inode for _, inode in level])
        next_level: list[tuple[str, int]] = []
        for (directory, _), listing in zip(level, _split_echoed(output, len(level)), strict=True):
            for line in listing.splitlines():
                if not line:
                    continue
                name, inode, entry = _parse_ls_line(device, line)
                if name in (".", "..") or (not directory and name == "lost+found"):
                    continue
                path = posixpath.join(directory, name)
                found[path] = (inode, entry)
                if entry.kind is EntryKind.DIRECTORY:
                    next_level.append((path, inode))
        level = next_level
    return found


def _parse_ls_line(device: str, line: bytes) -> tuple[str, int, FsEntry]:
    # `ls -p` prints /inode/mode/uid/gid/name/size/ and a name cannot contain a slash.
    fields = line.split(b"/")
    if len(fields) != 8:
        raise BuildError(f"{device}: unexpected debugfs listing line {line!r}")
    name = os.fsdecode(fields[5])
    mode = int(fields[2], 8)
    kind = entry_kind(mode)
    if kind is None:
        raise BuildError(f"{device}: {name}: unsupported file type {mode:o}")
    size = 0 if kind is EntryKind.DIRECTORY else int(fields[6])
    entry = FsEntry(kind, stat.S_IMODE(mode), size, None, int(fields[3]), int(fields[4]))
    return name, int(fields[1]), entry


def _read_symlinks(device: str, symlinks: dict[str, tuple[int, int]]) -> dict[str, bytes]:
    """Symlink targets: short ("fast") ones from one batched `stat`, long ones with `cat`."""
    if not symlinks:
        return {}
    output = _debugfs(device, [b"stat <%d>" % inode for inode, _ in symlinks.values()])
    targets: dict[str, bytes] = {}
    reports = _split_echoed(output, len(symlinks))
    for (path, (inode, size)), report in zip(symlinks.items(), reports, strict=True):
        start = report.find(_FAST_LINK)
        if start >= 0:
            start += len(_FAST_LINK)
            targets[path] = report[start : start + size]
        else:
            completed = run(["debugfs", "-R", f"cat <{inode}>", device], env=_env())
            _raise_for_errors(device, completed.stderr)
            targets[path] = completed.stdout
    return targets


def _split_echoed(output: bytes, count: int) -> list[bytes]:
    """Split `debugfs -f` output into each command's part: it echoes "debugfs: <command>"."""
    parts: list[bytearray] = []
    for line in output.splitlines(keepends=True):
        if line.startswith(_ECHO):
            parts.append(bytearray())
        elif parts:
            parts[-1] += line
    if len(parts) != count:
        raise BuildError(f"debugfs answered {len(parts)} of {count} commands")
    return [bytes(part) for part in parts]


def _debugfs(device: str, commands: list[bytes], *, write: bool = False) -> bytes:
    """Run `commands` in one debugfs session; debugfs exits 0 on errors, so read stderr."""
    with tempfile.TemporaryDirectory(prefix="avobuild-debugfs-") as workdir:
        script = Path(workdir) / "commands"
        script.write_bytes(b"".join(command + b"\n" for command in commands))
        argv: list[str | Path] = ["debugfs", *(["-w"] if write else []), "-f", script, device]
        completed = run(argv, env=_env(), input_bytes=b"")
    _raise_for_errors(device, completed.stderr)
    return completed.stdout


def _raise_for_errors(device: str, stderr: bytes) -> None:
    problems = [
        line.decode(errors="replace")
        for line in stderr.splitlines()
        if line.strip() and not _DEBUGFS_BANNER.match(line)
    ]
    if problems:
        raise BuildError(f"{device}: debugfs: " + "; ".join(problems))


def _env() -> dict[str, str]:
    # The fake time also dates the superblock's last-write field when debugfs closes.
    return {"E2FSPROGS_FAKE_TIME": str(ext4_epoch()), "DEBUGFS_PAGER": "__none__"}


def _quote(path: str) -> bytes:
    """A path as one debugfs argument: double quotes, an embedded quote doubled."""
    return b'"' + os.fsencode(path).replace(b'"', b'""') + b'"'


def _check_device_path(image: Path) -> None:
    # libext2fs splits "name?options" itself, so a "?" in the file name would be misread.
    if "?" in str(image):
        raise BuildError(f"{image}: e2fsprogs cannot open image paths containing '?'")


def _device(image: Path, offset: int) -> str:
    _check_device_path(image)
    if offset < 0:
        raise BuildError(f"{image}: negative filesystem offset {offset}")
    return f"{image}?offset={offset}" if offset else str(image)
