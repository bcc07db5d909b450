"""The recipe's [boot] table: each method's image holds its whole boot chain (or only the boot
state, for "external"), and every missing input is an error naming the recipe key.

The fast tests use the suite's small product (a fake kernel) and a fake arm64 Image; the
ones that build a real U-Boot or GRUB arm64 image need Debian's arm64 kernel and sysroot
(build/debian-arm64, `make setup`). The arm64 device booted in QEMU: tests/test_device_arm64.py.
"""

from __future__ import annotations

import gzip
import random
import shlex
import struct
import subprocess
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from conftest import REPO, Product, avobuild_cli, file_sha256

from avobuild.applier.render import UBOOT_STATE_NAMES, render_applier
from avobuild.binaries.elfdeps import resolve_in_root, shared_libraries
from avobuild.binaries.kmod import kernel_release
from avobuild.boot.grubenv import parse_grubenv
from avobuild.boot.state import BootState, factory_state
from avobuild.boot.uboot import read_uboot_env
from avobuild.errors import RecipeError
from avobuild.fs import list_vfat_tree, read_vfat_file
from avobuild.fs.cpio import read_newc
from avobuild.model.applier import Bootloader
from avobuild.model.boot import BootMethod, UbootEnv
from avobuild.model.layout import Role
from avobuild.model.recipe import load_recipe
from avobuild.model.serialize import from_jsonable, to_jsonable

ARM64 = REPO / "build" / "debian-arm64"
SYSROOT = ARM64 / "sysroot"
EXTERNAL = '[boot]\nmethod = "external"\n'
needs_arm64 = pytest.mark.skipif(
    not (ARM64 / "modules" / ".complete").exists() or not (SYSROOT / ".complete").exists(),
    reason="build/debian-arm64 missing: make setup (scripts/fetch-kernel, scripts/fetch-sysroot)",
)


def with_boot(product: Product, boot: str, extra: str = "") -> Path:
    """The product's recipe with its [boot] table replaced by `boot` and `extra` appended."""
    text = product.recipe.read_text()
    assert EXTERNAL in text
    product.recipe.write_text(text.replace(EXTERNAL, boot) + extra)
    return product.recipe


def fake_arm64_image(path: Path, release: str, seed: int = 7) -> Path:
    """Seeded bytes shaped like an arm64 Image: magic at 0x38 and the version banner."""
    data = bytearray(random.Random(seed).randbytes(300_000))
    data[0x38:0x3C] = b"ARM\x64"
    banner = f"Linux version {release} (builder@example) #1 SMP\n".encode()
    data[200_000 : 200_000 + len(banner)] = banner
    path.write_bytes(bytes(data))
    return path


BUSYBOX_FILE = '[[rootfs.file]]\nsource = "/bin/busybox"\ndest = "/bin/busybox"\nmode = "0755"\n'


def arm64_product(product: Product, boot: str) -> Path:
    """The product as an aarch64 device with a fake arm64 kernel (and no x86 busybox)."""
    fake_arm64_image(product.kernel, "6.1.0-fake-arm64")
    text = product.recipe.read_text()
    assert BUSYBOX_FILE in text
    text = text.replace('architecture = "x86_64"', 'architecture = "aarch64"')
    text = text.replace('compatible = "testprod-x86_64"', 'compatible = "testprod-aarch64"')
    product.recipe.write_text(text.replace(BUSYBOX_FILE, ""))
    return with_boot(product, boot)


def boot_offset(image: Path) -> int:
    from test_device_boot import partition_span

    return partition_span(image, "boot")[0]


# --- the model: method and [applier] bootloader, derived or checked ---------------------------


def test_method_and_bootloader_derive_from_each_other(product: Product) -> None:
    demo = load_recipe(REPO / "recipes" / "demo.toml")
    assert (demo.boot.method, demo.applier.bootloader) == (BootMethod.GRUB_EFI, Bootloader.GRUB)
    assert load_recipe(product.recipe).boot.method is BootMethod.EXTERNAL
    recipe = load_recipe(with_boot(product, EXTERNAL, '\n[applier]\nbootloader = "u-boot"\n'))
    assert (recipe.boot.method, recipe.applier.bootloader) == (
        BootMethod.EXTERNAL,
        Bootloader.UBOOT,
    )
    # the U-Boot state is the file on the boot partition: fw_env.config points there
    assert recipe.boot.uboot_env is UbootEnv.FILE
    assert (recipe.applier.uboot_env_device, recipe.applier.uboot_env_offset) == (
        "/boot/efi/uboot.env",
        0,
    )
    assert from_jsonable(type(recipe), to_jsonable(recipe)) == recipe


