"""Recipes: what a product is made of. TOML -> one frozen `Recipe`, validated here only.

Paths in a recipe are relative to the recipe file. The layout named by the recipe is loaded
with it, so the rest of the build sees a single object.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from pathlib import Path

from avobuild.model.agent import FleetConfig, TelemetryConfig, read_fleet, read_telemetry
from avobuild.model.applier import (
    TOOL_NAME,
    ApplierConfig,
    RollbackConfig,
    read_applier,
    read_rollback,
)
from avobuild.model.boot import BootConfig, read_boot
from avobuild.model.layout import FsType, Layout, Role, load_layout
from avobuild.model.names import IDENTIFIER
from avobuild.model.tomlcheck import Table, load_toml
from avobuild.model.tree import ARCHIVE_SUFFIXES, Ownership, TreeKind, TreeSource

# The name grammar shared with the manifest and the on-target applier (model/names.py).
NAME_PATTERN = IDENTIFIER.pattern
EXTENSION_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_DEST_PATH = re.compile(r"/[A-Za-z0-9._+@/-]*")


class Architecture(enum.StrEnum):
    X86_64 = "x86_64"
    AARCH64 = "aarch64"
    ARM = "arm"
    RISCV64 = "riscv64"
    I686 = "i686"


@dataclass(frozen=True)
class FileEntry:
    """A host file copied into the rootfs at `dest` with `mode`."""

    source: Path
    dest: str
    mode: int


@dataclass(frozen=True)
class Extension:
    """A sysext-style image built from a tree or an archive, placed in the rootfs at `dest`."""

    name: str
    source: TreeSource
    filesystem: FsType

    @property
    def dest(self) -> str:
        return f"/usr/lib/extensions/{self.name}.raw"


class ToolSet(enum.StrEnum):
    """Groups of tools a recovery system can carry besides busybox."""

    NETWORK = "network"
    STORAGE = "storage"
    DIAGNOSTICS = "diagnostics"


@dataclass(frozen=True)
class RecoveryConfig:
    """The `[recovery]` table: how recovery systems and media are built for this product.

    `kernel` None means the recipe's `[kernel] file`; `modules` None means the `modules`
    directory beside that kernel file when there is one (scripts/fetch-kernel puts it there).
    """

    kernel: Path | None = None
    modules: Path | None = None
    tools: tuple[ToolSet, ...] = (ToolSet.STORAGE,)
    console: str = "ttyS0,115200"
    cmdline: str = "quiet"
    firmware: Path | None = None


@dataclass(frozen=True)
class SigningConfig:
    """The `[signing]` table: the keys `bundle create RECIPE` signs with, one signature each.

    `keys` are PEM private key files (`key` is the first of them); `pkcs11` are `pkcs11:` URIs
    of token keys, opened with `pkcs11_module` (or the URI's module-path, or
    $AVOBUILD_PKCS11_MODULE); `certificates` are carried in the bundle (signer first)."""

    keys: tuple[Path, ...] = ()
    pkcs11: tuple[str, ...] = ()
    pkcs11_module: Path | None = None
    certificates: tuple[Path, ...] = ()


@dataclass(frozen=True)
class PersistConfig:
    """The `[persist]` table: what of a read-only root lives on the data partition.

    The slot's initramfs sets it up before the distribution's init starts: `var` puts
    /var on the data partition; each `bind` path (a file or a directory of the image) is
    bind-mounted from it; each `overlay` directory gets an overlayfs upper layer on it
    (changes persist, untouched files come from the running slot); each `tmpfs` directory
    gets an empty tmpfs. The first boot seeds every path from the slot.
    """

    var: bool = False
    bind: tuple[str, ...] = ()
    overlay: tuple[str, ...] = ()
    tmpfs: tuple[str, ...] = ()

    @property
    def bind_paths(self) -> tuple[str, ...]:
        return (("/var",) if self.var else ()) + self.bind

    @property
    def enabled(self) -> bool:
        return bool(self.bind_paths or self.overlay or self.tmpfs)

    def all_paths(self) -> tuple[str, ...]:
        return self.bind_paths + self.overlay + self.tmpfs


@dataclass(frozen=True)
class KernelModules:
    """The `[kernel]` table's module keys: the kernel's module tree (`modules`; None: the
    `modules` directory beside the kernel file, as scripts/fetch-kernel writes it) and the
    modules the slot initramfs loads besides its disk and filesystem drivers."""

    tree: Path | None = None
    initramfs: tuple[str, ...] = ()


@dataclass(frozen=True)
class TargetConfig:
    """The `[target]` table: where binaries for the device come from when it is not the
    build host. `sysroot` holds them at their Debian paths (scripts/fetch-sysroot unpacks
    packages of the target architecture there): the applier's target tools, their shared
    libraries and the initramfs busybox are taken from it. None: from the build host."""

    sysroot: Path | None = None


@dataclass(frozen=True)
class Recipe:
    path: Path
    name: str
    version: str
    compatible: str
    architecture: Architecture
    layout: Layout
    rootfs: TreeSource
    rootfs_files: tuple[FileEntry, ...]
    rootfs_directories: tuple[str, ...]
    kernel: Path | None
    kernel_dest: str
    extensions: tuple[Extension, ...]
    boot_tree: Path | None
    data_tree: Path | None
    seed: str
    signing: SigningConfig = SigningConfig()
    recovery: RecoveryConfig = RecoveryConfig()
    applier: ApplierConfig = field(default_factory=ApplierConfig)
    rollback: RollbackConfig = field(default_factory=RollbackConfig)
    persist: PersistConfig = PersistConfig()
    boot: BootConfig = field(default_factory=BootConfig)
    kernel_modules: KernelModules = KernelModules()
    target: TargetConfig = TargetConfig()
    fleet: FleetConfig | None = None
    telemetry: TelemetryConfig | None = None

    @property
    def signing_key(self) -> Path | None:
        """The first `[signing]` key file (its *.pub.pem is the applier's default trust)."""
        return self.signing.keys[0] if self.signing.keys else None


def load_recipe(path: Path) -> Recipe:
    """Read and validate a recipe file and the layout it names."""
    root = load_toml(path)
    product = root.table("product", required=True)
    assert product is not None
    name = product.string("name", pattern=NAME_PATTERN, what=_name_rule())
    version = product.string("version", pattern=NAME_PATTERN, what=_name_rule("a version"))
    compatible = product.string(
        "compatible", pattern=NAME_PATTERN, what=_name_rule("a compatible string")
    )
    architecture = product.enum("architecture", Architecture)
    layout_path = product.path_value("layout")
    assert layout_path is not None
    seed = product.string("seed", default=name)
    product.check_unknown()
    layout = load_layout(layout_path)

    rootfs = root.table("rootfs", required=True)
    assert rootfs is not None
    rootfs_source = _read_tree_source(rootfs)
    files = tuple(_read_file_entry(entry) for entry in rootfs.array_of_tables("file"))
    directories = tuple(rootfs.string_list("directories"))
    for directory in directories:
        if not _DEST_PATH.fullmatch("/" + directory.strip("/")) or ".." in directory.split("/"):
            rootfs.fail("directories", "paths inside the rootfs without '..'", directory)
    rootfs.check_unknown()
    system = layout.by_role(Role.SYSTEM_A)
    assert system is not None
    if system.filesystem is None:
        rootfs.fail(
            rootfs_source.kind.value if rootfs_source.kind is TreeKind.ARCHIVE else "tree",
            f"a layout whose {system.label} partition has a filesystem",
        )

    kernel_table = root.table("kernel")
    kernel: Path | None = None
    kernel_dest = "/boot/vmlinuz"
    kernel_modules = KernelModules()
    if kernel_table is not None:
        kernel = kernel_table.path_value("file")
        assert kernel is not None
        if not kernel.is_file():
            kernel_table.fail("file", "an existing kernel image file", str(kernel))
        kernel_dest = kernel_table.string("dest", default=kernel_dest, pattern=_DEST_PATH)
        kernel_modules = _read_kernel_modules(kernel_table)
        kernel_table.check_unknown()

    extensions = tuple(_read_extension(table) for table in root.array_of_tables("extension"))
    names = [ext.name for ext in extensions]
    if len(set(names)) != len(names):
        raise_duplicate = next(n for n in names if names.count(n) > 1)
        root.fail("extension", "unique extension names", raise_duplicate)

    data = root.table("data")
    data_tree = _existing_dir(data, "tree") if data is not None else None
    if data is not None:
        data.check_unknown()

    signing_table = root.table("signing")
    signing = _read_signing(signing_table) if signing_table is not None else SigningConfig()
    recovery_table = root.table("recovery")
    recovery = _read_recovery(recovery_table) if recovery_table is not None else RecoveryConfig()
    applier_table = root.table("applier")
    applier = read_applier(applier_table)
    boot, applier = read_boot(
        root.table("boot"),
        applier_table,
        applier,
        architecture=architecture.value,
        layout=layout,
        has_kernel=kernel is not None,
        recipe_path=path,
    )
    target_table = root.table("target")
    target = _read_target(target_table) if target_table is not None else TargetConfig()
    rollback = read_rollback(root.table("rollback"))
    fleet = read_fleet(root.table("fleet"))
    telemetry = read_telemetry(root.table("telemetry"), fleet)
    persist_table = root.table("persist")
    persist = _read_persist(persist_table, applier) if persist_table else PersistConfig()
    root.check_unknown()
    return Recipe(
        path=path,
        name=name,
        version=version,
        compatible=compatible,
        architecture=architecture,
        layout=layout,
        rootfs=rootfs_source,
        rootfs_files=files,
        rootfs_directories=directories,
        kernel=kernel,
        kernel_dest=kernel_dest,
        extensions=extensions,
        boot_tree=boot.tree,
        data_tree=data_tree,
        signing=signing,
        seed=seed,
        recovery=recovery,
        applier=applier,
        rollback=rollback,
        persist=persist,
        boot=boot,
        kernel_modules=kernel_modules,
        target=target,
        fleet=fleet,
        telemetry=telemetry,
    )


def _name_rule(what: str = "a name") -> str:
    return f"{what} of letters, digits and . _ + ~ : @ - (at most 128, starting alphanumeric)"


def _existing_dir(table: Table, key: str) -> Path:
    path = table.path_value(key)
    assert path is not None
    if not path.is_dir():
        table.fail(key, "an existing directory", str(path))
    return path


def _read_kernel_modules(table: Table) -> KernelModules:
    tree = table.path_value("modules", required=False)
    if tree is not None and not tree.is_dir():
        table.fail("modules", "an existing directory of kernel modules (lib/modules)", str(tree))
    names = table.string_list("initramfs-modules")
    for name in names:
        if not TOOL_NAME.fullmatch(name):
            table.fail("initramfs-modules", "kernel module names", name)
    return KernelModules(tree, tuple(names))


def _read_target(table: Table) -> TargetConfig:
    sysroot = table.path_value("sysroot", required=False)
    if sysroot is not None and not sysroot.is_dir():
        table.fail(
            "sysroot",
            "an existing directory of target binaries (scripts/fetch-sysroot DIR ARCH PACKAGE...)",
            str(sysroot),
        )
    table.check_unknown()
    return TargetConfig(sysroot)


def _read_tree_source(table: Table) -> TreeSource:
    """`tree = DIR` or `archive = FILE.tar[.gz|.zst|.xz]`, with `ownership` and `xattrs`."""
    has_tree, has_archive = "tree" in table, "archive" in table
    if has_tree == has_archive:
        table.fail(
            "tree",
            'either tree = "DIRECTORY" or archive = "FILE.tar[.gz|.zst|.xz]" (exactly one)',
        )
    if has_tree:
        path = _existing_dir(table, "tree")
        kind = TreeKind.DIRECTORY
    else:
        archive = table.path_value("archive")
        assert archive is not None
        if not archive.name.endswith(ARCHIVE_SUFFIXES):
            table.fail(
                "archive", "a tar archive named " + ", ".join(ARCHIVE_SUFFIXES), archive.name
            )
        if not archive.is_file():
            table.fail("archive", "an existing tar archive file", str(archive))
        path, kind = archive, TreeKind.ARCHIVE
    ownership = table.enum("ownership", Ownership, default=Ownership.PRESERVE)
    xattrs = table.boolean("xattrs", default=True)
    return TreeSource(path, kind, ownership, xattrs)


def _read_file_entry(table: Table) -> FileEntry:
    source = table.path_value("source")
    assert source is not None
    if not source.is_file():
        table.fail("source", "an existing file", str(source))
    dest = table.string("dest", pattern=_DEST_PATH, what="an absolute path inside the rootfs")
    if ".." in dest.split("/"):
        table.fail("dest", "a path without '..'", dest)
    mode_text = table.string("mode", default="0644")
    if not re.fullmatch(r"0?[0-7]{3,4}", mode_text):
        table.fail("mode", 'an octal file mode like "0755"', mode_text)
    table.check_unknown()
    return FileEntry(source, dest, int(mode_text, 8))


def _read_extension(table: Table) -> Extension:
    name = table.string("name", pattern=EXTENSION_NAME, what="an extension name (a-z, 0-9, _.-)")
    source = _read_tree_source(table)
    filesystem = table.enum(
        "filesystem", FsType, default=FsType.SQUASHFS, choices=(FsType.SQUASHFS, FsType.EROFS)
    )
    table.check_unknown()
    return Extension(name, source, filesystem)


_CONSOLE = re.compile(r"(ttyS|ttyAMA|ttyUSB|hvc|tty)[0-9]{1,2}(,[0-9]{4,7}(n8)?)?")


def _read_signing(table: Table) -> SigningConfig:
    single = table.path_value("key", required=False)
    keys = ([single] if single is not None else []) + table.file_list(
        "keys", "a private key file (PEM)"
    )
    uris = table.string_list("pkcs11")
    for index, uri in enumerate(uris):
        if not uri.startswith("pkcs11:"):
            table.fail(f"pkcs11[{index}]", 'a PKCS#11 URI ("pkcs11:token=…;object=…")', uri)
    module = table.path_value("pkcs11-module", required=False)
    if module is not None and not module.is_file():
        table.fail("pkcs11-module", "an existing PKCS#11 module (.so)", str(module))
    certificates = table.file_list("certificates", "a certificate file (PEM)")
    table.check_unknown()
    if not keys and not uris:
        table.fail("key", "key, keys or pkcs11 (or no [signing] table at all)")
    if len(set(keys)) != len(keys):
        table.fail("keys", "each key once", [str(key) for key in keys])
    return SigningConfig(tuple(keys), tuple(uris), module, tuple(certificates))


def _read_persist(table: Table, applier: ApplierConfig) -> PersistConfig:
    var = table.boolean("var", default=False)
    lists: dict[str, tuple[str, ...]] = {}
    for key in ("bind", "overlay", "tmpfs"):
        paths = []
        for path in table.string_list(key):
            cleaned = "/" + path.strip("/")
            if not _DEST_PATH.fullmatch(cleaned) or ".." in cleaned.split("/") or cleaned == "/":
                table.fail(key, "absolute paths inside the rootfs (not / itself, no '..')", path)
            paths.append(cleaned)
        lists[key] = tuple(paths)
    table.check_unknown()
    persist = PersistConfig(var, lists["bind"], lists["overlay"], lists["tmpfs"])
    chosen = persist.all_paths()
    for index, path in enumerate(chosen):
        for other in chosen[index + 1 :]:
            if path == other or other.startswith(path + "/") or path.startswith(other + "/"):
                table.fail("bind", f"paths that do not contain each other ({path}, {other})")
        data = applier.data_mount.rstrip("/")
        for mounted in (data, applier.esp_mount.rstrip("/")):
            if path == mounted or path.startswith(mounted + "/") or mounted.startswith(path + "/"):
                table.fail("bind", f"paths apart from the {mounted} mount point", path)
    return persist


_CMDLINE = re.compile(r"[A-Za-z0-9._,:=/@+-]+( [A-Za-z0-9._,:=/@+-]+)*|")


def _read_recovery(table: Table) -> RecoveryConfig:
    kernel = table.path_value("kernel", required=False)
    if kernel is not None and not kernel.is_file():
        table.fail("kernel", "an existing kernel image file", str(kernel))
    modules = table.path_value("modules", required=False)
    if modules is not None and not modules.is_dir():
        table.fail("modules", "an existing directory of kernel modules", str(modules))
    tools = table.enum_list("tools", ToolSet, default=(ToolSet.STORAGE,), what="tool sets")
    console = table.string(
        "console",
        default="ttyS0,115200",
        pattern=_CONSOLE,
        what='a serial console like "ttyS0,115200"',
    )
    cmdline = table.string(
        "cmdline",
        default="quiet",
        pattern=_CMDLINE,
        what="kernel parameters separated by single spaces (no quotes)",
    )
    firmware = table.path_value("firmware", required=False)
    if firmware is not None and not firmware.is_dir():
        table.fail("firmware", "an existing directory of firmware files", str(firmware))
    table.check_unknown()
    return RecoveryConfig(
        kernel=kernel,
        modules=modules,
        tools=tuple(dict.fromkeys(tools)),
        console=console,
        cmdline=cmdline,
        firmware=firmware,
    )
