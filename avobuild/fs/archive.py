"""Tar archives as root filesystem inputs: read once, validated, never trusted.

Yocto, Buildroot, mkosi and mmdebstrap hand over root filesystems as tar archives (plain,
gzip, zstd or xz; the compression is recognised by its magic bytes, not by the name). Every
member is checked before anything is made of it (docs/recipes.md, "Root filesystem inputs"):

* names are made relative ("./etc" is "etc"); an absolute name, a ".." component, a line
  break or an empty name is refused, and so is a name that appears twice;
* every parent of a member must be a directory of the archive (or not be in it at all, as
  tar allows); a member below a symlink or a file is refused, so nothing made from the
  archive can ever write through a link;
* a hard link must name an earlier regular file; owners must fit 32 bits;
* the member types are regular files (sparse ones included), directories, symlinks, hard
  links, character and block devices and FIFOs. Extended attributes come from the pax
  records GNU tar (`SCHILY.xattr.*`) and libarchive (`LIBARCHIVE.xattr.*`) write.

Errors name the archive, the member and its header's byte offset in the uncompressed stream.
An archive is read as a stream (tarfile's "r|" mode): bounded memory whatever its size.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import lzma
import os
import posixpath
import stat
import tarfile
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

import zstandard

from avobuild.errors import BuildError
from avobuild.fs.common import SPECIAL_KINDS, EntryKind, FsEntry
from avobuild.model.tree import Ownership

MAX_ID = (1 << 32) - 1
_COPY_BLOCK = 1 << 16
_ZERO_BLOCK = bytes(_COPY_BLOCK)
_SCHILY = "SCHILY.xattr."
_LIBARCHIVE = "LIBARCHIVE.xattr."
_KINDS = {
    tarfile.REGTYPE: EntryKind.FILE,
    tarfile.AREGTYPE: EntryKind.FILE,
    tarfile.CONTTYPE: EntryKind.FILE,
    tarfile.GNUTYPE_SPARSE: EntryKind.FILE,
    tarfile.DIRTYPE: EntryKind.DIRECTORY,
    tarfile.SYMTYPE: EntryKind.SYMLINK,
    tarfile.LNKTYPE: EntryKind.FILE,
    tarfile.CHRTYPE: EntryKind.CHAR_DEVICE,
    tarfile.BLKTYPE: EntryKind.BLOCK_DEVICE,
    tarfile.FIFOTYPE: EntryKind.FIFO,
}

Xattrs = tuple[tuple[str, bytes], ...]


@dataclass(frozen=True)
class ArchiveMember:
    """One validated member: its path in the image, what it is and its extended attributes.

    `link` is the path of the earlier regular file a hard link shares its inode with.
    """

    path: str
    entry: FsEntry
    link: str | None = None
    xattrs: Xattrs = ()


@dataclass(frozen=True)
class ArchiveIndex:
    """What an archive holds, in archive order; `root` is the "./" member when it has one."""

    members: tuple[ArchiveMember, ...]
    root: ArchiveMember | None

    def entries(self) -> dict[str, FsEntry]:
        return {member.path: member.entry for member in self.members}


@contextmanager
def read_tar(path: Path) -> Iterator[tarfile.TarFile]:
    """The archive as a tarfile stream ("r|"): each member once, in order."""
    with open_archive(path) as stream:
        try:
            tar = tarfile.open(fileobj=stream, mode="r|")  # noqa: SIM115 - entered below
        except (tarfile.TarError, OSError, EOFError, zstandard.ZstdError, lzma.LZMAError) as error:
            raise _fail(path, None, f"not a valid tar archive, or truncated ({error})") from None
        with tar:
            yield tar


@contextmanager
def open_archive(path: Path) -> Iterator[IO[bytes]]:
    """The uncompressed byte stream of a tar archive, whatever its compression."""
    try:
        raw = path.open("rb")
    except OSError as error:
        raise BuildError(f"{path}: cannot read the archive: {error.strerror}") from None
    with contextlib.ExitStack() as stack:
        stack.enter_context(raw)
        magic = raw.read(6)
        raw.seek(0)
        stream: IO[bytes]
        if magic.startswith(b"\x1f\x8b"):
            stream = cast(IO[bytes], stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb")))
        elif magic.startswith(b"\x28\xb5\x2f\xfd"):
            stream = stack.enter_context(zstandard.ZstdDecompressor().stream_reader(raw))
        elif magic == b"\xfd7zXZ\x00":
            stream = stack.enter_context(lzma.LZMAFile(raw, mode="rb"))
        else:
            stream = raw
        yield stream


def _fail(archive: Path, info: tarfile.TarInfo | None, problem: str) -> BuildError:
    if info is None:
        return BuildError(f"{archive}: {problem}")
    return BuildError(
        f"{archive}: member {_printable(info.name)!r} (header at byte {info.offset} of the "
        f"uncompressed archive): {problem}"
    )


def _printable(name: str) -> str:
    cut = name if len(name) <= 200 else name[:200] + "…"
    return cut.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")


def normalise_name(archive: Path, info: tarfile.TarInfo, name: str) -> str:
    """A member name as a path relative to the image root ("" for the root itself)."""
    if "\n" in name or "\r" in name or "\0" in name:
        raise _fail(archive, info, "names with line breaks or NUL bytes are refused")
    if name.startswith("/"):
        raise _fail(archive, info, "absolute path; expected a path inside the root (./etc/…)")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise _fail(archive, info, "'..' in the path; expected a path inside the root")
    return "/".join(parts)


def _xattrs(archive: Path, info: tarfile.TarInfo) -> Xattrs:
    found: dict[str, bytes] = {}
    for key, value in info.pax_headers.items():
        if key.startswith(_SCHILY):
            # tarfile decodes pax values as UTF-8 with surrogateescape: undo it for raw bytes.
            found[key[len(_SCHILY) :]] = value.encode("utf-8", "surrogateescape")
        elif key.startswith(_LIBARCHIVE):
            name = urllib.parse.unquote(key[len(_LIBARCHIVE) :])
            try:
                found[name] = base64.b64decode(value, validate=True)
            except ValueError:
                raise _fail(archive, info, f"xattr {name!r}: invalid base64") from None
    return tuple(sorted(found.items()))


def iter_members(
    archive: Path, tar: tarfile.TarFile, ownership: Ownership
) -> Iterator[tuple[ArchiveMember, tarfile.TarInfo]]:
    """Every member of an open stream, validated (see the module docstring), in order."""
    seen: dict[str, ArchiveMember] = {}
    root_seen = False
    try:
        for info in tar:
            path = normalise_name(archive, info, info.name)
            kind = _KINDS.get(info.type)
            if kind is None:
                raise _fail(archive, info, f"unsupported member type {info.type!r}")
            if not path:
                if kind is not EntryKind.DIRECTORY or root_seen:
                    raise _fail(archive, info, "the root of the archive must be one directory")
                root_seen = True
                yield _member(archive, info, "", kind, ownership, None), info
                continue
            if path in seen:
                raise _fail(archive, info, f"{path} appears twice in the archive")
            parent = posixpath.dirname(path)
            while parent:
                above = seen.get(parent)
                if above is not None and above.entry.kind is not EntryKind.DIRECTORY:
                    raise _fail(
                        archive,
                        info,
                        f"its parent {parent} is a {above.entry.kind.value} in the archive, "
                        "not a directory; refusing to put anything below it",
                    )
                parent = posixpath.dirname(parent)
            link = None
            if info.type == tarfile.LNKTYPE:
                link = normalise_name(archive, info, info.linkname)
                target = seen.get(link)
                if target is None or target.entry.kind is not EntryKind.FILE:
                    raise _fail(
                        archive, info, f"hard link to {link!r}, which is not an earlier file"
                    )
                link = target.link or link
            member = _member(archive, info, path, kind, ownership, link)
            seen[path] = member
            yield member, info
    except tarfile.TarError as error:
        raise _fail(archive, None, f"not a valid tar archive ({error})") from None
    except (OSError, EOFError, zstandard.ZstdError, lzma.LZMAError) as error:
        raise _fail(archive, None, f"truncated or corrupt archive ({error})") from None


def _member(
    archive: Path,
    info: tarfile.TarInfo,
    path: str,
    kind: EntryKind,
    ownership: Ownership,
    link: str | None,
) -> ArchiveMember:
    for what, value in (("uid", info.uid), ("gid", info.gid)):
        if not 0 <= value <= MAX_ID:
            raise _fail(archive, info, f"{what} {value} does not fit 32 bits")
    uid, gid = (info.uid, info.gid) if ownership is Ownership.PRESERVE else (0, 0)
    mode = stat.S_IMODE(info.mode)
    target = None
    size = 0
    device = None
    if kind is EntryKind.SYMLINK:
        target = info.linkname
        if not target or "\0" in target:
            raise _fail(archive, info, "a symlink needs a target")
        size, mode = len(os.fsencode(target)), 0o777
    elif kind is EntryKind.FILE:
        size = info.size
    elif kind in (EntryKind.CHAR_DEVICE, EntryKind.BLOCK_DEVICE):
        device = (info.devmajor, info.devminor)
    entry = FsEntry(kind, mode, size, target, uid, gid, device)
    return ArchiveMember(path, entry, link, _xattrs(archive, info))


def scan_archive(
    archive: Path,
    ownership: Ownership = Ownership.PRESERVE,
    on_file: Callable[[str, bytes], None] | None = None,
) -> ArchiveIndex:
    """Read the whole archive once: its validated members; `on_file` gets each file's head."""
    with read_tar(archive) as tar:
        return _index(archive, tar, ownership, on_file)