def test_native_uboot_env_is_implied_by_the_applier_keys(product: Product) -> None:
    recipe = load_recipe(
        with_boot(
            product, EXTERNAL, '\n[applier]\nbootloader = "u-boot"\nuboot-env-offset = 4096\n'
        )
    )
    assert recipe.boot.uboot_env is UbootEnv.NATIVE
    assert (recipe.applier.uboot_env_device, recipe.applier.uboot_env_offset) == (
        "/dev/mmcblk0",
        4096,
    )


@pytest.mark.parametrize(
    ("boot", "extra", "expected"),
    [
        (
            '[boot]\nmethod = "grub-efi"\n',
            '\n[applier]\nbootloader = "u-boot"\n',
            '[boot] method: expected a method that uses the [applier] bootloader = "u-boot" '
            'boot state (method = "u-boot" or "external"), or [applier] bootloader = "grub", '
            "got 'grub-efi'",
        ),
        ('[boot]\nmethod = "lilo"\n', "", '[boot] method: expected "grub-efi", "u-boot" or'),
        (
            '[boot]\nmethod = "u-boot"\n',
            "",
            "[boot] method: expected a boot method for x86_64 (u-boot boots aarch64, arm, "
            'riscv64), or "external"',
        ),
        (
            '[boot]\nmethod = "external"\nloader = "firmware"\n',
            "",
            '[boot] loader: expected no loader with method = "external" (it is for u-boot)',
        ),
        (
            '[boot]\nmethod = "external"\nuboot-env = "file"\n',
            '\n[applier]\nbootloader = "u-boot"\nuboot-env-redundant = true\n',
            "[applier] uboot-env-redundant: expected no uboot-env-redundant: the boot state is "
            "the file /uboot.env",
        ),
        (
            '[boot]\nmethod = "external"\n\n[[boot.file]]\nsource = "vmlinuz"\ndest = "/a"\n'
            '\n[[boot.file]]\nsource = "vmlinuz"\ndest = "/A"\n',
            "",
            "[boot] file: expected each dest once (FAT names ignore case), got '/a'",
        ),
        (
            '[boot]\nmethod = "external"\n\n[[boot.file]]\nsource = "missing.bin"\ndest = "/a"\n',
            "",
            "[boot.file#1] source: expected an existing file",
        ),
    ],
)
def test_boot_table_errors_name_file_and_key(
    product: Product, boot: str, extra: str, expected: str
) -> None:
    recipe = with_boot(product, boot, extra)
    with pytest.raises(RecipeError) as error:
        load_recipe(recipe)
    assert str(error.value).startswith(f"{recipe}: ")
    assert expected in str(error.value)


def test_grub_efi_without_kernel_is_refused(product: Product) -> None:
    text = product.recipe.read_text().replace('[kernel]\nfile = "vmlinuz"\n', "")
    product.recipe.write_text(text)
    recipe = with_boot(product, '[boot]\nmethod = "grub-efi"\n')
    with pytest.raises(RecipeError, match=r"\[boot\] method: expected a \[kernel\] file"):
        load_recipe(recipe)


def test_uboot_needs_ext4_slots_and_named_loader_files(product: Product) -> None:
    recipe = arm64_product(product, '[boot]\nmethod = "u-boot"\nloader = "boot-partition"\n')
    with pytest.raises(RecipeError) as error:
        load_recipe(recipe)
    assert "[boot] loader: expected a [boot] tree or [[boot.file]] entries" in str(error.value)
    layout = product.layout.read_text()
    system = layout.index("[partition.system-a]")
    product.layout.write_text(
        layout[:system]
        + layout[system:].replace('filesystem = "ext4"', 'filesystem = "squashfs"', 1)
    )
    with_boot_text = recipe.read_text().replace('loader = "boot-partition"\n', "")
    recipe.write_text(with_boot_text)
    with pytest.raises(RecipeError, match=r"\[boot\] method: expected ext4 system slots"):
        load_recipe(recipe)


