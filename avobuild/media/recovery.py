"""The recovery system: a kernel plus an initramfs with busybox, tool sets and a menu.

`build_initramfs` gathers busybox (Debian's static build) with its applet links, the host
tools of the chosen tool sets with their shared libraries, the kernel modules that reach
disks, USB sticks and network cards, and the recovery scripts (`templates/init.sh`,
`templates/avocado-recovery.sh` linked with the shell library it shares with the on-target
applier, `templates/udhcpc.sh`), then writes a reproducible gzip-compressed newc archive.
The same archive serves every medium; `mode` (partition, usb, net) is only a default the
kernel command line (`avo.mode=`) overrides.

`build_recovery_image` puts kernel, initramfs and a GRUB entry into an ext4 image the size
of the layout's recovery partition; `install_recovery` writes such an image into the
recovery partition of a disk image, found by its GPT name.
"""

from __future__ import annotations

import enum
import hashlib
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from avobuild.applier.scripts import library_parts, link_program, template_environment
from avobuild.binaries.elf import check_kernel
from avobuild.binaries.elfdeps import shared_libraries
from avobuild.binaries.kmod import open_module_tree, resolve_modules
from avobuild.disk.plan import plan_layout
from avobuild.disk.record import read_disk_roles
from avobuild.errors import BuildError, InstallError
from avobuild.fs import build_filesystem, deterministic_uuid
from avobuild.fs.cpio import Initramfs
from avobuild.model.layout import FsType, Layout, Role
from avobuild.model.recipe import Recipe, ToolSet
from avobuild.model.tomlcheck import format_size
from avobuild.run import run_text, source_date_epoch, which

Progress = Callable[[str], None]
TEMPLATES = Path(__file__).parent / "templates"
INITRD_NAME = "initrd.img"
KERNEL_NAME = "vmlinuz"
_COPY_BLOCK = 1 << 20
_EXT4_MAGIC_OFFSET = 1080


class Mode(enum.StrEnum):
    """Where the recovery system was started from; it decides where images are looked for."""

    PARTITION = "partition"
    USB = "usb"
    NET = "net"


# Host tools per tool set: (tool name, directory on the target, extra names linked to it).
TOOL_SETS: dict[ToolSet, tuple[tuple[str, str, tuple[str, ...]], ...]] = {
    ToolSet.STORAGE: (
        ("e2fsck", "usr/sbin", ("fsck.ext4", "fsck.ext2")),
        ("mke2fs", "usr/sbin", ("mkfs.ext4", "mkfs.ext2")),
        ("resize2fs", "usr/sbin", ()),
        ("tune2fs", "usr/sbin", ()),
        ("fsck.vfat", "usr/sbin", ("fsck.fat",)),
        ("mkfs.vfat", "usr/sbin", ("mkfs.fat",)),
        ("sfdisk", "usr/sbin", ()),
        ("blkid", "usr/sbin", ()),
    ),
    ToolSet.NETWORK: (("openssl", "usr/bin", ()),),
    ToolSet.DIAGNOSTICS: (("smartctl", "usr/sbin", ()),),
}

# Drivers for the disks a device boots from and the sticks it recovers from; busybox's
# insmod loads them with their dependencies (kmod.resolve_modules) at boot.
STORAGE_MODULES = (
    "ahci",
    "ata_piix",
    "sd_mod",
    "sr_mod",
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "nvme",
    "mmc_block",
    "sdhci_pci",
    "xhci_pci",
    "ehci_pci",
    "ohci_pci",
    "uhci_hcd",
    "usb_storage",
    "uas",
    "usbhid",
    "hid_generic",
    "ext4",
    "vfat",
    "nls_cp437",
    "nls_iso8859_1",
    "nls_utf8",
    "nls_ascii",
    "isofs",
)
NETWORK_MODULES = ("e1000", "e1000e", "igb", "r8169", "virtio_net")


@dataclass(frozen=True)
class RecoverySystem:
    """A built recovery system: the kernel to boot, its initramfs and their command line."""

    kernel: Path
    initrd: Path
    cmdline: str
    tools: tuple[ToolSet, ...]
    modules: int


@dataclass(frozen=True)
class RecoveryImage:
    path: Path
    size: int
    system: RecoverySystem


@dataclass(frozen=True)
class InstalledRecovery:
    partition: str
    offset: int
    size: int
    image_size: int


def render_template(name: str, **values: Any) -> str:
    """Render one file of `avobuild/media/templates` (the shell programs' environment)."""
    env = template_environment(jinja2.FileSystemLoader(TEMPLATES))
    return env.get_template(name).render(**values)


