"""The recipe's `[boot]` table: how the device boots, declared (docs/recipes.md, "[boot]").

`method` names the boot chain the factory image must contain:

  grub-efi   GRUB as the removable-media EFI binary on the ESP (x86_64, arm64), its grub.cfg
             and the slot initramfs; the boot state is /avobuild/grubenv on the ESP
  u-boot     a U-Boot boot script (/boot.scr) on the FAT boot partition and the slot
             initramfs; the boot state is a U-Boot environment: the file /uboot.env beside
             the script (`uboot-env = "file"`) or U-Boot's own saved environment ("native")
  external   the user's own boot loader: avobuild writes only the boot state (the format
             [applier] bootloader names) and documents what the boot loader must do
             (docs/applier.md, "External boot loaders")

The method and `[applier] bootloader` (the boot state format the on-target applier reads
and writes) are derived from each other when only one is given, and must agree when both
are. Nothing here looks inside the kernel: the module tree is checked by the build
(avobuild/device/boot.py), which raises RecipeError naming the recipe key.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, replace
from pathlib import Path

from avobuild.model.applier import ApplierConfig, Bootloader
from avobuild.model.layout import FsType, Layout, Role
from avobuild.model.tomlcheck import Table

_BOOT_PATH = re.compile(r"/[A-Za-z0-9._+@-]+(/[A-Za-z0-9._+@-]+)*")
# Serial consoles of the common boards: ttyS0 (PC, sunxi, Rockchip), ttyAMA0 (PL011: QEMU
# virt, Raspberry Pi), ttymxc0 (i.MX), ttySAC2 (Exynos), ttyMSM0, ttyLP0, hvc0 ...
_CONSOLE = re.compile(r"[a-zA-Z]{2,12}[0-9]{1,2}(,[0-9]{4,7}(n8)?)?")
_CMDLINE = re.compile(r"[A-Za-z0-9._,:=/@+-]+( [A-Za-z0-9._,:=/@+-]+)*|")
UBOOT_ENV_FILE = "uboot.env"
UBOOT_SCRIPT_FILE = "boot.scr"


class BootMethod(enum.StrEnum):
    GRUB_EFI = "grub-efi"
    UBOOT = "u-boot"
    EXTERNAL = "external"


class UbootLoader(enum.StrEnum):
    """Where the board's U-Boot itself comes from."""

    FIRMWARE = "firmware"  # the board's SPI/NOR flash or boot ROM, QEMU's -bios: not in the image
    BOOT_PARTITION = "boot-partition"  # files on the boot partition ([boot] tree, [[boot.file]])


class UbootEnv(enum.StrEnum):
    """Where the U-Boot boot state lives."""

    FILE = "file"  # /uboot.env on the boot partition: env import, env export + fatwrite
    NATIVE = "native"  # U-Boot's own environment (saveenv); [applier] uboot-env-* say where


@dataclass(frozen=True)
class BootFile:
    """A host file written onto the boot partition at `dest` (a FAT path)."""

    source: Path
    dest: str


@dataclass(frozen=True)
class BootConfig:
    method: BootMethod = BootMethod.GRUB_EFI
    tree: Path | None = None  # files for the boot partition
    console: str = "ttyS0,115200"
    cmdline: str = ""
    files: tuple[BootFile, ...] = ()
    loader: UbootLoader = UbootLoader.FIRMWARE
    uboot_env: UbootEnv = UbootEnv.FILE
    # A device tree blob inside the slot (loaded to ${fdt_addr_r}); None: the one U-Boot
    # itself runs with (${fdtcontroladdr}), as on QEMU virt and boards whose firmware has it.
    device_tree: str | None = None

    @property
    def builds_boot_chain(self) -> bool:
        """True when the image gets a boot loader and a slot initramfs from avobuild."""
        return self.method is not BootMethod.EXTERNAL