@pytest.mark.parametrize("filesystem", ["squashfs", "erofs"])
def test_grub_efi_needs_ext4_slots(product: Product, filesystem: str) -> None:
    """GRUB loads the kernel from the slot; Debian 12's GRUB 2.06 reads neither erofs nor
    zstd squashfs, so such a recipe is refused instead of building a disk that cannot boot.
    The oracle for GRUB's side: its squash4 module depends on no zstd module (moddep.lst)."""
    moddep = Path("/usr/lib/grub/x86_64-efi/moddep.lst").read_text().splitlines()
    squash4 = next(line for line in moddep if line.startswith("squash4:"))
    assert "zstd" not in squash4.split()
    assert not Path("/usr/lib/grub/x86_64-efi/erofs.mod").exists()
    layout = product.layout.read_text()
    system = layout.index("[partition.system-a]")
    product.layout.write_text(
        layout[:system]
        + layout[system:].replace('filesystem = "ext4"', f'filesystem = "{filesystem}"', 2)
    )
    recipe = with_boot(product, '[boot]\nmethod = "grub-efi"\n')
    with pytest.raises(RecipeError) as error:
        load_recipe(recipe)
    message = str(error.value)
    assert "[boot] method: expected ext4 system slots: GRUB" in message, message
    assert f"is {filesystem}" in message and 'method = "external"' in message, message
    product.recipe.write_text(
        product.recipe.read_text().replace('method = "grub-efi"', 'method = "external"')
    )
    assert load_recipe(product.recipe).layout.by_role(Role.SYSTEM_A).filesystem.value == filesystem


# --- the build: a complete chain, or an error naming the key ----------------------------------


def test_grub_efi_with_an_unknown_kernel_fails_naming_the_key(
    product: Product, tmp_path: Path
) -> None:
    """The issue's first finding: a recipe with a kernel of one's own used to get an ESP
    holding only grubenv, and no error."""
    data = bytearray(product.kernel.read_bytes())
    data[0x20E:0x210] = bytes(2)  # no kernel_version string in the boot header
    product.kernel.write_bytes(bytes(data))
    recipe = with_boot(product, '[boot]\nmethod = "grub-efi"\n')
    result = avobuild_cli("image", recipe, "-o", tmp_path / "out", check=False)
    assert result.returncode == RecipeError.exit_code, result.stderr
    message = " ".join(result.stderr.split())
    assert (
        f"{recipe}: [kernel] file: {product.kernel.resolve()}: cannot tell its release" in message
    )
    assert '[boot] method = "external"' in message
    assert not list((tmp_path / "out").glob("*.img"))


def test_grub_efi_names_missing_release_tree(product: Product, tmp_path: Path) -> None:
    fake_release = "6.1.0-fake-amd64"
    data = bytearray(product.kernel.read_bytes())
    data[0x20E:0x210] = (0x1000).to_bytes(2, "little")  # kernel_version at 0x200 + 0x1000
    data[0x1200 : 0x1200 + len(fake_release) + 1] = fake_release.encode() + b" "
    product.kernel.write_bytes(bytes(data))
    assert kernel_release(product.kernel) == fake_release
    (product.root / "modules").mkdir()
    recipe = with_boot(product, '[boot]\nmethod = "grub-efi"\n')
    result = avobuild_cli("image", recipe, "-o", tmp_path / "out", check=False)
    assert result.returncode == RecipeError.exit_code, result.stderr
    assert "[kernel] modules" in result.stderr and "no module tree for Linux " in result.stderr
    assert f"expected {product.root / 'modules' / fake_release}" in result.stderr.replace("\n", "")


