"""Architecture checks: every ELF binary of a rootfs and the kernel must suit the target.

A rootfs that mixes architectures boots into "exec format error" on the device, long after
the bundle was signed and shipped, so the build refuses it. ELF headers are read with
pyelftools; kernels are usually not ELF files, so their boot headers are checked instead
(x86 boot protocol "HdrS" at 0x202, arm64 Image "ARM\\x64" at 0x38, RISC-V "RSC\\x05" at 0x38).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.enums import ENUM_E_MACHINE

from avobuild.errors import BuildError
from avobuild.model.recipe import Architecture

# ELF e_machine names (as pyelftools spells them) and class accepted per architecture.
_ELF_MACHINE = {
    Architecture.X86_64: ("EM_X86_64", 64),
    Architecture.AARCH64: ("EM_AARCH64", 64),
    Architecture.ARM: ("EM_ARM", 32),
    Architecture.RISCV64: ("EM_RISCV", 64),
    Architecture.I686: ("EM_386", 32),
}
_ELF_MAGIC = b"\x7fELF"


@dataclass(frozen=True)
class ElfMismatch:
    path: Path
    machine: str
    elfclass: int


def iter_elf_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Regular files (not symlinks) under the given files and directories that start like ELF."""
    for root in paths:
        candidates = [root] if root.is_file() else sorted(_walk_files(root))
        for candidate in candidates:
            if candidate.is_symlink() or not candidate.is_file():
                continue
            with candidate.open("rb") as handle:
                if handle.read(4) == _ELF_MAGIC:
                    yield candidate


def _walk_files(root: Path) -> Iterator[Path]:
    for directory, _dirs, files in os.walk(root):
        for name in files:
            yield Path(directory) / name


def find_foreign_binaries(paths: Iterable[Path], architecture: Architecture) -> list[ElfMismatch]:
    """Every ELF file whose machine or class does not match `architecture`."""
    want_machine, want_class = _ELF_MACHINE[architecture]
    mismatches = []
    for path in iter_elf_files(paths):
        with path.open("rb") as handle:
            try:
                elf = ELFFile(handle)
                machine, elfclass = str(elf["e_machine"]), int(elf.elfclass)
            except (ELFError, ValueError, KeyError) as error:
                raise BuildError(f"{path}: looks like ELF but cannot be read: {error}") from None
        if machine != want_machine or elfclass != want_class:
            mismatches.append(ElfMismatch(path, machine, elfclass))
    return mismatches


def check_binaries(paths: Iterable[Path], architecture: Architecture) -> None:
    """Raise `BuildError` listing binaries built for another architecture."""
    _raise_mismatches(find_foreign_binaries(paths, architecture), architecture)


def _raise_mismatches(mismatches: list[ElfMismatch], architecture: Architecture) -> None:
    if mismatches:
        shown = "\n".join(f"  {m.path}: {m.machine} ({m.elfclass}-bit)" for m in mismatches[:10])
        more = f"\n  ... and {len(mismatches) - 10} more" if len(mismatches) > 10 else ""
        raise BuildError(
            f"{len(mismatches)} binaries are not built for {architecture.value}:\n{shown}{more}"
        )


def check_elf_heads(
    heads: Iterable[tuple[str, bytes]], architecture: Architecture, where: str
) -> None:
    """Like `check_binaries` for files known only by their first bytes (at least 20).

    The trees and archives of a recipe are read once; each regular file's head comes from
    that pass, and only the ELF identification and e_machine are needed to judge it.
    """
    want_machine, want_class = _ELF_MACHINE[architecture]
    want_number = ENUM_E_MACHINE[want_machine]
    names = {number: name for name, number in ENUM_E_MACHINE.items()}
    mismatches = []
    for path, head in heads:
        if head[:4] != _ELF_MAGIC:
            continue
        if len(head) < 20 or head[4] not in (1, 2) or head[5] not in (1, 2):
            raise BuildError(f"{where}/{path}: looks like ELF but cannot be read (bad header)")
        elfclass = 32 if head[4] == 1 else 64
        machine = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
        if machine != want_number or elfclass != want_class:
            label = names.get(machine, f"machine {machine}")
            mismatches.append(ElfMismatch(Path(where) / path, str(label), elfclass))
    _raise_mismatches(mismatches, architecture)


def check_kernel(path: Path, architecture: Architecture) -> None:
    """Raise `BuildError` unless `path` looks like a kernel image for `architecture`."""
    with path.open("rb") as handle:
        head = handle.read(0x240)
    if head[:4] == _ELF_MAGIC:
        check_binaries([path], architecture)
        return
    if architecture in (Architecture.X86_64, Architecture.I686):
        ok = head[0x202:0x206] == b"HdrS"
        expected = 'an x86 bzImage (boot protocol signature "HdrS" at offset 0x202)'
    elif architecture is Architecture.AARCH64:
        ok = head[0x38:0x3C] == b"ARM\x64"
        expected = 'an arm64 Image (magic "ARM\\x64" at offset 0x38)'
    elif architecture is Architecture.RISCV64:
        ok = head[0x38:0x3C] == b"RSC\x05"
        expected = 'a RISC-V Image (magic "RSC\\x05" at offset 0x38)'
    else:
        # 32-bit ARM zImages carry their magic 0x016f2818 at offset 0x24.
        ok = head[0x24:0x28] == bytes.fromhex("18286f01")
        expected = "an ARM zImage (magic 0x016f2818 at offset 0x24)"
    if not ok:
        raise BuildError(f"{path}: not a kernel for {architecture.value}: expected {expected}")
