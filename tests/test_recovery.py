"""Recovery system: the newc writer against GNU cpio, ELF dependencies, kernel modules, the
recovery partition image and its installation into a factory image."""

from __future__ import annotations

import gzip
import hashlib
import random
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, Product, avobuild_cli, write_product

from avobuild.binaries.elfdeps import shared_libraries
from avobuild.binaries.kmod import kernel_release, open_module_tree, resolve_modules
from avobuild.disk.gpt import read_gpt
from avobuild.errors import BuildError, InstallError, RecipeError
from avobuild.fs import list_ext4_tree, read_ext4_file
from avobuild.fs.cpio import Initramfs, read_newc
from avobuild.media.recovery import (
    Mode,
    build_initramfs,
    build_recovery_image,
    install_recovery,
    render_recovery_conf,
)
from avobuild.model.recipe import ToolSet, load_recipe

DEBIAN = REPO / "build" / "debian"
KERNEL = DEBIAN / "vmlinuz"
MODULES = DEBIAN / "modules"
needs_modules = pytest.mark.skipif(
    not (MODULES / ".complete").exists(),
    reason="build/debian/modules missing: run scripts/fetch-kernel build/debian (make setup)",
)


def cpio_listing(archive: bytes) -> list[str]:
    """`cpio -itv` of an uncompressed archive (GNU cpio, the independent reader)."""
    result = subprocess.run(
        ["cpio", "-itv", "--quiet"], input=archive, capture_output=True, check=True
    )
    return result.stdout.decode().splitlines()


def listed_name(line: str) -> str:
    """The member name of a `cpio -tv` line (symlinks end in "name -> target")."""
    return line.split(" -> ")[0].split()[-1]


def test_newc_archive_reads_back_with_gnu_cpio(tmp_path: Path) -> None:
    rng = random.Random(6)
    archive = Initramfs()
    contents = {}
    for index in range(30):
        name = f"d{rng.randrange(4)}/sub{rng.randrange(3)}/file{index}"
        data = rng.randbytes(rng.choice([0, 1, 3, 4, 5, 511, 4096, 70_001]))
        contents[name] = data
        archive.file(name, data, rng.choice([0o644, 0o755, 0o600]))
    host = tmp_path / "host.bin"
    host.write_bytes(rng.randbytes(12_345))
    archive.copy("bin/host", host, 0o755)
    archive.symlink("bin/sh", "/bin/busybox")
    archive.char_device("dev/console", 5, 1)
    raw = tmp_path / "archive.cpio"
    with raw.open("wb") as handle:
        archive.write(handle)

    listing = cpio_listing(raw.read_bytes())
    names = [listed_name(line) for line in listing]
    assert names == sorted(names)
    assert set(names) >= set(contents) | {"bin/host", "bin/sh", "dev/console", "d0"}
    console = next(line for line in listing if line.endswith("dev/console"))
    assert console.startswith("crw-------") and "5,   1" in console
    assert any(line.endswith("bin/sh -> /bin/busybox") for line in listing)
    assert all(" root     root " in line for line in listing)

    extract = tmp_path / "extract"
    extract.mkdir()
    # Not checked: as non-root cpio cannot make dev/console; the files are compared below.
    subprocess.run(
        ["cpio", "-id", "--quiet", "--no-absolute-filenames"],
        input=raw.read_bytes(),
        cwd=extract,
        capture_output=True,
        check=False,
    )
    for name, data in contents.items():
        assert (extract / name).read_bytes() == data
    assert (extract / "bin" / "host").read_bytes() == host.read_bytes()

    members = {member.name: member for member in read_newc(raw.read_bytes())}
    assert [m.inode for m in members.values()] == list(range(1, len(members) + 1))
    assert {m.mtime for m in members.values()} == {1767225600}
    assert stat.S_ISCHR(members["dev/console"].mode) and members["dev/console"].rdev == (5, 1)


def test_initramfs_paths_are_checked() -> None:
    archive = Initramfs()
    archive.file("etc/x", b"")
    with pytest.raises(BuildError, match="not a directory"):
        archive.file("etc/x/y", b"")
    for bad in ("", "/", "a/../b", "a//b"):
        with pytest.raises(BuildError, match="not a valid path"):
            archive.file(bad, b"")


