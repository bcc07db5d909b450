"""Make a factory image boot as the recipe's `[boot] method` declares (model/boot.py).

`grub-efi` and `u-boot` build the whole chain: `install_slot_boot` adds the rendered applier
(its systemd units enabled), its target tools and the device initramfs (/boot/initrd.img,
with the disk and filesystem modules of the kernel's Debian module tree) to the additions of
a rootfs (`fs.overlay`); `install_boot_partition` writes the boot state and the boot loader
onto the FAT boot partition: GRUB (BOOTX64.EFI or BOOTAA64.EFI) and grub.cfg, or U-Boot's
boot script /boot.scr beside the environment file /uboot.env. `external` gets only the boot
state. A chain that cannot be completed (no module tree, no static busybox, a target tool
missing from the target sysroot) is a RecipeError naming the recipe key, never an image
that cannot boot.

Binaries for the device come from the build host, or from the recipe's `[target] sysroot`
when the device has another architecture; their shared libraries resolve inside it.
"""

from __future__ import annotations

import platform
import tempfile
from collections.abc import Mapping
from pathlib import Path

import jinja2

from avobuild.applier.render import render_applier, sh_quote, uboot_boot_files
from avobuild.binaries.elfdeps import resolve_in_root, shared_libraries
from avobuild.binaries.kmod import kernel_release, open_module_tree, resolve_modules
from avobuild.boot.bootfiles import (
    GRUB_COMMON_MODULES,
    GRUB_DISK_MODULES,
    GRUB_EFI_TARGETS,
    build_grub_efi,
)
from avobuild.boot.grubenv import render_grubenv
from avobuild.boot.state import BOOT_STATE_PATH, factory_state
from avobuild.errors import RecipeError
from avobuild.fs import write_vfat_file
from avobuild.fs.common import EntryKind, FsEntry
from avobuild.fs.cpio import Initramfs
from avobuild.fs.overlay import Overlay, resolve_in_image
from avobuild.model.applier import Bootloader, InitSystem
from avobuild.model.boot import UBOOT_ENV_FILE, UBOOT_SCRIPT_FILE, BootMethod, UbootEnv
from avobuild.model.layout import Role
from avobuild.model.recipe import Recipe
from avobuild.run import which

INITRD_PATH = "boot/initrd.img"
SYSTEMD_UNIT_DIR = "usr/lib/systemd/system"
GRUB_CFG_ESP_PATH = "EFI/BOOT/grub.cfg"
GRUB_EFI_ESP_DIR = "EFI/BOOT"
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
# What the slot initramfs runs after switch_root.
DEVICE_INIT = "/sbin/init"
TOOL_DIRECTORIES = ("bin", "sbin", "usr/bin", "usr/sbin")
INIT_APPLETS = (
    "sh",
    "mount",
    "umount",
    "insmod",
    "sleep",
    "cat",
    "mkdir",
    "switch_root",
    "cp",
    "mv",
    "rm",
    "dirname",
)
PERSIST_DIR = "persist"  # below the data mount: [persist] paths (docs/recipes.md)
# Debian's architecture names, for the hints in error messages.
DEBIAN_ARCHITECTURE = {
    "x86_64": "amd64",
    "aarch64": "arm64",
    "arm": "armhf",
    "riscv64": "riscv64",
    "i686": "i386",
}
# The Debian package of each tool the applier may need on the target.
TOOL_PACKAGES = {
    "busybox": "busybox-static",
    "openssl": "openssl",
    "zstd": "zstd",
    "bspatch": "bsdiff",
    "xz": "xz-utils",
    "fw_printenv": "libubootenv-tool",
    "fw_setenv": "libubootenv-tool",
    "systemctl": "systemd",
}


def kernel_module_tree(recipe: Recipe) -> Path:
    """The module tree of the recipe's kernel, which its boot method needs: `[kernel]
    modules`, else the `modules` directory beside the kernel file (scripts/fetch-kernel)."""
    assert recipe.kernel is not None
    given = recipe.kernel_modules.tree
    modules = given or recipe.kernel.parent / "modules"
    release = kernel_release(recipe.kernel)
    method = recipe.boot.method.value
    if (modules / "kernel").is_dir():
        return modules  # [kernel] modules names the release directory itself
    if release is None:
        raise RecipeError(
            f"{recipe.path}: [kernel] file: {recipe.kernel}: cannot tell its release (no x86 "
            'boot header, no "Linux version" banner); [boot] method = '
            f'"{method}" builds a slot initramfs with the modules of that release '
            '(or set [boot] method = "external")'
        )
    if not (modules / release).is_dir():
        where = "[kernel] modules" if given else f"[kernel] modules (default {modules})"
        raise RecipeError(
            f"{recipe.path}: {where}: no module tree for Linux {release}: expected "
            f'{modules / release}; [boot] method = "{method}" builds a slot initramfs with '
            "the kernel's disk and filesystem modules (scripts/fetch-kernel extracts a Debian "
            'kernel with its modules; a kernel of your own: [boot] method = "external")'
        )
    return modules