_METHOD_BOOTLOADER = {BootMethod.GRUB_EFI: Bootloader.GRUB, BootMethod.UBOOT: Bootloader.UBOOT}
_BOOTLOADER_METHOD = {Bootloader.GRUB: BootMethod.GRUB_EFI, Bootloader.UBOOT: BootMethod.UBOOT}
_DEFAULT_CONSOLE = {"x86_64": "ttyS0,115200", "i686": "ttyS0,115200", "riscv64": "ttyS0"}
_NATIVE_ENV_KEYS = ("uboot-env-device", "uboot-env-offset", "uboot-env-redundant")
GRUB_EFI_ARCHITECTURES = ("x86_64", "aarch64")
UBOOT_ARCHITECTURES = ("aarch64", "arm", "riscv64")


def read_boot(
    table: Table | None,
    applier_table: Table | None,
    applier: ApplierConfig,
    *,
    architecture: str,
    layout: Layout,
    has_kernel: bool,
    recipe_path: Path,
) -> tuple[BootConfig, ApplierConfig]:
    """The `[boot]` table and the applier configuration made consistent with it."""
    bootloader_given = applier_table is not None and "bootloader" in applier_table
    method_text = table.optional_string("method") if table is not None else None
    if method_text is None:
        method = _BOOTLOADER_METHOD[applier.bootloader]
    elif method_text not in {m.value for m in BootMethod}:
        assert table is not None
        table.fail("method", '"grub-efi", "u-boot" or "external"', method_text)
    else:
        method = BootMethod(method_text)
    if method is not BootMethod.EXTERNAL:
        implied = _METHOD_BOOTLOADER[method]
        if bootloader_given and applier.bootloader is not implied:
            assert table is not None
            table.fail(
                "method",
                f'a method that uses the [applier] bootloader = "{applier.bootloader.value}" '
                f'boot state (method = "{_BOOTLOADER_METHOD[applier.bootloader].value}" or '
                f'"external"), or [applier] bootloader = "{implied.value}"',
                method.value,
            )
        applier = replace(applier, bootloader=implied)
    config = BootConfig(method=method, console=_DEFAULT_CONSOLE.get(architecture, "ttyAMA0"))
    if table is not None:
        config = _read_keys(table, config, method)
    _check_method(
        config,
        table or Table(recipe_path, "boot", {}),
        architecture=architecture,
        layout=layout,
        has_kernel=has_kernel,
    )
    if applier.bootloader is Bootloader.UBOOT:
        native_keys = [
            key for key in _NATIVE_ENV_KEYS if applier_table is not None and key in applier_table
        ]
        if native_keys and not (table is not None and "uboot-env" in table):
            config = replace(config, uboot_env=UbootEnv.NATIVE)
        if config.uboot_env is UbootEnv.FILE:
            if native_keys:
                assert applier_table is not None
                applier_table.fail(
                    native_keys[0],
                    f"no {native_keys[0]}: the boot state is the file /{UBOOT_ENV_FILE} on the "
                    'boot partition ([boot] uboot-env = "file"); uboot-env-device, -offset and '
                    '-redundant describe U-Boot\'s own environment (uboot-env = "native")',
                )
            applier = replace(
                applier,
                uboot_env_device=f"{applier.esp_mount.rstrip('/')}/{UBOOT_ENV_FILE}",
                uboot_env_offset=0,
                uboot_env_redundant=False,
            )
    return config, applier


