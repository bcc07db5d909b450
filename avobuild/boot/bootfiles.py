"""Boot-loader files from Debian packages, and GRUB EFI images built from them.

Everything a medium boots with comes from packages installed on the build host (isolinux,
syslinux-common, pxelinux, grub-efi-amd64-bin, grub-efi-arm64-bin); nothing is
downloaded. GRUB images are made with `grub-mkimage`, which gives identical bytes for
identical modules and config, with every module built in so the image needs no module
directory at boot.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from avobuild.errors import ToolMissing
from avobuild.run import run

ISOLINUX_BIN = ("/usr/lib/ISOLINUX/isolinux.bin", "isolinux")
ISOHYBRID_MBR = ("/usr/lib/ISOLINUX/isohdpfx.bin", "isolinux")
LDLINUX_C32 = ("/usr/lib/syslinux/modules/bios/ldlinux.c32", "syslinux-common")
PXELINUX_0 = ("/usr/lib/PXELINUX/pxelinux.0", "pxelinux")
GRUB_EFI_DIR = ("/usr/lib/grub/x86_64-efi", "grub-efi-amd64-bin")
# Per architecture: grub-mkimage's format, its module directory (and package), and the
# removable-media file name UEFI firmware boots (UEFI spec 3.5.1.1).
GRUB_EFI_TARGETS = {
    "x86_64": ("x86_64-efi", GRUB_EFI_DIR, "BOOTX64.EFI"),
    "aarch64": ("arm64-efi", ("/usr/lib/grub/arm64-efi", "grub-efi-arm64-bin"), "BOOTAA64.EFI"),
}

# GRUB modules built into every EFI image: disks, filesystems, Linux loading, consoles.
GRUB_COMMON_MODULES = (
    "all_video",
    "cat",
    "configfile",
    "echo",
    "efi_gop",
    "gzio",
    "linux",
    "ls",
    "normal",
    "search",
    "search_fs_file",
    "search_label",
    "serial",
    "terminal",
    "terminfo",
    "test",
)
GRUB_DISK_MODULES = ("part_gpt", "part_msdos", "fat", "iso9660", "ext2")
GRUB_NET_MODULES = ("efinet", "net", "tftp", "http")


def host_file(spec: tuple[str, str], purpose: str) -> Path:
    """A file of an installed Debian package, or `ToolMissing` naming the package."""
    path, package = spec
    found = Path(path)
    if not found.exists():
        raise ToolMissing(path, purpose, package)
    return found


def build_grub_efi(
    output: Path,
    embedded_config: str,
    prefix: str,
    modules: tuple[str, ...],
    architecture: str = "x86_64",
) -> None:
    """Build a standalone GRUB EFI binary with `embedded_config` and `modules` in it, for
    `architecture` (a key of GRUB_EFI_TARGETS)."""
    image_format, module_spec, _name = GRUB_EFI_TARGETS[architecture]
    module_dir = host_file(module_spec, f"build {architecture} GRUB EFI boot images")
    with tempfile.TemporaryDirectory(prefix="avobuild-grub-") as workdir:
        config = Path(workdir) / "embedded.cfg"
        config.write_text(embedded_config)
        run(
            [
                "grub-mkimage",
                "-O",
                image_format,
                "-d",
                module_dir,
                "-p",
                prefix,
                "-c",
                config,
                "-o",
                output,
                *sorted(set(modules)),
            ]
        )


def copy_host_file(spec: tuple[str, str], dest: Path, purpose: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(host_file(spec, purpose), dest)
    dest.chmod(0o644)
