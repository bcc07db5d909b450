"""Make a factory image boot: a device initramfs in each slot, GRUB and its grub.cfg on the ESP.

Enabled for recipes whose applier boots with GRUB and whose kernel has a Debian module tree
beside it (scripts/fetch-kernel writes build/debian/modules next to build/debian/vmlinuz).
`install_slot_boot` adds the rendered applier and /boot/initrd.img to a staged rootfs;
`install_esp_boot` puts /EFI/BOOT/BOOTX64.EFI and the applier's grub.cfg on the ESP image.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from avobuild.applier.render import render_applier
from avobuild.binaries.elfdeps import shared_libraries
from avobuild.binaries.kmod import kernel_release, open_module_tree, resolve_modules
from avobuild.boot.bootfiles import GRUB_COMMON_MODULES, GRUB_DISK_MODULES, build_grub_efi
from avobuild.fs import write_vfat_file
from avobuild.fs.cpio import Initramfs
from avobuild.model.applier import Bootloader
from avobuild.model.layout import Role
from avobuild.model.recipe import Recipe
from avobuild.run import which

INITRD_PATH = "boot/initrd.img"
GRUB_CFG_ESP_PATH = "EFI/BOOT/grub.cfg"
GRUB_EFI_ESP_PATH = "EFI/BOOT/BOOTX64.EFI"
GRUB_DEVICE_MODULES = ("regexp", "loadenv")
# The disks a slot boots from and the filesystems it mounts; Debian builds them as modules.
DEVICE_MODULES = (
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "ahci",
    "sd_mod",
    "nvme",
    "crc32c_generic",  # ext4 checksums; a soft dependency modules.dep does not list
    "ext4",
    "vfat",
    "nls_cp437",
    "nls_iso8859_1",
    "nls_utf8",
    "nls_ascii",
)
TOOL_DIRECTORIES = ("bin", "sbin", "usr/bin", "usr/sbin")
INIT_APPLETS = ("sh", "mount", "umount", "insmod", "sleep", "cat", "mkdir", "switch_root")

_INIT = """#!/bin/sh
# Device initramfs of {name}: load the disk and filesystem modules, mount the slot the
# kernel command line names (avo.slot=A|B, found by GPT partition name), switch_root to it.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r module; do
    insmod "/lib/modules/$module" 2>/dev/null
done < /lib/modules/load-order
slot=A
for word in $(cat /proc/cmdline); do
    case "$word" in avo.slot=*) slot="${{word#avo.slot=}}" ;; esac