def _read_keys(table: Table, config: BootConfig, method: BootMethod) -> BootConfig:
    console = table.string(
        "console",
        default=config.console,
        pattern=_CONSOLE,
        what='a kernel console like "ttyS0,115200" or "ttyAMA0"',
    )
    cmdline = table.string(
        "cmdline",
        default="",
        pattern=_CMDLINE,
        what="kernel parameters separated by single spaces (no quotes)",
    )
    files = tuple(_read_boot_file(entry) for entry in table.array_of_tables("file"))
    dests = [entry.dest.lower() for entry in files]
    if len(set(dests)) != len(dests):
        twice = next(dest for dest in dests if dests.count(dest) > 1)
        table.fail("file", "each dest once (FAT names ignore case)", twice)
    tree = table.path_value("tree", required=False)
    if tree is not None and not tree.is_dir():
        table.fail("tree", "an existing directory", str(tree))
    values: dict[str, object] = {
        "console": console,
        "cmdline": cmdline,
        "files": files,
        "tree": tree,
    }
    if method is BootMethod.UBOOT:
        loader = table.string("loader", default=UbootLoader.FIRMWARE.value)
        if loader not in {choice.value for choice in UbootLoader}:
            table.fail("loader", '"firmware" or "boot-partition"', loader)
        values["loader"] = UbootLoader(loader)
        device_tree = table.optional_string("device-tree", what="a path inside the slot")
        if device_tree is not None and not _BOOT_PATH.fullmatch(device_tree):
            table.fail(
                "device-tree",
                'an absolute path inside the slot like "/boot/board.dtb"',
                device_tree,
            )
        values["device_tree"] = device_tree
    else:
        for key in ("loader", "device-tree"):
            if key in table:
                table.fail(key, f'no {key} with method = "{method.value}" (it is for u-boot)')
    if "uboot-env" in table:
        env = table.string("uboot-env")
        if env not in {choice.value for choice in UbootEnv}:
            table.fail("uboot-env", '"file" or "native"', env)
        values["uboot_env"] = UbootEnv(env)
    table.check_unknown()
    return replace(config, **values)  # type: ignore[arg-type]


def _read_boot_file(table: Table) -> BootFile:
    source = table.path_value("source")
    assert source is not None
    if not source.is_file():
        table.fail("source", "an existing file", str(source))
    dest = table.string("dest", pattern=_BOOT_PATH, what="an absolute path on the boot partition")
    table.check_unknown()
    return BootFile(source, dest)


def _check_method(
    config: BootConfig, table: Table, *, architecture: str, layout: Layout, has_kernel: bool
) -> None:
    """What each method needs from the rest of the recipe and from the layout."""
    method = config.method
    if method is BootMethod.EXTERNAL:
        return
    supported = GRUB_EFI_ARCHITECTURES if method is BootMethod.GRUB_EFI else UBOOT_ARCHITECTURES
    if architecture not in supported:
        table.fail(
            "method",
            f"a boot method for {architecture} ({method.value} boots "
            f'{", ".join(supported)}), or "external"',
            method.value,
        )
    if not has_kernel:
        table.fail(
            "method",
            f'a [kernel] file: method = "{method.value}" boots the kernel of the slot '
            '(without a kernel: method = "external")',
            method.value,
        )
    boot = layout.by_role(Role.BOOT)
    if boot is None or boot.filesystem is not FsType.VFAT:
        found = "none" if boot is None else f"[partition.{boot.label}] is {boot.filesystem}"
        table.fail(
            "method",
            f'a layout with a vfat partition of role "boot": method = "{method.value}" puts '
            f"the boot loader files and the boot state there ({layout.path}: {found})",
            method.value,
        )
    system = layout.by_role(Role.SYSTEM_A)
    assert system is not None
    if system.filesystem is not FsType.EXT4:
        # Both load the kernel from the slot: U-Boot's ext4 support is what boards enable,
        # and Debian 12's GRUB 2.06 has no erofs module and a squash4 module without zstd
        # (avobuild's squashfs images are zstd), so either would build an image that
        # cannot boot.
        loader = (
            "U-Boot"
            if method is BootMethod.UBOOT
            else "GRUB (2.06 reads no erofs and no zstd squashfs)"
        )
        table.fail(
            "method",
            f"ext4 system slots: {loader} loads the kernel and initramfs from the slot "
            f"({layout.path}: [partition.{system.label}] is {system.filesystem}); squashfs "
            'or erofs slots need [boot] method = "external"',
            method.value,
        )
    if (
        method is BootMethod.UBOOT
        and config.loader is UbootLoader.BOOT_PARTITION
        and not (config.files or config.tree)
    ):
        table.fail(
            "loader",
            "a [boot] tree or [[boot.file]] entries with the board's U-Boot files (for "
            'example source = "u-boot.bin", dest = "/u-boot.bin"), as loader = '
            '"boot-partition" says the board loads U-Boot from the boot partition',
            config.loader.value,
        )
