"""Reproducible ext4 images: `mke2fs -d` builds them, debugfs normalises and reads them.

mke2fs gets every value it would otherwise draw at random or from the clock: the UUID (-U)
and the directory hash seed (-E hash_seed) derive from the caller's seed, and
E2FSPROGS_FAKE_TIME stands in for the clock. Its defaults come from a profile written here
(MKE2FS_CONFIG) instead of the host's /etc/mke2fs.conf, so the feature set and inode ratio do
not change with the build host; lazy inode table and journal init are off so the image does
not depend on the host kernel's lazy-init support. mke2fs populates each directory in sorted
order (scandir + alphasort since e2fsprogs 1.43) and, with no_copy_xattrs, ignores host
xattrs such as SELinux labels.

What `mke2fs -d` still copies from the source tree (owner, atime/mtime/ctime) is overwritten
afterwards with debugfs, addressing inodes by number: every inode becomes root:root with all
four timestamps at the build epoch, and the root directory takes the source directory's
mode. e2fsprogs reads a fake time of 0 as "use the clock", so the epoch is
SOURCE_DATE_EPOCH but at least 1.

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
from pathlib import Path

from avobuild.errors import BuildError, ToolFailed
from avobuild.fs.common import (
    EntryKind,
    FsEntry,
    create_sparse_file,
    deterministic_uuid,
    entry_kind,
    scan_source_tree,
    tree_bytes,
)
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
_OUT_OF_SPACE = ("Could not allocate block", "Could not allocate inode", "No free space")


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


def build_ext4(source: Path | None, output: Path, size: int, *, label: str, seed: str) -> None:
    """Build a reproducible ext4 filesystem of `size` bytes in `output` holding `source`."""
    check_ext4_label(label)
    _check_device_path(output)
    entries = scan_source_tree(source) if source is not None else {}
    for path in entries:
        if "\n" in path or "\r" in path:
            # debugfs lists one name per line; such a name could not be read back.
            raise BuildError(f"{source}/{path}: ext4 images cannot hold names with line breaks")
    epoch = ext4_epoch()
    create_sparse_file(output, size)
    extended = ",".join(
        [
            "root_owner=0:0",
            f"hash_seed={deterministic_uuid(seed, 'ext4-hash-seed')}",
            "lazy_itable_init=0",
            "lazy_journal_init=0",
            "nodiscard",
            "no_copy_xattrs",
        ]
    )
    with tempfile.TemporaryDirectory(prefix="avobuild-ext4-") as workdir:
        profile = Path(workdir) / "mke2fs.conf"
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
            extended,
        ]
        if label:
            argv += ["-L", label]
        if source is not None:
            argv += ["-d", source]
        argv.append(output)
        env = {"MKE2FS_CONFIG": str(profile), "E2FSPROGS_FAKE_TIME": str(epoch)}
        try:
            run(argv, env=env, input_bytes=b"")
        except ToolFailed as failure:
            if any(marker in failure.stderr for marker in _OUT_OF_SPACE):
                reason = failure.stderr.strip().splitlines()[-1]
                raise BuildError(
                    f"{source}: the tree ({tree_bytes(entries)} bytes of files in "
                    f"{len(entries)} entries) does not fit in a {size}-byte ext4 filesystem "
                    f"({reason}); make the partition bigger"
                ) from None
            raise
    if source is not None:
        root_mode = stat.S_IMODE(source.stat().st_mode)
        device = str(output)
        inodes = sorted({inode for inode, _ in _list_inodes(device).values()})
        _debugfs(device, _normalise_commands(root_mode, inodes, epoch), write=True)


def _normalise_commands(root_mode: int, inodes: list[int], epoch: int) -> list[bytes]:
    commands = [b"sif <%d> mode 0%o" % (_ROOT_INODE, stat.S_IFDIR | root_mode)]
    for inode in [_ROOT_INODE, *inodes]:
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
    return dict(sorted(entries.items()))


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
