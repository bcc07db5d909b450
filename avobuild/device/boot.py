"""Make a factory image boot: a device initramfs in each slot, GRUB and its grub.cfg on the ESP.

Enabled for recipes whose applier boots with GRUB and whose kernel has a Debian module tree
beside it (scripts/fetch-kernel writes build/debian/modules next to build/debian/vmlinuz).
`install_slot_boot` adds the rendered applier (its systemd units enabled) and
/boot/initrd.img to the additions of a rootfs (`fs.overlay`);
`install_esp_boot` puts /EFI/BOOT/BOOTX64.EFI and the applier's grub.cfg on the ESP image.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

import jinja2

from avobuild.applier.render import render_applier, sh_quote
from avobuild.binaries.elfdeps import shared_libraries
from avobuild.binaries.kmod import kernel_release, open_module_tree, resolve_modules
from avobuild.boot.bootfiles import GRUB_COMMON_MODULES, GRUB_DISK_MODULES, build_grub_efi
from avobuild.errors import RecipeError
from avobuild.fs import write_vfat_file
from avobuild.fs.common import EntryKind, FsEntry
from avobuild.fs.cpio import Initramfs
from avobuild.fs.overlay import Overlay, resolve_in_image
from avobuild.model.applier import Bootloader, InitSystem
from avobuild.model.layout import Role
from avobuild.model.recipe import Recipe
from avobuild.run import which

INITRD_PATH = "boot/initrd.img"
SYSTEMD_UNIT_DIR = "usr/lib/systemd/system"
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
        init="/sbin/init",
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
    modules = modules_beside_kernel(recipe)
    assert recipe.kernel is not None and modules is not None
    archive = Initramfs()
    for directory in ("proc", "sys", "dev", "newroot"):
        archive.directory(directory)
    archive.char_device("dev/console", 5, 1)
    archive.char_device("dev/null", 1, 3, 0o666)
    archive.copy("bin/busybox", Path(which("busybox")), 0o755)
    for applet in INIT_APPLETS:
        archive.symlink(f"bin/{applet}", "busybox")
    init = render_device_init(recipe)
    archive.file("init", init.encode(), 0o755)
    tree = open_module_tree(modules, recipe.kernel)
    order = []
    wanted = list(DEVICE_MODULES) + (["overlay"] if recipe.persist.overlay else [])
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
    """Add the applier's `[applier] target-tools` the rootfs lacks, from this (Debian) host,
    with the shared libraries they need the rootfs does not have; returns the tools added.

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
        binary = Path(which(tool))
        overlay.copy_file(resolve_in_image(tree, f"usr/bin/{tool}"), binary, 0o755)
        for library, source in shared_libraries(binary).items():
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