def device_boot_enabled(recipe: Recipe) -> bool:
    """True when the factory image gets a boot loader and a device initramfs from avobuild."""
    return recipe.boot.builds_boot_chain


def host_runs(recipe: Recipe) -> bool:
    """True when binaries of the build host run on the device."""
    return platform.machine() == recipe.architecture.value


def target_root(recipe: Recipe, what: str) -> Path | None:
    """Where binaries for the device come from: `[target] sysroot`, or None for the build
    host, which must then have the device's architecture. `what` says what is looked for."""
    sysroot = recipe.target.sysroot
    if sysroot is None and not host_runs(recipe):
        arch = recipe.architecture.value
        debian = DEBIAN_ARCHITECTURE.get(arch, arch)
        raise RecipeError(
            f"{recipe.path}: [target] sysroot: missing; the device is {arch} but this build "
            f"host is {platform.machine()}, so {what} must come from a sysroot of {arch} "
            f"binaries (for example scripts/fetch-sysroot build/debian-{debian} {debian} "
            "busybox-static openssl zstd libubootenv-tool, then [target] sysroot = "
            f'"build/debian-{debian}/sysroot")'
        )
    return sysroot


def target_tool(recipe: Recipe, tool: str, key: str) -> Path:
    """The device's binary of `tool`, from the sysroot or the host; `key` names the recipe
    key that asks for it in errors."""
    sysroot = target_root(recipe, f"{tool} ({key})")
    if sysroot is None:
        return Path(which(tool))
    for directory in TOOL_DIRECTORIES:
        candidate = resolve_in_root(sysroot, f"{directory}/{tool}")
        if candidate.is_file():
            return candidate
    package = TOOL_PACKAGES.get(tool, tool)
    raise RecipeError(
        f"{recipe.path}: {key}: {tool} is in none of {', '.join(TOOL_DIRECTORIES)} of "
        f"[target] sysroot {sysroot} (Debian package {package}: add it to the "
        "scripts/fetch-sysroot package list)"
    )


def initramfs_busybox(recipe: Recipe) -> Path:
    """A static busybox for the device: the initramfs has no shared libraries."""
    busybox = target_tool(recipe, "busybox", "[boot] method (the slot initramfs)")
    if shared_libraries(busybox, recipe.target.sysroot):
        raise RecipeError(
            f"{recipe.path}: [boot] method: the slot initramfs needs a static busybox, but "
            f"{busybox} is linked dynamically (Debian package busybox-static)"
        )
    return busybox


def render_device_init(recipe: Recipe) -> str:
    """The slot initramfs's /init (templates/init.sh.j2) for the recipe's layout."""
    labels = {part.role: part.label for part in recipe.layout.partitions}
    system = recipe.layout.by_role(Role.SYSTEM_A)
    assert system is not None and system.filesystem is not None
    data_label = labels.get(Role.DATA, "")
    if recipe.persist.enabled and not data_label:
        raise RecipeError(f"{recipe.path}: [persist] needs a partition with role 'data'")
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("avobuild.device", "templates"),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
    )
    env.filters["sh"] = sh_quote
    config = recipe.applier
    persist_dir = f"{config.data_mount.rstrip('/')}/{PERSIST_DIR}"
    return env.get_template("init.sh.j2").render(
        name=recipe.name,
        label_a=labels[Role.SYSTEM_A],
        label_b=labels[Role.SYSTEM_B],
        rootfs_type=system.filesystem.value,
        data_label=data_label,
        boot_label=labels.get(Role.BOOT, ""),
        data_mount=config.data_mount.rstrip("/"),
        esp_mount=config.esp_mount.rstrip("/"),
        persist=recipe.persist,
        persist_dir=persist_dir if recipe.persist.enabled else "",
        init=DEVICE_INIT,
    )