def _index(
    archive: Path,
    tar: tarfile.TarFile,
    ownership: Ownership,
    on_file: Callable[[str, bytes], None] | None,
    handle: Callable[[ArchiveMember, tarfile.TarInfo], None] | None = None,
) -> ArchiveIndex:
    members: list[ArchiveMember] = []
    root = None
    for member, info in iter_members(archive, tar, ownership):
        if not member.path:
            root = member
            continue
        members.append(member)
        if handle is not None:
            handle(member, info)
        elif on_file is not None and member.entry.kind is EntryKind.FILE and not member.link:
            data = tar.extractfile(info)
            assert data is not None
            on_file(member.path, data.read(64))
    return ArchiveIndex(tuple(members), root)


def extract_archive(
    archive: Path,
    destination: Path,
    *,
    ownership: Ownership = Ownership.PRESERVE,
    on_file: Callable[[str, bytes], None] | None = None,
) -> ArchiveIndex:
    """Write the archive's directories, files, symlinks and hard links below `destination`.

    `destination` must be a new, empty directory of avobuild's own work directory. Device
    nodes, FIFOs, owners, modes and extended attributes are not made on the host: they are
    returned in the index for the filesystem tool to store. Directories are made 0700 and
    files 0600, so an unprivileged build can fill them; files keep their holes.
    """
    if any(destination.iterdir()):
        raise BuildError(f"{destination}: extraction needs an empty directory")

    def write(member: ArchiveMember, info: tarfile.TarInfo) -> None:
        target = destination / member.path
        _make_parents(destination, member.path)
        kind = member.entry.kind
        if kind is EntryKind.DIRECTORY:
            if not target.is_dir() or target.is_symlink():
                target.mkdir(mode=0o700)
        elif kind is EntryKind.SYMLINK:
            assert member.entry.target is not None
            target.symlink_to(member.entry.target)
        elif member.link is not None:
            os.link(destination / member.link, target, follow_symlinks=False)
        elif kind is EntryKind.FILE:
            data = tar.extractfile(info)
            assert data is not None
            _write_sparse(target, data, member.entry.size, member.path, on_file)
        else:
            assert kind in SPECIAL_KINDS

    with read_tar(archive) as tar:
        return _index(archive, tar, ownership, None, write)


