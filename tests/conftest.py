"""Shared fixtures: a small seeded product (recipe, layout, trees, keys) built in a temp dir."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import settings

REPO = Path(__file__).resolve().parent.parent
BUSYBOX = Path("/bin/busybox")

os.environ.setdefault("SOURCE_DATE_EPOCH", "1767225600")

# The one hypothesis profile: the same examples on every run and machine (derandomized, no
# example database, so nothing is written outside tmp_path), no timing-based failures.
settings.register_profile("avobuild", derandomize=True, database=None, deadline=None)
settings.load_profile("avobuild")


# The suite runs on every core (pytest-xdist, `--dist loadfile --no-loadscope-reorder`: a
# file's tests stay on one worker, so module fixtures are built once, and files are handed out
# in this order). Each worker starts with two files, the first worker the 1st and 3rd, the
# second the 2nd and 4th: the longest files, each a device's life in QEMU, go first and in
# pairs that take about as long, and the short files fill the gaps; the rest keep their order.
LONGEST_FIRST = (
    "test_device_lifecycle.py",
    "test_distro.py",
    "test_differential.py",
    "test_device_arm64.py",
    "test_applier_device.py",
    "test_media_boot.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A run that passed leaves nothing behind: its temporary directory goes, the module and
    session fixtures' images with it (the failed tests' directories are kept for reading).
    Only the directory pytest chose is removed, never a --basetemp the user named; under
    pytest-xdist the controller removes it, the workers' directories being inside it."""
    config = session.config
    if exitstatus != 0 or config.option.basetemp or hasattr(config, "workerinput"):
        return
    factory = getattr(config, "_tmp_path_factory", None)
    basetemp = getattr(factory, "_basetemp", None)
    if basetemp is not None:
        shutil.rmtree(basetemp, ignore_errors=True)


def avobuild_cli(
    *args: str | Path, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the installed `avobuild` console script as a user would (`env`: its environment,
    default this one, which carries the suite's SOURCE_DATE_EPOCH)."""
    exe = shutil.which("avobuild") or str(REPO / ".venv" / "bin" / "avobuild")
    result = subprocess.run(
        [exe, *map(str, args)], capture_output=True, text=True, check=False, cwd=REPO, env=env
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"avobuild {' '.join(map(str, args))} exited {result.returncode}:\n{result.stderr}"
        )
    return result


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (images are too big to read at once)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def make_tree(root: Path, seed: int, files: int = 40) -> None:
    """A seeded directory tree: nested dirs, random-size files, symlinks, executables."""
    rng = random.Random(seed)
    dirs = [root]
    root.mkdir(parents=True, exist_ok=True)
    for index in range(files):
        if rng.random() < 0.25:
            new = rng.choice(dirs) / f"dir{index}"
            new.mkdir()
            dirs.append(new)
        target = rng.choice(dirs) / f"file{index}.bin"
        size = rng.choice([0, 1, 100, 4095, 4096, 70_000, rng.randrange(1, 300_000)])
        target.write_bytes(rng.randbytes(size))
        target.chmod(rng.choice([0o644, 0o755, 0o600]))
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc" / "hostname").write_text(f"device-{seed}\n")
    (root / "link-to-hostname").symlink_to("etc/hostname")


def fake_bzimage(path: Path, seed: int, size: int = 200_000) -> Path:
    """Seeded bytes with the x86 boot protocol signature where a bzImage carries it."""
    data = bytearray(random.Random(seed).randbytes(size))
    data[0x202:0x206] = b"HdrS"
    path.write_bytes(bytes(data))
    return path


LAYOUT = """\
[disk]
table = "gpt"
sector-size = 512
alignment = "1M"

[partition.boot]
role = "boot"
type = "esp"
filesystem = "vfat"
size = "34M"

[partition.system-a]
role = "system-a"
type = "root-x86-64"
filesystem = "ext4"
size = "24M"

[partition.system-b]
role = "system-b"
type = "root-x86-64"
filesystem = "ext4"
size = "24M"

[partition.data]
role = "data"
type = "linux-generic"
filesystem = "ext4"
size = "8M"

[partition.recovery]
role = "recovery"
filesystem = "ext4"
size = "8M"
"""


@dataclass(frozen=True)
class Product:
    root: Path
    recipe: Path
    layout: Path
    rootfs: Path
    kernel: Path
    extension: Path
    data: Path
    private_key: Path
    public_key: Path


def write_product(root: Path, *, version: str = "1.0.0", seed: int = 1) -> Product:
    """A complete small product: layout, recipe, trees, kernel and a fresh key pair."""
    from avobuild.bundle.keys import generate_keypair

    root.mkdir(parents=True, exist_ok=True)
    layout = root / "layout.toml"
    layout.write_text(LAYOUT)
    rootfs = root / "rootfs"
    if not rootfs.exists():
        make_tree(rootfs, seed)
    extension = root / "ext"
    if not extension.exists():
        make_tree(extension, seed + 100, files=5)
    data = root / "data"
    if not data.exists():
        make_tree(data, seed + 200, files=5)
    kernel = fake_bzimage(root / "vmlinuz", seed)
    keys = root / "keys"
    if not (keys / "bundle-signing.key.pem").exists():
        generate_keypair(keys)
    recipe = root / f"product-{version}.toml"
    recipe.write_text(
        f"""\
[product]
name = "testprod"
version = "{version}"
compatible = "testprod-x86_64"
architecture = "x86_64"
layout = "layout.toml"

[rootfs]
tree = "rootfs"
ownership = "root"
directories = ["proc", "sys", "data"]

[[rootfs.file]]
source = "{BUSYBOX}"
dest = "/bin/busybox"
mode = "0755"

[kernel]
file = "vmlinuz"

[[extension]]
name = "tools"
tree = "ext"
ownership = "root"

[data]
tree = "data"

[signing]
key = "keys/bundle-signing.key.pem"

# The kernel is a fake: no boot chain can be built for it, only the boot state.
[boot]
method = "external"
"""
    )
    return Product(
        root,
        recipe,
        layout,
        rootfs,
        kernel,
        extension,
        data,
        keys / "bundle-signing.key.pem",
        keys / "bundle-signing.pub.pem",
    )


@pytest.fixture
def product(tmp_path: Path) -> Product:
    return write_product(tmp_path / "product")
