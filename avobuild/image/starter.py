"""`avobuild recipe init`: a starter product that builds and boots, for a new user to edit.

The recipe and layout are written with tomli-w from plain dictionaries, then read back with the
strict readers (`load_recipe`, which reads the layout too), so a starter is never a file the
rest of avobuild would refuse. Next to them: a minimal root filesystem tree (busybox from the
host, an /etc/os-release naming the product) and a development signing key pair.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import tomli_w

from avobuild.bundle.keys import generate_keypair
from avobuild.errors import RecipeError
from avobuild.model.recipe import Recipe, load_recipe
from avobuild.run import run

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")

STARTER_LAYOUT: dict[str, Any] = {
    "disk": {"table": "gpt", "sector-size": 512, "alignment": "1M"},
    "partition": {
        "boot": {"role": "boot", "type": "esp", "filesystem": "vfat", "size": "64M"},
        "system-a": {
            "role": "system-a",
            "type": "root-x86-64",
            "filesystem": "ext4",
            "size": "128M",
        },
        "system-b": {
            "role": "system-b",
            "type": "root-x86-64",
            "filesystem": "ext4",
            "size": "128M",
        },
        "data": {"role": "data", "type": "linux-generic", "filesystem": "ext4", "size": "32M"},
        "recovery": {
            "role": "recovery",
            "type": "linux-generic",
            "filesystem": "ext4",
            "size": "64M",
        },
    },
}

_LAYOUT_HEADER = """\
# The starter layout (docs/layouts.md has every key): GPT with an EFI system partition that
# holds the boot state, two root slots, a data partition and a recovery partition.
"""

_RECIPE_HEADER = """\
# The starter recipe written by `avobuild recipe init` (docs/recipes.md has every key).
# Build it:   avobuild image recipe.toml -o out
# Paths are relative to this file. The key in keys/ is for development only.
"""


@dataclass(frozen=True)
class Starter:
    directory: Path
    recipe_path: Path
    layout_path: Path
    recipe: Recipe


def starter_recipe(name: str, kernel: Path, busybox: Path) -> dict[str, Any]:
    """The recipe document of a starter product called `name`."""
    return {
        "product": {
            "name": name,
            "version": "0.1.0",
            "compatible": f"{name}-x86_64",
            "architecture": "x86_64",
            "layout": "layout.toml",
        },
        "rootfs": {
            "tree": "rootfs",
            "ownership": "root",
            "directories": ["boot", "data", "dev", "proc", "sys", "run", "tmp", "root"],
            "file": [{"source": str(busybox), "dest": "/bin/busybox", "mode": "0755"}],
        },
        "kernel": {"file": str(kernel), "dest": "/boot/vmlinuz"},
        "boot": {"method": "grub-efi"},
        "signing": {"key": "keys/bundle-signing.key.pem"},
    }


def write_starter(
    directory: Path, name: str, kernel: Path, busybox: Path = Path("/bin/busybox")
) -> Starter:
    """Write recipe.toml, layout.toml, rootfs/ and keys/ into `directory` (new or empty)."""
    if not _NAME.fullmatch(name):
        raise RecipeError(f"--name: expected lowercase letters, digits and -, got {name!r}")
    for what, path in (("--kernel", kernel), ("busybox", busybox)):
        if not path.is_file():
            raise RecipeError(f"{what} {path}: no such file")
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise RecipeError(f"{directory}: exists and is not an empty directory; give a new one")
    rootfs = directory / "rootfs"
    _write_starter_tree(rootfs, name, busybox)
    generate_keypair(directory / "keys")
    layout_path = directory / "layout.toml"
    layout_path.write_text(_LAYOUT_HEADER + tomli_w.dumps(STARTER_LAYOUT))
    recipe_path = directory / "recipe.toml"
    document = starter_recipe(name, kernel.absolute(), busybox.absolute())
    recipe_path.write_text(_RECIPE_HEADER + tomli_w.dumps(document))
    return Starter(directory, recipe_path, layout_path, load_recipe(recipe_path))


# A busybox system's boot: init (busybox) reads inittab, whose sysinit runs rcS, which mounts
# the kernel filesystems and the fstab's partitions and starts /etc/init.d/S* (the applier's
# boot hook S45avocado-update among them), then a shell on the serial console.
_INITTAB = """\
::sysinit:/etc/init.d/rcS
ttyS0::respawn:-/bin/sh
::ctrlaltdel:/bin/reboot
::shutdown:/bin/umount -a -r
"""
_FSTAB = """\
# busybox mount does not resolve PARTLABEL=: /etc/init.d/rcS mounts these through the
# /dev/disk/by-partlabel links it makes (the slot initramfs has mounted them already).
PARTLABEL=data  /data      ext4  defaults,noatime  0  2
PARTLABEL=boot  /boot/efi  vfat  defaults          0  0
"""
_RCS = """\
#!/bin/sh
# Early boot: kernel filesystems, partition links, the fstab's partitions, the S* scripts.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /run /tmp
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
hostname -F /etc/hostname
mkdir -p /dev/disk/by-partlabel
for uevent in /sys/class/block/*/uevent; do
    name= dev=
    while IFS== read -r key value; do
        case "$key" in PARTNAME) name="$value" ;; DEVNAME) dev="$value" ;; esac
    done < "$uevent"
    [ -n "$name" ] && ln -sf "../../$dev" "/dev/disk/by-partlabel/$name"
done
while read -r spec dir type options rest; do
    case "$spec" in
    PARTLABEL=*)
        grep -q "^[^ ]* $dir " /proc/mounts && continue
        mkdir -p "$dir"
        mount -t "$type" -o "$options" "/dev/disk/by-partlabel/${spec#PARTLABEL=}" "$dir" \
            || echo "rcS: cannot mount $spec on $dir"
        ;;
    esac
done < /etc/fstab
for script in /etc/init.d/S*; do
    [ -x "$script" ] && "$script" start
done
"""
_UP = {"bin": "", "sbin": "../", "usr/bin": "../../", "usr/sbin": "../../"}
_DIRS = frozenset(_UP)


def _write_starter_tree(rootfs: Path, name: str, busybox: Path) -> None:
    """The starter's root filesystem tree, busybox itself coming from the recipe: a link for
    each of its applets where `busybox --list-full` puts it (init, sh, mount, ...)."""
    for directory in ("etc/init.d", "bin", "sbin", "usr/bin", "usr/sbin"):
        (rootfs / directory).mkdir(parents=True, exist_ok=True)
    (rootfs / "etc" / "hostname").write_text(f"{name}\n")
    (rootfs / "etc" / "os-release").write_text(f'NAME="{name}"\nID={name}\nVERSION_ID=0.1.0\n')
    (rootfs / "etc" / "inittab").write_text(_INITTAB)
    (rootfs / "etc" / "fstab").write_text(_FSTAB)
    rcs = rootfs / "etc" / "init.d" / "rcS"
    rcs.write_text(_RCS)
    rcs.chmod(0o755)
    listing = run([busybox, "--list-full"]).stdout.decode("ascii", "replace").split()
    for applet in listing:
        link = PurePosixPath(applet)
        if link.is_absolute() or ".." in link.parts or link.parent.as_posix() not in _DIRS:
            continue
        target = (
            "busybox"
            if link.parent.as_posix() == "bin"
            else f"{_UP[link.parent.as_posix()]}bin/busybox"
        )
        if link.name != "busybox":
            (rootfs / link).symlink_to(target)