def check_mount_points(recipe: Recipe, overlay: Overlay, tree: Mapping[str, FsEntry]) -> None:
    """Every [persist] path and the data and boot mount points must be in the image, as
    the right kind (a mount on a read-only root needs its mount point to exist)."""
    for directory in (recipe.applier.data_mount, recipe.applier.esp_mount):
        if directory.strip("/") not in tree:
            overlay.add_directory(directory)
    present = overlay.entries()
    persist = recipe.persist
    directories_only = (
        set(persist.overlay) | set(persist.tmpfs) | ({"/var"} if persist.var else set())
    )
    for path in persist.all_paths():
        relative = path.strip("/")
        entry = tree.get(relative) or present.get(relative)
        if entry is None or entry.kind not in (EntryKind.DIRECTORY, EntryKind.FILE):
            found = entry.kind.value if entry is not None else "missing"
            raise RecipeError(
                f"{recipe.path}: [persist] {path}: the mount point must be a directory or a "
                f"file of the rootfs, it is {found}"
            )
        if path in directories_only and entry.kind is not EntryKind.DIRECTORY:
            raise RecipeError(f"{recipe.path}: [persist] {path}: expected a directory")


def build_device_initramfs(recipe: Recipe, output: Path) -> int:
    """Write the slot's gzip initramfs to `output`; returns the number of modules in it."""
    modules = kernel_module_tree(recipe)
    assert recipe.kernel is not None
    archive = Initramfs()
    for directory in ("proc", "sys", "dev", "newroot"):
        archive.directory(directory)
    archive.char_device("dev/console", 5, 1)
    archive.char_device("dev/null", 1, 3, 0o666)
    archive.copy("bin/busybox", initramfs_busybox(recipe), 0o755)
    for applet in INIT_APPLETS:
        archive.symlink(f"bin/{applet}", "busybox")
    init = render_device_init(recipe)
    archive.file("init", init.encode(), 0o755)
    tree = open_module_tree(modules, recipe.kernel)
    order = []
    wanted = list(DEVICE_MODULES) + list(recipe.kernel_modules.initramfs)
    if recipe.persist.overlay:
        wanted.append("overlay")
    for path in resolve_modules(tree, wanted):
        relative = path.relative_to(tree.root).as_posix()
        archive.copy(f"lib/modules/{relative}", path, 0o644)
        order.append(relative)
    archive.file("lib/modules/load-order", "".join(f"{line}\n" for line in order).encode())
    archive.write_gzip(output)
    return len(order)


def install_target_tools(
    recipe: Recipe, overlay: Overlay, tree: Mapping[str, FsEntry]
) -> list[str]:
    """Add the applier's `[applier] target-tools` the rootfs lacks, from this (Debian) host
    or the `[target] sysroot`, with the shared libraries they need the rootfs does not have;
    returns the tools added.

    Paths are resolved inside the image (`resolve_in_image`), so on a merged-/usr tree a
    library for /lib/x86_64-linux-gnu lands in /usr/lib/x86_64-linux-gnu, as the device's
    dynamic loader will look it up.
    """
    present = overlay.entries()

    def exists(path: str) -> bool:
        resolved = resolve_in_image(tree, path)
        return resolved in tree or resolve_in_image(present, resolved) in present

    added = []
    for tool in recipe.applier.target_tools:
        if any(exists(f"{directory}/{tool}") for directory in TOOL_DIRECTORIES):
            continue
        binary = target_tool(recipe, tool, "[applier] target-tools")
        overlay.copy_file(resolve_in_image(tree, f"usr/bin/{tool}"), binary, 0o755)
        for library, source in shared_libraries(binary, recipe.target.sysroot).items():
            if not exists(library):
                overlay.copy_file(resolve_in_image(tree, library), source, 0o755)
        added.append(tool)
        present = overlay.entries()
    return added


def enable_systemd_units(overlay: Overlay) -> list[str]:
    """Enable the rendered units the way `systemctl enable` would: a symlink in
    /etc/systemd/system/TARGET.wants for each `WantedBy=` of their [Install] section."""
    enabled = []
    units = overlay.root / SYSTEMD_UNIT_DIR
    for unit in sorted(units.glob("*.service")) if units.is_dir() else []:
        section = ""
        for line in unit.read_text().splitlines():
            if line.startswith("["):
                section = line.strip()
            elif section == "[Install]" and line.startswith("WantedBy="):
                for target in line.removeprefix("WantedBy=").split():
                    link = f"etc/systemd/system/{target}.wants/{unit.name}"
                    overlay.add_symlink(link, f"/{SYSTEMD_UNIT_DIR}/{unit.name}")
                    enabled.append(link)
    return enabled


