"""The delta benchmark's corpus: two ext4 root filesystems from two releases of real software.

Each release is a set of PyPI wheels (large compiled libraries: numpy, scipy, pandas, pyarrow,
llvmlite, OpenCV), unpacked into a `usr/lib/python3/dist-packages` tree and built into an
ext4 image with avobuild's own reproducible builder, the way a rootfs update ships. The "new"
release is the next patch release of every package, as in a routine fleet update.

Everything is cached under the work directory (build/bench/ by default, gitignored): wheels are
downloaded once with `pip download`, images are rebuilt only when missing.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from avobuild.fs import build_filesystem
from avobuild.model.layout import FsType

RELEASES = {
    "old": [
        "numpy==1.26.3",
        "scipy==1.11.3",
        "pandas==2.1.3",
        "pyarrow==14.0.1",
        "llvmlite==0.41.0",
        "opencv-python-headless==4.8.1.78",
    ],
    "new": [
        "numpy==1.26.4",
        "scipy==1.11.4",
        "pandas==2.1.4",
        "pyarrow==14.0.2",
        "llvmlite==0.41.1",
        "opencv-python-headless==4.9.0.80",
    ],
}
IMAGE_SIZE = 660 << 20
SITE_PACKAGES = Path("usr/lib/python3/dist-packages")


def download_wheels(release: str, directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    wheels = sorted(directory.glob("*.whl"))
    if len(wheels) < len(RELEASES[release]):
        subprocess.run(  # noqa: S603 - fixed argv
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--only-binary=:all:",
                "--platform",
                "manylinux2014_x86_64",
                "--python-version",
                "3.11",
                "-d",
                str(directory),
                *RELEASES[release],
            ],
            check=True,
        )
        wheels = sorted(directory.glob("*.whl"))
    return wheels


def unpack_tree(wheels: list[Path], tree: Path) -> None:
    target = tree / SITE_PACKAGES
    target.mkdir(parents=True, exist_ok=True)
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            for member in sorted(archive.infolist(), key=lambda info: info.filename):
                path = archive.extract(member, target)
                mode = (member.external_attr >> 16) & 0o777
                Path(path).chmod(mode or (0o755 if member.is_dir() else 0o644))
    (tree / "etc").mkdir(exist_ok=True)
    (tree / "etc" / "os-release").write_text(f"NAME=bench\nVERSION_ID={tree.name}\n")


def build_corpus(work: Path, fs: FsType = FsType.EXT4) -> dict[str, Path]:
    """The two images, old.img and new.img (old.erofs and new.erofs with `fs` erofs, and so
    on), built (or reused) under `work`."""
    images = {}
    for release in RELEASES:
        image = work / f"{release}.{'img' if fs is FsType.EXT4 else fs.value}"
        if not image.exists():
            wheels = download_wheels(release, work / "wheels" / release)
            tree = work / "trees" / release
            if not tree.exists():
                unpack_tree(wheels, tree)
            partial = image.with_suffix(".partial")
            build_filesystem(fs, tree, partial, IMAGE_SIZE, label="rootfs", seed="bench-rootfs")
            partial.rename(image)
        images[release] = image
    return images


if __name__ == "__main__":
    for release, path in build_corpus(
        Path(sys.argv[1] if len(sys.argv) > 1 else "build/bench")
    ).items():
        print(release, path, path.stat().st_size)