def test_shared_libraries_match_ldd() -> None:
    for binary in (Path("/usr/sbin/mke2fs"), Path("/usr/bin/openssl")):
        found = shared_libraries(binary)
        ldd = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True)
        expected = {
            line.split()[0]
            for line in ldd.stdout.splitlines()
            if "=>" in line and "linux-vdso" not in line
        }
        assert {Path(path).name for path in found} >= expected
        assert "/lib64/ld-linux-x86-64.so.2" in found
    assert shared_libraries(Path("/bin/busybox")) == {}  # busybox-static


@needs_modules
def test_module_dependencies_come_before_their_users() -> None:
    tree = open_module_tree(MODULES, KERNEL)
    assert tree.version == kernel_release(KERNEL)
    order = [path.name for path in resolve_modules(tree, ["ext4", "virtio_blk", "usb_storage"])]
    assert order.index("jbd2.ko") < order.index("ext4.ko")
    assert order.index("mbcache.ko") < order.index("ext4.ko")
    assert order.index("usbcore.ko") < order.index("usb-storage.ko")
    assert order.index("virtio_ring.ko") < order.index("virtio_blk.ko")
    with pytest.raises(BuildError, match="no_such_module"):
        resolve_modules(tree, ["no_such_module"])


def test_initramfs_holds_busybox_tools_and_menu(product: Product, tmp_path: Path) -> None:
    recipe = load_recipe(product.recipe)
    output = tmp_path / "initrd.img"
    system = build_initramfs(
        recipe, output, mode=Mode.USB, tools=[ToolSet.STORAGE, ToolSet.NETWORK]
    )
    raw = gzip.decompress(output.read_bytes())
    listing = cpio_listing(raw)
    names = {listed_name(line) for line in listing}
    for required in (
        "init",
        "bin/busybox",
        "bin/sh",
        "sbin/init",
        "usr/sbin/avocado-recovery",
        "usr/sbin/e2fsck",
        "usr/sbin/sfdisk",
        "usr/bin/openssl",
        "lib64/ld-linux-x86-64.so.2",
        "lib/x86_64-linux-gnu/libcrypto.so.3",
        "lib/x86_64-linux-gnu/libfdisk.so.1",
        "etc/inittab",
        "etc/avobuild/recovery.conf",
        "dev/console",
    ):
        assert required in names, required
    assert "usr/sbin/smartctl" not in names  # diagnostics not chosen
    members = {member.name: member for member in read_newc(raw)}
    inittab = members["etc/inittab"].data.decode()
    assert "ttyS0::respawn:/usr/sbin/avocado-recovery menu" in inittab
    conf = members["etc/avobuild/recovery.conf"].data.decode()
    assert "AVO_MODE='usb'" in conf and "AVO_LABEL_SYSTEM_A='system-a'" in conf
    menu = members["usr/sbin/avocado-recovery"].data.decode()
    for item in ("1. Restore factory image", "2. Repair boot partition", "3. Reset configuration"):
        assert item in menu
    assert system.cmdline == "console=tty0 console=ttyS0,115200 quiet avo.mode=usb"
    # the menu and init are valid POSIX shell for busybox
    for script in ("init", "usr/sbin/avocado-recovery"):
        check = subprocess.run(
            ["busybox", "sh", "-n"], input=members[script].data, capture_output=True
        )
        assert check.returncode == 0, check.stderr

    again = tmp_path / "again.img"
    build_initramfs(recipe, again, mode=Mode.USB, tools=[ToolSet.STORAGE, ToolSet.NETWORK])
    assert again.read_bytes() == output.read_bytes()


def sourced(script: str, names: list[str]) -> dict[str, str]:
    """The values of shell variables `names` after busybox sh sources `script`."""
    program = script + "".join(f'printf "%s\\n" "${name}"\n' for name in names)
    result = subprocess.run(
        ["busybox", "sh", "-c", program], capture_output=True, text=True, check=True
    )
    return dict(zip(names, result.stdout.splitlines(), strict=True))


def test_recovery_conf_geometry(product: Product) -> None:
    recipe = load_recipe(product.recipe)
    names = ["AVO_BLOCK_SIZE", "AVO_BOOT_OFFSET_BLOCKS", "AVO_BOOT_SIZE_BLOCKS", "AVO_MODE"]
    values = sourced(render_recovery_conf(recipe, Mode.PARTITION), names)
    assert values["AVO_MODE"] == "partition"
    block = int(values["AVO_BLOCK_SIZE"])
    assert block == 1 << 20
    assert int(values["AVO_BOOT_OFFSET_BLOCKS"]) * block == 1 << 20
    assert int(values["AVO_BOOT_SIZE_BLOCKS"]) * block == 34 << 20