def check_init(recipe: Recipe, overlay: Overlay, tree: Mapping[str, FsEntry]) -> None:
    """The slot initramfs hands over to /sbin/init: it must be an executable file of the
    image (through its links, resolved inside the image), or the image cannot boot."""
    present = overlay.entries()
    resolved = resolve_in_image(tree, DEVICE_INIT)
    entry = tree.get(resolved) or present.get(resolve_in_image(present, resolved))
    if entry is None or entry.kind is not EntryKind.FILE or not entry.mode & 0o111:
        found = "missing" if entry is None else f"not an executable file ({entry.kind.value})"
        raise RecipeError(
            f"{recipe.path}: the slot's {DEVICE_INIT} ({'/' + resolved}) is {found}; the slot "
            "initramfs starts it after mounting the root: add it to [rootfs] (busybox's init "
            'or systemd\'s), or set [boot] method = "external" for a boot chain of your own'
        )


def install_slot_boot(recipe: Recipe, overlay: Overlay, tree: Mapping[str, FsEntry]) -> None:
    """Add the rendered applier (its units enabled), its target tools and the device
    initramfs to the additions of a rootfs."""
    render_applier(recipe, overlay.root)
    check_mount_points(recipe, overlay, tree)
    if recipe.applier.init is InitSystem.SYSTEMD:
        enable_systemd_units(overlay)
    install_target_tools(recipe, overlay, tree)
    build_device_initramfs(recipe, overlay.path(INITRD_PATH))
    overlay.path(INITRD_PATH).chmod(0o644)
    check_init(recipe, overlay, tree)


def boot_state_on_boot_partition(recipe: Recipe) -> bool:
    """False only for U-Boot's own environment (`[boot] uboot-env = "native"`), which lives
    wherever the board's U-Boot keeps it."""
    return not (
        recipe.applier.bootloader is Bootloader.UBOOT and recipe.boot.uboot_env is UbootEnv.NATIVE
    )


def install_boot_partition(recipe: Recipe, image: Path, offset: int = 0) -> list[str]:
    """Write the boot state, the boot loader of the recipe's `[boot] method` and the
    `[[boot.file]]` entries into the FAT boot partition at `offset` of `image`; returns the
    paths written."""
    written = []
    state = factory_state(recipe.version, recipe.compatible)
    with tempfile.TemporaryDirectory(prefix="avobuild-bootpart-") as workdir:
        files: dict[str, bytes] = {}
        if recipe.applier.bootloader is Bootloader.GRUB:
            files[BOOT_STATE_PATH] = render_grubenv(state.to_variables())
        if recipe.boot.method is BootMethod.GRUB_EFI:
            files.update(_grub_efi_files(recipe, Path(workdir)))
        if recipe.applier.bootloader is Bootloader.UBOOT:
            uboot = uboot_boot_files(recipe, Path(workdir))
            if recipe.boot.uboot_env is UbootEnv.FILE:
                files[f"/{UBOOT_ENV_FILE}"] = uboot.environment.read_bytes()
            if recipe.boot.method is BootMethod.UBOOT:
                files[f"/{UBOOT_SCRIPT_FILE}"] = uboot.script.read_bytes()
        for entry in recipe.boot.files:
            files[entry.dest] = entry.source.read_bytes()
        for path in sorted(files):
            write_vfat_file(image, offset, path, files[path])
            written.append(path)
    return written


def _grub_efi_files(recipe: Recipe, workdir: Path) -> dict[str, bytes]:
    """GRUB as the removable-media EFI binary and the applier's grub.cfg beside it."""
    rendered = workdir / "applier"
    render_applier(recipe, rendered)
    grub_cfg = (rendered / "boot/efi" / GRUB_CFG_ESP_PATH).read_bytes()
    architecture = recipe.architecture.value
    _format, _modules, efi_name = GRUB_EFI_TARGETS[architecture]
    grub = workdir / efi_name
    build_grub_efi(
        grub,
        "",
        f"/{GRUB_EFI_ESP_DIR}",
        GRUB_COMMON_MODULES + GRUB_DISK_MODULES + GRUB_DEVICE_MODULES,
        architecture,
    )
    return {f"/{GRUB_EFI_ESP_DIR}/{efi_name}": grub.read_bytes(), f"/{GRUB_CFG_ESP_PATH}": grub_cfg}