def recovery_program() -> str:
    """avocado-recovery: `templates/avocado-recovery.sh` with the shared shell library linked
    in after its leading comment block."""
    text = (TEMPLATES / "avocado-recovery.sh").read_text()
    lines = text.splitlines(keepends=True)
    head = 0
    while head < len(lines) and lines[head].startswith("#"):
        head += 1
    return link_program("".join(lines[:head]), (*library_parts(), "".join(lines[head:])))


def recovery_kernel(recipe: Recipe) -> Path:
    """The kernel the recovery system boots: `[recovery] kernel`, else `[kernel] file`."""
    kernel = recipe.recovery.kernel or recipe.kernel
    if kernel is None:
        raise BuildError(
            f"{recipe.path}: no kernel for the recovery system; set [recovery] kernel "
            "or [kernel] file"
        )
    check_kernel(kernel, recipe.architecture)
    return kernel


def recovery_modules(recipe: Recipe, kernel: Path) -> Path | None:
    """`[recovery] modules`, else a `modules` directory beside the kernel, else None."""
    if recipe.recovery.modules is not None:
        return recipe.recovery.modules
    beside = kernel.parent / "modules"
    return beside if beside.is_dir() else None


def kernel_cmdline(recipe: Recipe, mode: Mode, extra: Sequence[str] = ()) -> str:
    """The recovery kernel's command line: screen and serial console, the mode, extras."""
    parts = ["console=tty0", f"console={recipe.recovery.console}"]
    if recipe.recovery.cmdline:
        parts.append(recipe.recovery.cmdline)
    parts.append(f"avo.mode={mode.value}")
    parts.extend(extra)
    return " ".join(parts)


def medium_id(recipe: Recipe) -> str:
    """The identifier the initramfs looks for to recognise its own USB medium."""
    return f"{recipe.name}-{recipe.version}-{deterministic_uuid(recipe.seed, 'medium').hex[:12]}"


def render_recovery_conf(recipe: Recipe, mode: Mode) -> str:
    """/etc/avobuild/recovery.conf: product, partition labels and factory image geometry."""
    plan = plan_layout(recipe.layout)
    labels = {
        key: (part.label if part is not None else "")
        for key, part in (
            ("boot", recipe.layout.by_role(Role.BOOT)),
            ("system_a", recipe.layout.by_role(Role.SYSTEM_A)),
            ("system_b", recipe.layout.by_role(Role.SYSTEM_B)),
            ("data", recipe.layout.by_role(Role.DATA)),
            ("recovery", recipe.layout.by_role(Role.RECOVERY)),
        )
    }
    boot = plan.by_role(Role.BOOT)
    data = plan.by_role(Role.DATA)
    places = [value for part in (boot, data) if part for value in (part.offset, part.size)]
    block_size = math.gcd(1 << 20, *places)
    return render_template(
        "recovery.conf.j2",
        product=recipe.name,
        version=recipe.version,
        compatible=recipe.compatible,
        mode=mode.value,
        medium_id=medium_id(recipe),
        disk_size=plan.disk_size,
        labels=labels,
        block_size=block_size,
        boot_offset=boot.offset // block_size if boot else 0,
        boot_size=boot.size // block_size if boot else 0,
        data_offset=data.offset // block_size if data else 0,
        data_size=data.size // block_size if data else 0,
    )


def _serial_tty(recipe: Recipe) -> str:
    return recipe.recovery.console.split(",", 1)[0]


def _add_busybox(archive: Initramfs) -> None:
    busybox = Path(which("busybox"))
    archive.copy("bin/busybox", busybox, 0o755)
    for library, source in shared_libraries(busybox).items():
        if library not in archive:
            archive.copy(library, source, 0o755)
    applets = run_text([busybox, "--list-full"]).split()
    for applet in sorted(applets):
        path = applet.strip("/")
        if path in ("bin/busybox", "linuxrc") or path in archive:
            continue
        archive.symlink(path, "/bin/busybox")


def _add_tools(archive: Initramfs, tools: Sequence[ToolSet]) -> None:
    for tool_set in tools:
        for name, directory, aliases in TOOL_SETS[tool_set]:
            binary = Path(which(name))
            archive.copy(f"{directory}/{name}", binary, 0o755)
            for alias in aliases:
                archive.symlink(f"{directory}/{alias}", name)
            for library, source in shared_libraries(binary).items():
                if library not in archive:
                    archive.copy(library, source, 0o755)