def _make_parents(destination: Path, relative: str) -> None:
    """Directories a member's name implies but the archive left out (tar allows it)."""
    parent = posixpath.dirname(relative)
    missing = []
    while parent and not (destination / parent).is_dir():
        missing.append(parent)
        parent = posixpath.dirname(parent)
    for directory in reversed(missing):
        (destination / directory).mkdir(mode=0o700)


def _write_sparse(
    target: Path,
    data: IO[bytes],
    size: int,
    relative: str,
    on_file: Callable[[str, bytes], None] | None,
) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(target, flags, 0o600)
    try:
        position = 0
        first = True
        while position < size:
            block = data.read(min(_COPY_BLOCK, size - position))
            if not block:
                raise BuildError(f"{target}: the archive ended inside this file")
            if first and on_file is not None:
                on_file(relative, block[:64])
                first = False
            if block != _ZERO_BLOCK[: len(block)]:
                os.pwrite(fd, block, position)
            position += len(block)
        if first and on_file is not None:
            on_file(relative, b"")
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def member_tarinfo(member: ArchiveMember, epoch: int, *, xattrs: bool) -> tarfile.TarInfo:
    """A fresh pax header for a validated member (what a re-written stream carries)."""
    entry = member.entry
    info = tarfile.TarInfo(member.path)
    info.mode = entry.mode
    info.uid, info.gid = entry.uid, entry.gid
    info.uname = info.gname = ""
    info.mtime = epoch
    if member.link is not None:
        info.type, info.linkname = tarfile.LNKTYPE, member.link
    elif entry.kind is EntryKind.FILE:
        info.type, info.size = tarfile.REGTYPE, entry.size
    elif entry.kind is EntryKind.DIRECTORY:
        info.type = tarfile.DIRTYPE
    elif entry.kind is EntryKind.SYMLINK:
        assert entry.target is not None
        info.type, info.linkname = tarfile.SYMTYPE, entry.target
    elif entry.kind is EntryKind.FIFO:
        info.type = tarfile.FIFOTYPE
    else:
        assert entry.device is not None
        is_char = entry.kind is EntryKind.CHAR_DEVICE
        info.type = tarfile.CHRTYPE if is_char else tarfile.BLKTYPE
        info.devmajor, info.devminor = entry.device
    if xattrs and member.xattrs:
        info.pax_headers = {
            _SCHILY + name: value.decode("utf-8", "surrogateescape")
            for name, value in member.xattrs
        }
    return info


