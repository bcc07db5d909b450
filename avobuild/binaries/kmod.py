"""Kernel modules for the device and recovery initramfs: with their dependencies, in load order.

Debian's linux-image package ships the modules without modules.dep (depmod runs on install),
so dependencies are read from each module's own `.modinfo` ELF section ("depends=a,b"), the
same data depmod uses. Module names treat '-' and '_' alike, as the kernel does. Modules
built into the kernel (modules.builtin) are satisfied already. The initramfs loads the result
with `insmod` in the order returned: every module after the modules it depends on.
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from avobuild.errors import BuildError

_VERSION = re.compile(rb"^[0-9]+\.[0-9]+[^\s\0]*")
# init/version.c's linux_banner, in the uncompressed kernel: "Linux version 6.1.0-57-arm64 (".
_BANNER = re.compile(rb"Linux version ([0-9]+\.[0-9]+[^\s\0]*) \(")
_BANNER_SCAN_LIMIT = 256 << 20  # bytes of (uncompressed) kernel searched for the banner


@dataclass(frozen=True)
class ModuleTree:
    """`<modules>/<version>/` of one kernel: module paths by normalised name."""

    root: Path
    version: str
    modules: dict[str, Path]
    builtin: frozenset[str]


def module_name(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


def kernel_release(kernel: Path) -> str | None:
    """The release string of a kernel image, or None when it cannot be told.

    An x86 bzImage names it in its boot protocol header (`kernel_version`); an arm64 or
    RISC-V Image (magic at 0x38) is uncompressed and carries init/version.c's banner
    ("Linux version RELEASE (…"), which is searched for, in a gzip-compressed Image
    (Image.gz) after decompression.
    """
    with kernel.open("rb") as handle:
        head = handle.read(0x210)
        if len(head) >= 0x210 and head[0x202:0x206] == b"HdrS":
            pointer = int.from_bytes(head[0x20E:0x210], "little")
            if pointer == 0:
                return None
            handle.seek(pointer + 0x200)
            match = _VERSION.match(handle.read(128))
            return match.group(0).decode() if match else None
        handle.seek(0)
        if head[0x38:0x3C] in (b"ARM\x64", b"RSC\x05"):
            return _banner_release(iter(lambda: handle.read(1 << 20), b""))
        if head[:2] == b"\x1f\x8b":
            return _banner_release(_gunzip_blocks(handle))
    return None


def _gunzip_blocks(handle: BinaryIO) -> Iterator[bytes]:
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    while block := handle.read(1 << 20):
        try:
            yield decompressor.decompress(block, 4 << 20)
            while decompressor.unconsumed_tail:
                yield decompressor.decompress(decompressor.unconsumed_tail, 4 << 20)
        except zlib.error:
            return
        if decompressor.eof:
            return


def _banner_release(blocks: Iterator[bytes]) -> str | None:
    """The release in the first linux_banner of a stream of kernel bytes."""
    carry = b""
    scanned = 0
    for block in blocks:
        window = carry + block
        match = _BANNER.search(window)
        if match:
            return match.group(1).decode(errors="replace")
        carry = window[-200:]
        scanned += len(block)
        if scanned > _BANNER_SCAN_LIMIT:
            break
    return None


def open_module_tree(modules: Path, kernel: Path) -> ModuleTree:
    """The module tree for `kernel` in `modules` (a `lib/modules` directory or a version in it)."""
    if (modules / "modules.order").is_file() or (modules / "kernel").is_dir():
        root = modules
    else:
        versions = sorted(entry.name for entry in modules.iterdir() if (entry / "kernel").is_dir())
        release = kernel_release(kernel)
        if release in versions:
            assert release is not None
            root = modules / release
        elif len(versions) == 1:
            root = modules / versions[0]
        else:
            raise BuildError(
                f"{modules}: expected one kernel version directory or one matching "
                f"{kernel} ({release or 'unknown release'}), found {versions or 'none'}"
            )
    release = kernel_release(kernel)
    if release is not None and release != root.name and (root / "kernel").is_dir():
        raise BuildError(
            f"{root}: modules are for {root.name} but {kernel} is Linux {release}; "
            "take kernel and modules from the same package (scripts/fetch-kernel)"
        )
    found: dict[str, Path] = {}
    for directory, _dirs, files in os.walk(root / "kernel"):
        for name in files:
            if ".ko" in name:
                found[module_name(name)] = Path(directory) / name
    builtin_file = root / "modules.builtin"
    builtin = frozenset(
        module_name(line.strip())
        for line in (builtin_file.read_text().splitlines() if builtin_file.is_file() else [])
        if line.strip()
    )
    return ModuleTree(root, root.name, dict(sorted(found.items())), builtin)


def module_dependencies(path: Path) -> list[str]:
    """The names in the module's `.modinfo` "depends=" entry."""
    if path.suffix != ".ko":
        raise BuildError(f"{path}: compressed modules are not supported (expected plain .ko)")
    try:
        with path.open("rb") as handle:
            section = ELFFile(handle).get_section_by_name(".modinfo")
            raw = section.data() if section is not None else b""
    except (ELFError, OSError) as error:
        raise BuildError(f"{path}: cannot read the module's .modinfo: {error}") from None
    for field in raw.split(b"\0"):
        if field.startswith(b"depends="):
            value = field[len(b"depends=") :].decode()
            return [module_name(name) for name in value.split(",") if name]
    return []


def resolve_modules(tree: ModuleTree, wanted: list[str]) -> list[Path]:
    """`wanted` and their dependencies as module files, dependencies first.

    A wanted module that is built into the kernel needs no file; one that exists neither as a
    file nor built in is an error naming it.
    """
    order: list[Path] = []
    state: dict[str, str] = {}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if state.get(name) == "done" or name in tree.builtin:
            return
        if state.get(name) == "visiting":
            raise BuildError(f"{tree.root}: module dependency cycle: {' -> '.join(chain)}")
        path = tree.modules.get(name)
        if path is None:
            raise BuildError(
                f"{tree.root}: kernel module {name} (wanted via {' -> '.join(chain)}) is "
                "neither a module file nor built into the kernel"
            )
        state[name] = "visiting"
        for dependency in sorted(module_dependencies(path)):
            visit(dependency, (*chain, dependency))
        state[name] = "done"
        order.append(path)

    for name in wanted:
        visit(module_name(name), (module_name(name),))
    return order