def _add_modules(archive: Initramfs, modules_dir: Path, kernel: Path, wanted: list[str]) -> int:
    tree = open_module_tree(modules_dir, kernel)
    paths = resolve_modules(tree, wanted)
    order = []
    for path in paths:
        relative = f"{tree.version}/{path.relative_to(tree.root).as_posix()}"
        archive.copy(f"lib/modules/{relative}", path, 0o644)
        order.append(relative)
    archive.file("lib/modules/load-order", "".join(f"{line}\n" for line in order).encode())
    return len(paths)


def _add_tree(archive: Initramfs, source: Path, dest: str) -> None:
    for directory, dirs, files in os.walk(source):
        dirs.sort()
        relative = Path(directory).relative_to(source).as_posix()
        base = dest if relative == "." else f"{dest}/{relative}"
        archive.directory(base)
        for name in sorted(files):
            path = Path(directory) / name
            if path.is_symlink():
                archive.symlink(f"{base}/{name}", os.readlink(path))  # noqa: PTH115
            else:
                archive.copy(f"{base}/{name}", path)


def build_initramfs(
    recipe: Recipe,
    output: Path,
    *,
    mode: Mode,
    tools: Sequence[ToolSet] | None = None,
    applier: Path | None = None,
    include_firmware: bool = False,
    extra_files: Mapping[str, bytes] | None = None,
    progress: Progress | None = None,
) -> RecoverySystem:
    """Write the gzip-compressed recovery initramfs to `output` and describe the system.

    `tools` None means the recipe's `[recovery] tools`; net mode always adds the network
    set. `applier` (the rendered `avocado-update`) becomes /usr/sbin/avocado-update, which
    the menu calls to install a bundle and to report status. `extra_files` maps paths in the
    archive to contents (network-recovery.conf, certificates).
    """
    chosen = list(recipe.recovery.tools if tools is None else tools)
    if mode is Mode.NET and ToolSet.NETWORK not in chosen:
        chosen.append(ToolSet.NETWORK)
    chosen_sets = tuple(tool for tool in ToolSet if tool in chosen)
    kernel = recovery_kernel(recipe)
    archive = Initramfs()
    for directory in ("proc", "sys", "dev", "run", "root", "mnt", "etc", "var/log"):
        archive.directory(directory)
    archive.directory("tmp", 0o1777)
    archive.char_device("dev/console", 5, 1)
    archive.char_device("dev/null", 1, 3, 0o666)
    if progress:
        progress("adding busybox and the tool sets: " + ", ".join(t.value for t in chosen_sets))
    _add_tools(archive, chosen_sets)
    _add_busybox(archive)
    archive.file("init", (TEMPLATES / "init.sh").read_bytes(), 0o755)
    archive.file("usr/sbin/avocado-recovery", recovery_program().encode(), 0o755)
    archive.file("usr/share/udhcpc/default.script", (TEMPLATES / "udhcpc.sh").read_bytes(), 0o755)
    archive.file("etc/inittab", render_template("inittab", serial_tty=_serial_tty(recipe)).encode())
    archive.file("etc/avobuild/recovery.conf", render_recovery_conf(recipe, mode).encode())
    archive.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    archive.file("etc/group", b"root:x:0:\n")
    archive.file(
        "etc/profile",
        b"export PATH=/usr/sbin:/usr/bin:/sbin:/bin\nexport PS1='recovery# '\n",
    )
    archive.file("etc/resolv.conf", b"")
    if applier is not None:
        archive.copy("usr/sbin/avocado-update", applier, 0o755)
    module_count = 0
    modules_dir = recovery_modules(recipe, kernel)
    if modules_dir is not None:
        wanted = list(STORAGE_MODULES)
        if ToolSet.NETWORK in chosen_sets:
            wanted += NETWORK_MODULES
        if progress:
            progress(f"adding kernel modules from {modules_dir}")
        module_count = _add_modules(archive, modules_dir, kernel, wanted)
    if include_firmware:
        if recipe.recovery.firmware is None:
            raise BuildError(
                f"{recipe.path}: [recovery] firmware: missing (a directory of firmware files "
                "is needed for --include-firmware)"
            )
        _add_tree(archive, recipe.recovery.firmware, "lib/firmware")
    for path, data in sorted((extra_files or {}).items()):
        archive.file(path, data)
    if progress:
        progress(f"writing {output.name}")
    archive.write_gzip(output)
    os.utime(output, (source_date_epoch(), source_date_epoch()))
    return RecoverySystem(kernel, output, kernel_cmdline(recipe, mode), chosen_sets, module_count)


