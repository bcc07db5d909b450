"""Where the content of a filesystem comes from: a directory tree or a tar archive.

Build systems hand over root filesystems in one of two shapes: a directory (Buildroot's
`target/`, mmdebstrap or debootstrap run as root, a checkout) or a tar archive (Yocto's
`*.rootfs.tar.zst`, Buildroot's `rootfs.tar`, mkosi's `tar` output, mmdebstrap as a user).
Both are the user's input and are treated as hostile: avobuild never follows a symlink of
either, never opens a device node or FIFO of a tree, and never extracts an archive member
outside its own work directory (docs/recipes.md, "Root filesystem inputs").
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path


class TreeKind(enum.StrEnum):
    DIRECTORY = "directory"
    ARCHIVE = "archive"


class Ownership(enum.StrEnum):
    """Who owns the entries in the image.

    `preserve` keeps the owner and group of every entry as the tree or the archive records
    them (a tar archive made by a non-root build system records root). `root` makes every
    entry 0:0: the choice for a tree checked out or built by an ordinary user.
    """

    PRESERVE = "preserve"
    ROOT = "root"


# The suffixes a tar archive may carry; the compression is detected from the content.
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.zst", ".tar.zstd", ".tar.xz", ".txz")


@dataclass(frozen=True)
class TreeSource:
    """The content of a filesystem image: a directory or a tar archive, and how to read it.

    `xattrs` False leaves every extended attribute out (for example the build host's
    SELinux labels); by default they reach the image where its format can hold them.
    """

    path: Path
    kind: TreeKind
    ownership: Ownership = Ownership.PRESERVE
    xattrs: bool = True

    @classmethod
    def own_directory(cls, path: Path) -> TreeSource:
        """A directory avobuild made itself: every entry root-owned, no extended attributes."""
        return cls(path, TreeKind.DIRECTORY, Ownership.ROOT, xattrs=False)

    def __str__(self) -> str:
        return str(self.path)