def apply_archive_metadata(
    archive: Path, index: ArchiveIndex, destination: Path, *, xattrs: bool
) -> None:
    """Give an unpacked archive its recorded modes, owners, special files and xattrs.

    For tools that only read directories and cannot be told afterwards (mkfs.erofs 1.5).
    As root everything is made as recorded, below avobuild's own 0700 work directory. An
    unprivileged build keeps modes and FIFOs, and refuses a member it cannot represent:
    another owner than root (an unprivileged build maps its own files to root), a device
    node, or a security/trusted extended attribute.
    """
    privileged = os.geteuid() == 0
    for member in index.members:
        entry = member.entry
        target = destination / member.path
        if not privileged:
            problem = None
            if entry.uid or entry.gid:
                problem = f"owner {entry.uid}:{entry.gid}"
            elif entry.kind in (EntryKind.CHAR_DEVICE, EntryKind.BLOCK_DEVICE):
                problem = "a device node"
            elif xattrs and any(not name.startswith("user.") for name, _ in member.xattrs):
                problem = "a security or trusted extended attribute"
            if problem is not None:
                raise BuildError(
                    f"{archive}: /{member.path} has {problem}, which an erofs image built "
                    "without root cannot hold (erofs-utils 1.5 reads only directories); "
                    "build as root, or use an ext4 or squashfs slot"
                )
        if entry.kind in (EntryKind.CHAR_DEVICE, EntryKind.BLOCK_DEVICE):
            assert entry.device is not None
            kind = stat.S_IFCHR if entry.kind is EntryKind.CHAR_DEVICE else stat.S_IFBLK
            os.mknod(target, kind | 0o600, os.makedev(*entry.device))
        elif entry.kind is EntryKind.FIFO:
            os.mkfifo(target, 0o600)
        elif entry.kind is EntryKind.SOCKET:
            raise BuildError(f"{archive}: /{member.path}: tar archives cannot carry sockets")
        if privileged:
            # Before the xattrs: the kernel drops security.capability on a change of owner.
            os.chown(target, entry.uid, entry.gid, follow_symlinks=False)
        if xattrs:
            for name, value in member.xattrs:
                os.setxattr(target, name, value, follow_symlinks=False)
    # Modes last and deepest first: a read-only directory must not stop its children.
    for member in reversed(index.members):
        if member.entry.kind is not EntryKind.SYMLINK and member.link is None:
            (destination / member.path).chmod(member.entry.mode, follow_symlinks=False)
    root = index.root.entry if index.root is not None else None
    destination.chmod(root.mode if root is not None else 0o755)
    if privileged and root is not None:
        os.chown(destination, root.uid, root.gid)
