"""The delta benchmark's second corpus: two point releases of Debian 12 packages.

bench/delta/debian-packages.txt lists, one per line, a package and its old and new version:
bookworm's and bookworm-security's or bookworm-updates' (libc6 2.36-9+deb12u7 -> u14, OpenSSL
3.0.20 -> 3.0.22, systemd 252.38 -> 252.39, PostgreSQL 15, QEMU, git, Python 3.11, Perl, and
the kernel 6.1.176 -> 6.1.192, whose ABI directory moves from 6.1.0-50 to 6.1.0-57). Both
sets are fetched with `apt-get download` (cached under WORK/debian/debs/), unpacked with
`dpkg-deb -x` and built into ext4 images by avobuild's builder: a distribution update, with
recompiled code throughout, where the first corpus (PyPI wheels) is one application stack.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from avobuild.fs import build_filesystem
from avobuild.model.layout import FsType

PACKAGES = Path(__file__).with_name("debian-packages.txt")
ARCHITECTURES = ("amd64", "arm64")
# The kernel's package name carries its ABI number.
KERNEL_ABI = {"old": "6.1.0-50", "new": "6.1.0-57"}


def package_specs(release: str, arch: str) -> list[str]:
    specs = []
    for line in PACKAGES.read_text().splitlines():
        name, old, new = line.split()
        version = old if release == "old" else new
        if name == "linux-image":
            name = f"linux-image-{KERNEL_ABI[release]}-{arch}"
        # An architecture-independent package (perl-modules) takes no foreign qualifier.
        qualifier = "" if _architecture_all(name, version) else f":{arch}"
        specs.append(f"{name}{qualifier}={version}")
    return specs


def _architecture_all(name: str, version: str) -> bool:
    shown = subprocess.run(  # noqa: S603 - fixed argv
        ["apt-cache", "show", "--no-all-versions", f"{name}={version}"],
        capture_output=True,
        text=True,
    ).stdout
    return "\nArchitecture: all\n" in f"\n{shown}"


def download(release: str, directory: Path, arch: str) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    specs = package_specs(release, arch)
    if len(list(directory.glob("*.deb"))) < len(specs):
        subprocess.run(["apt-get", "download", "-q", *specs], cwd=directory, check=True)  # noqa: S603
    return sorted(directory.glob("*.deb"))


def tree_bytes(tree: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(tree):
        for name in files:
            path = Path(root, name)
            if path.is_file() and not path.is_symlink():
                total += -(-path.stat().st_size // 4096) * 4096
    return total


def build_debian_corpus(
    work: Path, fs: FsType = FsType.EXT4, arch: str = "amd64"
) -> dict[str, Path]:
    """old.img and new.img of the Debian corpus (old.erofs and new.erofs with `fs` erofs),
    built (or reused) under WORK/debian (WORK/debian-arm64 for the arm64 packages: apt needs
    dpkg's arm64 architecture, which scripts/setup-host adds)."""
    base = work / ("debian" if arch == "amd64" else f"debian-{arch}")
    trees = {}
    for release in ("old", "new"):
        tree = base / "trees" / release
        if not tree.exists():
            partial = tree.with_suffix(".partial")
            shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted run
            partial.mkdir(parents=True)
            for deb in download(release, base / "debs" / release, arch):
                subprocess.run(["dpkg-deb", "-x", str(deb), str(partial)], check=True)  # noqa: S603
            partial.rename(tree)
        trees[release] = tree
    # One size for both images, as for two releases of one slot: 1.12 x the larger tree + 48 MiB.
    size = ((int(max(map(tree_bytes, trees.values())) * 1.12) + (48 << 20)) >> 20) << 20
    images = {}
    for release, tree in trees.items():
        image = base / f"{release}.{'img' if fs is FsType.EXT4 else fs.value}"
        if not image.exists():
            partial = image.with_suffix(".partial")
            build_filesystem(fs, tree, partial, size, label="rootfs", seed="debian-rootfs")
            partial.rename(image)
        images[release] = image
    return images


if __name__ == "__main__":
    for release, path in build_debian_corpus(
        Path(sys.argv[1] if len(sys.argv) > 1 else "build/bench")
    ).items():
        print(release, path, path.stat().st_size)