def test_recipe_recovery_table_is_validated(tmp_path: Path) -> None:
    product = write_product(tmp_path / "p")
    text = product.recipe.read_text()
    product.recipe.write_text(text + '\n[recovery]\ntools = ["network", "gpu"]\n')
    with pytest.raises(RecipeError, match=r"\[recovery\] tools: expected tool sets"):
        load_recipe(product.recipe)
    product.recipe.write_text(text + '\n[recovery]\nconsole = "COM1"\n')
    with pytest.raises(RecipeError, match=r"\[recovery\] console"):
        load_recipe(product.recipe)
    product.recipe.write_text(text + '\n[recovery]\ntool = ["network"]\n')
    with pytest.raises(RecipeError, match="unknown key"):
        load_recipe(product.recipe)
    product.recipe.write_text(
        text + '\n[recovery]\ntools = ["diagnostics"]\ncmdline = "quiet loglevel=3"\n'
    )
    recovery = load_recipe(product.recipe).recovery
    assert recovery.tools == (ToolSet.DIAGNOSTICS,)
    assert recovery.cmdline == "quiet loglevel=3"


def test_recovery_image_installs_into_factory_image(product: Product, tmp_path: Path) -> None:
    out = tmp_path / "out"
    avobuild_cli("image", product.recipe, "-o", out)
    disk = next(out.glob("*.img"))
    image = tmp_path / "recovery.img"
    avobuild_cli("recovery", "build", product.recipe, "-o", image, "--tools", "storage")

    # recovery.img: ext4 sized to the partition, fsck-clean, holding kernel, initrd, GRUB entry
    assert image.stat().st_size == 8 << 20
    subprocess.run(["e2fsck", "-fn", str(image)], check=True, capture_output=True)
    tree = list_ext4_tree(image)
    assert {"boot/vmlinuz", "boot/initrd.img", "boot/grub/recovery.cfg"} <= set(tree)
    assert read_ext4_file(image, "boot/vmlinuz") == product.kernel.read_bytes()
    entry = read_ext4_file(image, "boot/grub/recovery.cfg").decode()
    assert "search --no-floppy --label --set=root recovery" in entry
    assert "avo.mode=partition" in entry

    again = tmp_path / "again.img"
    avobuild_cli("recovery", "build", product.recipe, "-o", again, "--tools", "storage")
    assert (
        hashlib.sha256(again.read_bytes()).digest() == hashlib.sha256(image.read_bytes()).digest()
    )

    before = disk.read_bytes()
    result = avobuild_cli("recovery", "install", image, "--disk", disk)
    assert "partition recovery" in result.stdout
    with disk.open("rb") as handle:
        table = read_gpt(handle)
    part = table.find("recovery")
    assert part is not None
    offset = table.offset(part)
    after = disk.read_bytes()
    assert after[offset : offset + image.stat().st_size] == image.read_bytes()
    assert after[:offset] == before[:offset]  # nothing else touched
    sfdisk = subprocess.run(
        ["sfdisk", "-d", str(disk)], capture_output=True, text=True, check=True
    ).stdout
    assert 'name="recovery"' in sfdisk


def test_recovery_install_refuses_what_does_not_fit(product: Product, tmp_path: Path) -> None:
    out = tmp_path / "out"
    avobuild_cli("image", product.recipe, "-o", out)
    disk = next(out.glob("*.img"))
    before = hashlib.sha256(disk.read_bytes()).hexdigest()
    big = tmp_path / "big.img"
    from avobuild.fs import build_filesystem
    from avobuild.model.layout import FsType

    build_filesystem(FsType.EXT4, None, big, 16 << 20, label="recovery", seed="x")
    with pytest.raises(InstallError, match="does not fit partition recovery"):
        install_recovery(big, disk)
    not_ext4 = tmp_path / "random.img"
    not_ext4.write_bytes(random.Random(3).randbytes(4096))
    with pytest.raises(InstallError, match="not an ext4 image"):
        install_recovery(not_ext4, disk)
    assert hashlib.sha256(disk.read_bytes()).hexdigest() == before
    result = avobuild_cli("recovery", "install", big, "--disk", disk, check=False)
    assert result.returncode == InstallError.exit_code
    assert "does not fit" in result.stderr

    # a partition without room: the build itself says what does not fit
    product.kernel.write_bytes(product.kernel.read_bytes() * 40)  # 8 MB "kernel"
    with pytest.raises(BuildError, match="does not fit the 8M recovery partition"):
        build_recovery_image(load_recipe(product.recipe), tmp_path / "r.img", tmp_path / "w")
