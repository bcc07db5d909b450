"""Factory images: read back with independent tools (sfdisk, fsck, debugfs, mtools, bmaptool)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, Product, avobuild_cli, file_sha256, write_product

from avobuild.boot.grubenv import parse_grubenv
from avobuild.disk.plan import plan_layout
from avobuild.errors import RecipeError
from avobuild.image.factory import FactoryImage, build_factory_image
from avobuild.model.layout import Role
from avobuild.model.recipe import load_recipe


def sh(*args: str | Path) -> str:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=True).stdout


def extract(disk: Path, offset: int, size: int, out: Path) -> Path:
    with disk.open("rb") as src, out.open("wb") as dst:
        src.seek(offset)
        remaining = size
        while remaining:
            block = src.read(min(1 << 20, remaining))
            dst.write(block)
            remaining -= len(block)
    return out


def tree_listing(root: Path) -> dict[str, tuple[str, int, bytes | str]]:
    """Relative path -> (kind, permission bits, content or link target)."""
    listing: dict[str, tuple[str, int, bytes | str]] = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory) / name
            rel = str(path.relative_to(root))
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                listing[rel] = ("link", 0, os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                listing[rel] = ("dir", 0, b"")
            else:
                listing[rel] = ("file", stat.S_IMODE(info.st_mode), path.read_bytes())
    return listing


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Product, FactoryImage]:
    root = tmp_path_factory.mktemp("image")
    product = write_product(root / "product")
    recipe = load_recipe(product.recipe)
    return product, build_factory_image(recipe, root / "out", root / "work")


def test_partition_table_checked_by_sfdisk(built: tuple[Product, FactoryImage]) -> None:
    product, image = built
    dump = json.loads(sh("sfdisk", "--json", image.path))["partitiontable"]
    assert dump["label"] == "gpt"
    assert dump["sectorsize"] == 512
    plan = plan_layout(load_recipe(product.recipe).layout)
    assert len(dump["partitions"]) == len(plan.partitions)
    for entry, part in zip(dump["partitions"], plan.partitions, strict=True):
        assert entry["name"] == part.spec.label
        assert entry["start"] == part.first_lba
        assert entry["size"] == part.last_lba - part.first_lba + 1
        assert entry["type"].lower() == str(part.spec.type_guid)
    verify = subprocess.run(["sfdisk", "-V", str(image.path)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "No errors detected" in verify.stdout


def test_every_filesystem_passes_fsck(built: tuple[Product, FactoryImage], tmp_path: Path) -> None:
    _product, image = built
    for part in image.plan.partitions:
        fs = part.spec.filesystem
        assert fs is not None
        raw = extract(image.path, part.offset, part.size, tmp_path / f"{part.spec.label}.img")
        if fs.value == "ext4":
            check = subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True, text=True)
        else:
            check = subprocess.run(["fsck.vfat", "-n", str(raw)], capture_output=True, text=True)
        assert check.returncode == 0, f"{part.spec.label}: {check.stdout}{check.stderr}"


def test_system_a_holds_the_recipe(built: tuple[Product, FactoryImage], tmp_path: Path) -> None:
    product, image = built
    system_a = image.plan.by_role(Role.SYSTEM_A)
    assert system_a is not None
    raw = extract(image.path, system_a.offset, system_a.size, tmp_path / "a.img")
    dump = tmp_path / "dump"
    dump.mkdir()
    sh("debugfs", "-R", f"rdump / {dump}", raw)
    got = tree_listing(dump)
    want = tree_listing(product.rootfs)
    for rel, entry in want.items():
        assert got.get(rel) == entry, rel
    assert got["bin/busybox"] == ("file", 0o755, Path("/bin/busybox").read_bytes())
    assert got["boot/vmlinuz"][2] == product.kernel.read_bytes()
    release = got["usr/lib/avobuild/release"][2]
    assert isinstance(release, bytes)
    assert b"AVOBUILD_VERSION=1.0.0\n" in release
    for directory in ("proc", "sys", "data"):
        assert got[directory][0] == "dir"
    # The extension is a squashfs image holding the extension tree.
    ext_image = dump / "usr/lib/extensions/tools.raw"
    listing = sh("unsquashfs", "-lc", ext_image)
    for rel, entry in tree_listing(product.extension).items():
        if entry[0] == "file":
            assert f"squashfs-root/{rel}" in listing
    # Every inode is owned by root whoever built the image.
    stat_out = sh("debugfs", "-R", "stat /bin/busybox", raw)
    assert "User:     0   Group:     0" in stat_out


def test_slot_b_is_empty_and_data_is_populated(
    built: tuple[Product, FactoryImage], tmp_path: Path
) -> None:
    product, image = built
    system_b = image.plan.by_role(Role.SYSTEM_B)
    data = image.plan.by_role(Role.DATA)
    assert system_b is not None and data is not None
    raw_b = extract(image.path, system_b.offset, system_b.size, tmp_path / "b.img")
    names = sh("debugfs", "-R", "ls -p /", raw_b).split()
    assert all("lost+found" in n or "/./" in n or "/../" in n for n in names if n.strip())
    raw_data = extract(image.path, data.offset, data.size, tmp_path / "data.img")
    dump = tmp_path / "data"
    dump.mkdir()
    sh("debugfs", "-R", f"rdump / {dump}", raw_data)
    got = tree_listing(dump)
    for rel, entry in tree_listing(product.data).items():
        assert got.get(rel) == entry, rel


def test_boot_state_on_esp(built: tuple[Product, FactoryImage]) -> None:
    _product, image = built
    boot = image.plan.by_role(Role.BOOT)
    assert boot is not None
    env = subprocess.run(
        ["mtype", "-i", f"{image.path}@@{boot.offset}", "::/avobuild/grubenv"],
        capture_output=True,
        check=True,
        env={**os.environ, "MTOOLS_SKIP_CHECK": "1"},
    ).stdout
    variables = parse_grubenv(env)
    assert variables["avo_primary"] == "A"
    assert variables["avo_A_ok"] == "1"
    assert variables["avo_A_version"] == "1.0.0"
    assert variables["avo_B_version"] == ""
    assert variables["avo_compatible"] == "testprod-x86_64"


def test_bmap_flashes_the_same_bytes(built: tuple[Product, FactoryImage], tmp_path: Path) -> None:
    _product, image = built
    target = tmp_path / "flashed.img"
    subprocess.run(
        ["bmaptool", "copy", "--bmap", str(image.bmap), str(image.path), str(target)],
        check=True,
        capture_output=True,
    )
    assert file_sha256(target) == file_sha256(image.path)
    text = image.bmap.read_text()
    mapped = int(text.split("<MappedBlocksCount>")[1].split("<")[0])
    total = int(text.split("<BlocksCount>")[1].split("<")[0])
    assert 0 < mapped < total  # the image is sparse and the map says so


def test_reproducible(built: tuple[Product, FactoryImage], tmp_path: Path) -> None:
    product, image = built
    # Touch the sources: mtimes must not leak into the image.
    for path in product.rootfs.rglob("*"):
        if not path.is_symlink():
            os.utime(path, (1_000_000_000, 1_000_000_000))
    again = build_factory_image(load_recipe(product.recipe), tmp_path / "out", tmp_path / "w")
    assert file_sha256(again.path) == file_sha256(image.path)
    assert again.bmap.read_bytes() == image.bmap.read_bytes()


def test_image_command_line(tmp_path: Path) -> None:
    product = write_product(tmp_path / "p", seed=7)
    result = avobuild_cli("image", product.recipe, "-o", tmp_path / "out")
    disk = tmp_path / "out" / "testprod-1.0.0.img"
    assert result.stdout.split() == [str(disk), str(disk.with_suffix(".bmap"))]
    assert "assembling" in result.stderr
    assert disk.is_file()


def test_recipe_error_exit_code(tmp_path: Path) -> None:
    product = write_product(tmp_path / "p", seed=8)
    product.layout.write_text(product.layout.read_text().replace('"24M"', '"huge"', 1))
    result = avobuild_cli("image", product.recipe, "-o", tmp_path / "out", check=False)
    assert result.returncode == RecipeError.exit_code == 11
    assert "Traceback" not in result.stderr
    assert f"{product.layout}: [partition.system-a] size: expected a size" in " ".join(
        result.stderr.split()
    )


def test_demo_recipe_builds(tmp_path: Path) -> None:
    """The shipped demo recipe, with Debian's kernel fetched by `make`."""
    kernel = REPO / "build" / "debian" / "vmlinuz"
    assert kernel.is_file(), "run `make setup` first: it fetches Debian's kernel"
    recipe = load_recipe(REPO / "recipes" / "demo.toml")
    image = build_factory_image(recipe, tmp_path / "out", tmp_path / "work")
    system_a = image.plan.by_role(Role.SYSTEM_A)
    assert system_a is not None
    raw = extract(image.path, system_a.offset, system_a.size, tmp_path / "a.img")
    kernel_out = tmp_path / "vmlinuz"
    sh("debugfs", "-R", f"dump /boot/vmlinuz {kernel_out}", raw)
    assert kernel_out.read_bytes() == kernel.read_bytes()
    assert sh("debugfs", "-R", "stat /sbin/init", raw).count("Type: symlink") == 1


def test_recovery_image_fills_the_recovery_partition(
    built: tuple[Product, FactoryImage], tmp_path: Path
) -> None:
    product, _image = built
    recipe = load_recipe(product.recipe)
    recovery = plan_layout(recipe.layout).by_role(Role.RECOVERY)
    assert recovery is not None
    payload = tmp_path / "recovery.img"
    payload.write_bytes(bytes(range(256)) * (recovery.size // 256 // 2))
    result = build_factory_image(
        recipe, tmp_path / "out", tmp_path / "work", recovery_image=payload
    )
    with result.path.open("rb") as handle:
        handle.seek(recovery.offset)
        assert handle.read(payload.stat().st_size) == payload.read_bytes()
    # The bmap describes the final image, recovery partition included.
    target = tmp_path / "flashed.img"
    subprocess.run(
        ["bmaptool", "copy", "--bmap", str(result.bmap), str(result.path), str(target)],
        check=True,
        capture_output=True,
    )
    assert file_sha256(target) == file_sha256(result.path)