done
case "$slot" in B) label={label_b} ;; *) label={label_a} ;; esac
find_partition() {{
    for uevent in /sys/class/block/*/uevent; do
        name= dev=
        while IFS== read -r key value; do
            case "$key" in PARTNAME) name="$value" ;; DEVNAME) dev="$value" ;; esac
        done < "$uevent"
        if [ "$name" = "$1" ]; then echo "/dev/$dev"; return 0; fi
    done
    return 1
}}
tries=0
until device=$(find_partition "$label"); do
    tries=$((tries + 1))
    if [ "$tries" -gt 100 ]; then
        echo "initramfs: no partition named $label; dropping to a shell"
        exec sh
    fi
    sleep 0.1
done
mkdir -p /newroot
# noload: the journal stays unloaded, so the slot's block device reads back exactly the
# image that was written (jbd2 would change its superblock in memory): delta sources and
# verify-partition hash it.
if ! mount -t ext4 -o ro,noload "$device" /newroot; then
    echo "initramfs: cannot mount $device ($label); dropping to a shell"
    exec sh
fi
umount /proc /sys
mount --move /dev /newroot/dev 2>/dev/null || umount /dev
exec switch_root /newroot /sbin/init
"""


def modules_beside_kernel(recipe: Recipe) -> Path | None:
    """The Debian module tree for the recipe's kernel, or None when it has none."""
    if recipe.kernel is None:
        return None
    modules = recipe.recovery.modules or recipe.kernel.parent / "modules"
    release = kernel_release(recipe.kernel)
    if release is None or not (modules / release).is_dir():
        return None
    return modules


def device_boot_enabled(recipe: Recipe) -> bool:
    """True when the factory image gets a bootloader and a device initramfs."""
    return (
        recipe.applier.bootloader is Bootloader.GRUB and modules_beside_kernel(recipe) is not None
    )


def build_device_initramfs(recipe: Recipe, output: Path) -> int:
    """Write the slot's gzip initramfs to `output`; returns the number of modules in it."""
    modules = modules_beside_kernel(recipe)
    assert recipe.kernel is not None and modules is not None
    slots = {
        part.role: part.label
        for part in recipe.layout.partitions
        if part.role in (Role.SYSTEM_A, Role.SYSTEM_B)
    }
    archive = Initramfs()
    for directory in ("proc", "sys", "dev", "newroot"):
        archive.directory(directory)
    archive.char_device("dev/console", 5, 1)
    archive.char_device("dev/null", 1, 3, 0o666)
    archive.copy("bin/busybox", Path(which("busybox")), 0o755)
    for applet in INIT_APPLETS:
        archive.symlink(f"bin/{applet}", "busybox")
    init = _INIT.format(
        name=recipe.name, label_a=slots[Role.SYSTEM_A], label_b=slots[Role.SYSTEM_B]
    )
    archive.file("init", init.encode(), 0o755)
    tree = open_module_tree(modules, recipe.kernel)
    order = []
    for path in resolve_modules(tree, list(DEVICE_MODULES)):
        relative = path.relative_to(tree.root).as_posix()
        archive.copy(f"lib/modules/{relative}", path, 0o644)
        order.append(relative)
    archive.file("lib/modules/load-order", "".join(f"{line}\n" for line in order).encode())
    archive.write_gzip(output)
    return len(order)


def install_target_tools(recipe: Recipe, staging: Path) -> list[str]:
    """Copy the applier's `[applier] target-tools` the rootfs lacks from this (Debian) host
    into /usr/bin, with the shared libraries they need; returns the tools copied."""
    copied = []
    for tool in recipe.applier.target_tools:
        if any((staging / directory / tool).exists() for directory in TOOL_DIRECTORIES):
            continue
        binary = Path(which(tool))
        target = staging / "usr/bin" / tool
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(binary, target)
        target.chmod(0o755)
        for library, source in shared_libraries(binary).items():
            placed = staging / library.lstrip("/")
            if not placed.exists():
                placed.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, placed)
                placed.chmod(0o755)
        copied.append(tool)
    return copied


def install_slot_boot(recipe: Recipe, staging: Path) -> None:
    """Add the rendered applier, its target tools and the device initramfs to a staged
    rootfs."""
    render_applier(recipe, staging)
    install_target_tools(recipe, staging)
    initrd = staging / INITRD_PATH
    initrd.parent.mkdir(parents=True, exist_ok=True)
    build_device_initramfs(recipe, initrd)
    initrd.chmod(0o644)


def install_esp_boot(recipe: Recipe, esp_image: Path, offset: int = 0) -> None:
    """Write GRUB (BOOTX64.EFI) and the applier's grub.cfg into the ESP filesystem image."""
    with tempfile.TemporaryDirectory(prefix="avobuild-espboot-") as workdir:
        rendered = Path(workdir) / "applier"
        render_applier(recipe, rendered)
        grub_cfg = (rendered / "boot/efi" / GRUB_CFG_ESP_PATH).read_bytes()
        grub = Path(workdir) / "BOOTX64.EFI"
        build_grub_efi(
            grub, "", "/EFI/BOOT", GRUB_COMMON_MODULES + GRUB_DISK_MODULES + GRUB_DEVICE_MODULES
        )
        write_vfat_file(esp_image, offset, GRUB_EFI_ESP_PATH, grub.read_bytes())
        write_vfat_file(esp_image, offset, GRUB_CFG_ESP_PATH, grub_cfg)