def test_foreign_device_without_sysroot_names_the_key(product: Product, tmp_path: Path) -> None:
    recipe = arm64_product(product, '[boot]\nmethod = "u-boot"\n')
    recipe.write_text(
        recipe.read_text()
        + '\n[applier]\ntarget-tools = ["busybox", "openssl", "zstd", "fw_printenv", "fw_setenv"]\n'
    )
    result = avobuild_cli("image", recipe, "-o", tmp_path / "out", check=False)
    assert result.returncode == RecipeError.exit_code, result.stderr
    message = result.stderr.replace("\n", " ")
    assert f"{recipe}: [target] sysroot: missing; the device is aarch64" in message
    assert "scripts/fetch-sysroot" in message


def test_external_image_holds_only_the_boot_state(product: Product, tmp_path: Path) -> None:
    out = tmp_path / "out"
    avobuild_cli("image", product.recipe, "-o", out)
    image = next(out.glob("*.img"))
    offset = boot_offset(image)
    assert sorted(list_vfat_tree(image, offset)) == [
        "avobuild", "avobuild/disk.toml", "avobuild/grubenv",
    ]  # fmt: skip
    grubenv = parse_grubenv(read_vfat_file(image, offset, "avobuild/grubenv"), "grubenv")
    assert BootState.from_variables(grubenv, "grubenv") == factory_state("1.0.0", "testprod-x86_64")