def _fs_label(recipe: Recipe) -> str:
    part = recipe.layout.by_role(Role.RECOVERY)
    return (part.label if part is not None else "recovery")[:16]


def build_recovery_image(
    recipe: Recipe,
    output: Path,
    workdir: Path,
    *,
    tools: Sequence[ToolSet] | None = None,
    applier: Path | None = None,
    include_firmware: bool = False,
    progress: Progress | None = None,
) -> RecoveryImage:
    """Build recovery.img: an ext4 filesystem the size of the layout's recovery partition
    holding /boot/vmlinuz, /boot/initrd.img and /boot/grub/recovery.cfg."""
    part = recipe.layout.by_role(Role.RECOVERY)
    if part is None:
        raise BuildError(
            f'{recipe.layout.path}: no partition with role "recovery" to size recovery.img for'
        )
    tree = workdir / "recovery-tree"
    if tree.exists():
        shutil.rmtree(tree)
    (tree / "boot" / "grub").mkdir(parents=True)
    tree.chmod(0o755)
    system = build_initramfs(
        recipe,
        tree / "boot" / INITRD_NAME,
        mode=Mode.PARTITION,
        tools=tools,
        applier=applier,
        include_firmware=include_firmware,
        progress=progress,
    )
    shutil.copyfile(system.kernel, tree / "boot" / KERNEL_NAME)
    (tree / "boot" / "grub" / "recovery.cfg").write_text(
        render_recovery_grub_entry(recipe, system.cmdline)
    )
    for path in sorted(tree.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    payload = sum(path.stat().st_size for path in tree.rglob("*") if path.is_file())
    if progress:
        progress(f"building {output.name} (ext4, {format_size(part.size)})")
    if output.exists():
        output.unlink()
    try:
        build_filesystem(
            FsType.EXT4,
            tree,
            output,
            part.size,
            label=_fs_label(recipe),
            seed=f"{recipe.seed}/recovery",
        )
    except BuildError as error:
        raise BuildError(
            f"the recovery system ({format_size(payload)} of kernel and initramfs) does not fit "
            f"the {format_size(part.size)} recovery partition of {recipe.layout.path}: {error}"
        ) from None
    return RecoveryImage(output, part.size, system)


def render_recovery_grub_entry(recipe: Recipe, cmdline: str) -> str:
    """The GRUB menu entry that boots the recovery partition (found by filesystem label)."""
    base = cmdline.replace(f" avo.mode={Mode.PARTITION.value}", "")
    return render_template(
        "recovery-grub.cfg", product=recipe.name, fs_label=_fs_label(recipe), cmdline=base
    )


def install_recovery(image: Path, disk: Path, *, layout: Layout | None = None) -> InstalledRecovery:
    """Write recovery.img into the recovery partition of `disk`, then read it back.

    The partition is the one of the recovery role: by the layout's labels, else as the disk
    records it (disk/record.py). Refused, with the disk untouched, when the image is not ext4
    or is larger than the partition.
    """
    if layout is not None and layout.by_role(Role.RECOVERY) is None:
        raise InstallError(f"{layout.path}: the layout has no partition with role recovery")
    image_size = image.stat().st_size
    with image.open("rb") as handle:
        handle.seek(_EXT4_MAGIC_OFFSET)
        if handle.read(2) != b"\x53\xef":
            raise InstallError(f"{image}: not an ext4 image (no superblock magic at byte 1080)")
    partition = read_disk_roles(disk, layout).require(Role.RECOVERY)
    label, offset, size = partition.label or str(partition.number), partition.offset, partition.size
    with disk.open("r+b") as target:
        if image_size > size:
            raise InstallError(
                f"{image}: {format_size(image_size)} does not fit partition {label} of {disk} "
                f"({format_size(size)})"
            )
        digest = hashlib.sha256()
        with image.open("rb") as source:
            position = 0
            while block := source.read(_COPY_BLOCK):
                os.pwrite(target.fileno(), block, offset + position)
                digest.update(block)
                position += len(block)
        os.fsync(target.fileno())
        check = hashlib.sha256()
        position = 0
        while position < image_size:
            block = os.pread(
                target.fileno(), min(_COPY_BLOCK, image_size - position), offset + position
            )
            if not block:
                break
            check.update(block)
            position += len(block)
        if check.digest() != digest.digest():
            raise InstallError(f"{disk}: read-back of partition {label} does not match {image}")
    return InstalledRecovery(label, offset, size, image_size)