def test_external_uboot_state_and_boot_files(product: Product, tmp_path: Path) -> None:
    (tmp_path / "config.txt").write_text("kernel=u-boot.bin\n")
    recipe = with_boot(
        product,
        EXTERNAL + f'\n[[boot.file]]\nsource = "{tmp_path / "config.txt"}"\ndest = "/config.txt"\n',
        '\n[applier]\nbootloader = "u-boot"\n'
        'target-tools = ["busybox", "openssl", "zstd", "fw_printenv", "fw_setenv"]\n',
    )
    out = tmp_path / "out"
    avobuild_cli("image", recipe, "-o", out)
    image = next(out.glob("*.img"))
    offset = boot_offset(image)
    assert sorted(list_vfat_tree(image, offset)) == [
        "avobuild", "avobuild/disk.toml", "config.txt", "uboot.env",
    ]  # fmt: skip
    assert read_vfat_file(image, offset, "config.txt") == b"kernel=u-boot.bin\n"
    env = read_vfat_file(image, offset, "uboot.env")
    assert len(env) == 0x4000
    copy = tmp_path / "uboot.env"
    copy.write_bytes(env)
    (tmp_path / "fw_env.config").write_text(f"{copy} 0x0 0x4000\n")
    printed = subprocess.run(
        ["fw_printenv", "-c", str(tmp_path / "fw_env.config")],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    variables = dict(line.split("=", 1) for line in printed.splitlines())
    assert variables == read_uboot_env(env)
    assert BootState.from_variables(variables, "uboot.env") == factory_state(
        "1.0.0", "testprod-x86_64"
    )


def test_missing_versions_read_as_empty() -> None:
    """U-Boot drops empty variables when it rewrites its environment (avo_B_version=)."""
    variables = factory_state("1.0.0", "c").to_variables()
    assert variables.pop("avo_B_version") == ""
    assert BootState.from_variables(variables, "uboot.env") == factory_state("1.0.0", "c")


# --- the U-Boot boot script ------------------------------------------------------------------


@needs_arm64
def test_uboot_script_fits_uboot_limits(tmp_path: Path) -> None:
    recipe = load_recipe(REPO / "recipes" / "demo-arm64.toml")
    render_applier(recipe, tmp_path)
    script = (tmp_path / "boot/efi/boot.cmd").read_text()
    keywords = {"if", "elif", "then", "else", "fi"}
    for line in script.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        assert len(line) < 512, f"longer than CONFIG_SYS_CBSIZE: {line}"
        for command in line.split(";"):
            words = shlex.split(command)
            while words and words[0] in keywords:
                words.pop(0)
            assert len(words) <= 16, f"more than CONFIG_SYS_MAXARGS=16 arguments: {command}"
    names = " ".join(UBOOT_STATE_NAMES)
    assert f"env import -c ${{kernel_addr_r}} ${{filesize}} {names}; then\n" in script
    assert f"env export -cs 0x4000 ${{kernel_addr_r}} {names}\n" in script
    assert (
        "fatwrite ${devtype} ${devnum}:${distro_bootpart} ${kernel_addr_r} uboot.env 0x4000"
        in script
    )
    assert "    if saveenv; then" not in script
    assert "console=ttyAMA0 root=PARTUUID=" in script and "booti ${kernel_addr_r}" in script
    listing = subprocess.run(
        ["dumpimage", "-l", str(tmp_path / "boot/efi/boot.scr")],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "AArch64 Linux Script" in listing


# --- the real arm64 chain, built -------------------------------------------------------------


@needs_arm64
def test_arm64_kernel_release_from_image_and_gzip(tmp_path: Path) -> None:
    kernel = ARM64 / "vmlinuz"
    release = kernel_release(kernel)
    assert release is not None and (ARM64 / "modules" / release / "kernel").is_dir()
    packed = tmp_path / "Image.gz"
    packed.write_bytes(gzip.compress(kernel.read_bytes(), compresslevel=1))
    assert kernel_release(packed) == release
    assert kernel_release(fake_arm64_image(tmp_path / "fake", "6.9.0-x")) == "6.9.0-x"


@needs_arm64
def test_sysroot_libraries_resolve_inside_the_sysroot(tmp_path: Path) -> None:
    sysroot = SYSROOT.resolve()
    for tool in ("usr/bin/openssl", "usr/bin/zstd", "usr/bin/fw_setenv"):
        found = shared_libraries(sysroot / tool, sysroot)
        assert found, tool
        for target, source in found.items():
            assert source.is_relative_to(sysroot), (target, source)
            assert source.read_bytes()[:4] == b"\x7fELF"
            assert struct.unpack_from("<H", source.read_bytes(), 18)[0] == 183  # EM_AARCH64
    # an absolute symlink in a sysroot starts at the sysroot, never at the host's /
    fake = tmp_path / "root"
    (fake / "lib" / "real").mkdir(parents=True)
    (fake / "lib" / "real" / "libx.so.1").write_bytes(b"target")
    (fake / "lib" / "libx.so.1").symlink_to("/lib/real/libx.so.1")
    assert resolve_in_root(fake, "/lib/libx.so.1") == fake / "lib/real/libx.so.1"


def arm64_demo_variant(tmp_path: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """demo-arm64.toml on the small layout of tests/test_device_arm64.py, edited by `edit`."""
    from test_device_arm64 import small_layout
    from test_device_lifecycle import demo_variant

    base = REPO / "recipes" / "demo-arm64.toml"
    recipe = demo_variant(tmp_path, "1.0.0", base=base, layout=small_layout(tmp_path))
    values = tomllib.loads(recipe.read_text())
    edit(values)
    recipe.write_text(tomli_w.dumps(values))
    return recipe


@needs_arm64
def test_arm64_uboot_image_carries_the_whole_chain(tmp_path: Path) -> None:
    recipe_path = arm64_demo_variant(tmp_path, lambda values: None)
    recipe = load_recipe(recipe_path)
    out = tmp_path / "out"
    avobuild_cli("image", recipe_path, "-o", out)
    image = out / "avobuild-demo-arm64-1.0.0.img"
    offset = boot_offset(image)
    assert sorted(list_vfat_tree(image, offset)) == [
        "avobuild", "avobuild/disk.toml", "boot.scr", "uboot.env",
    ]  # fmt: skip
    rendered = tmp_path / "applier"
    render_applier(recipe, rendered)
    assert (
        read_vfat_file(image, offset, "boot.scr") == (rendered / "boot/efi/boot.scr").read_bytes()
    )
    env = read_uboot_env(read_vfat_file(image, offset, "uboot.env"))
    assert BootState.from_variables(env, "uboot.env") == factory_state(
        "1.0.0", "avobuild-demo-aarch64"
    )
    from test_device_boot import _slot_file

    assert (
        _slot_file(image, "system-a", "/etc/fw_env.config", tmp_path).decode().splitlines()[-1]
        == "/boot/efi/uboot.env 0x0 0x4000"
    )
    for tool in ("/usr/bin/openssl", "/usr/bin/zstd", "/usr/bin/fw_setenv", "/bin/busybox"):
        binary = _slot_file(image, "system-a", tool, tmp_path)
        assert struct.unpack_from("<H", binary, 18)[0] == 183, tool  # EM_AARCH64
    libc = _slot_file(image, "system-a", "/lib/aarch64-linux-gnu/libc.so.6", tmp_path)
    assert libc == (SYSROOT / "lib/aarch64-linux-gnu/libc.so.6").read_bytes()
    initrd = _slot_file(image, "system-a", "/boot/initrd.img", tmp_path)
    members = {m.name: m for m in read_newc(gzip.decompress(initrd))}
    assert members["bin/busybox"].data == (SYSROOT / "bin/busybox").read_bytes()
    order = members["lib/modules/load-order"].data.decode().split()
    assert any(path.endswith("/virtio_blk.ko") for path in order)
    for path in order:
        module = members[f"lib/modules/{path}"].data
        assert struct.unpack_from("<H", module, 18)[0] == 183, path
    # reproducible: the same recipe gives the same bytes
    again = tmp_path / "again"
    avobuild_cli("image", recipe_path, "-o", again)
    assert file_sha256(again / image.name) == file_sha256(image)


@needs_arm64
def test_arm64_grub_efi_image(tmp_path: Path) -> None:
    def grub_efi(values: dict[str, Any]) -> None:
        values["boot"] = {"method": "grub-efi", "console": "ttyAMA0"}
        values["applier"]["target-tools"] = ["busybox", "openssl", "zstd"]

    recipe = arm64_demo_variant(tmp_path, grub_efi)
    assert load_recipe(recipe).applier.bootloader is Bootloader.GRUB
    out = tmp_path / "out"
    avobuild_cli("image", recipe, "-o", out)
    image = out / "avobuild-demo-arm64-1.0.0.img"
    offset = boot_offset(image)
    files = sorted(list_vfat_tree(image, offset))
    assert "EFI/BOOT/BOOTAA64.EFI" in files and "EFI/BOOT/grub.cfg" in files
    assert "avobuild/grubenv" in files and "uboot.env" not in files
    efi = read_vfat_file(image, offset, "EFI/BOOT/BOOTAA64.EFI")
    pe = struct.unpack_from("<I", efi, 0x3C)[0]
    assert efi[:2] == b"MZ" and efi[pe : pe + 4] == b"PE\0\0"
    assert struct.unpack_from("<H", efi, pe + 4)[0] == 0xAA64  # IMAGE_FILE_MACHINE_ARM64
    grub_cfg = read_vfat_file(image, offset, "EFI/BOOT/grub.cfg").decode()
    assert "console=ttyAMA0" in grub_cfg


def test_host_install_rewrites_the_uboot_state_file(product: Product, tmp_path: Path) -> None:
    """`avobuild install --disk` and `status` on a U-Boot image: /uboot.env, read back by
    the host's fw_printenv, holds the installed slot as pending."""
    recipe = with_boot(
        product,
        EXTERNAL,
        '\n[applier]\nbootloader = "u-boot"\n'
        'target-tools = ["busybox", "openssl", "zstd", "fw_printenv", "fw_setenv"]\n',
    )
    out = tmp_path / "out"
    avobuild_cli("image", recipe, "-o", out)
    disk = next(out.glob("*.img"))
    bundle = tmp_path / "update.avb"
    avobuild_cli("bundle", "create", recipe, "-o", bundle)
    avobuild_cli("install", bundle, "--disk", disk, "--keyring", product.public_key)
    env = read_vfat_file(disk, boot_offset(disk), "uboot.env")
    assert len(env) == 0x4000
    copy = tmp_path / "uboot.env"
    copy.write_bytes(env)
    (tmp_path / "fw_env.config").write_text(f"{copy} 0x0 0x4000\n")
    printed = subprocess.run(
        ["fw_printenv", "-c", str(tmp_path / "fw_env.config")],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    variables = dict(line.split("=", 1) for line in printed.splitlines())
    assert (variables["avo_primary"], variables["avo_B_ok"], variables["avo_B_tries"]) == (
        "B",
        "0",
        "3",
    )
    assert variables["avo_B_version"] == "1.0.0" and variables["avo_A_ok"] == "1"
    status = avobuild_cli("status", "--disk", disk, "--json").stdout
    assert '"primary": "B"' in status or '"primary":"B"' in status, status
