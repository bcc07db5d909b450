"""Real machine code for delta tests: the host's own x86-64 ELF files, and an edit that
changes them the way recompiling does (tests/test_delta_v2.py, tests/test_device_lifecycle.py)."""

from __future__ import annotations

import random
import re
from pathlib import Path


def host_elf_files(count: int) -> list[Path]:
    """The first `count` x86-64 ELF executables of 60-400 KB in /usr/bin (sorted by name),
    then /usr/lib: real machine code, different on every Debian release but always there."""
    found = []
    for directory in (Path("/usr/bin"), Path("/usr/lib/x86_64-linux-gnu")):
        for path in sorted(directory.iterdir()):
            if path.is_symlink() or not path.is_file():
                continue
            if not 60_000 <= path.stat().st_size <= 400_000:
                continue
            with path.open("rb") as handle:
                header = handle.read(20)
            if header[:4] == b"\x7fELF" and header[18:20] == (62).to_bytes(2, "little"):
                found.append(path)
            if len(found) == count:
                return found
    return found


def recompile(rng: random.Random, data: bytes) -> bytes:
    """Code inserted at a point: every x86 CALL (E8 rel32) before it whose target lies after
    it, and after it whose target lies before it, changes its displacement, as a compiler's
    output does when one function grows."""
    out = bytearray(data)
    point = rng.randrange(len(out) // 4, 3 * len(out) // 4)
    grow = rng.randrange(16, 400)
    for match in re.finditer(rb"\xe8", bytes(out)):
        at = match.start()
        if at + 5 > len(out):
            break
        target = at + 5 + int.from_bytes(out[at + 1 : at + 5], "little", signed=True)
        if not 0 <= target < len(out):
            continue
        shift = (grow if target >= point else 0) - (grow if at >= point else 0)
        if shift:
            value = (target - at - 5 + shift) & 0xFFFFFFFF
            out[at + 1 : at + 5] = value.to_bytes(4, "little")
    out[point:point] = rng.randbytes(grow)
    return bytes(out)


ARM64_SYSROOT = Path(__file__).resolve().parent.parent / "build" / "debian-arm64" / "sysroot"


def arm64_elf_files(count: int, sysroot: Path = ARM64_SYSROOT) -> list[Path]:
    """The first `count` AArch64 ELF files of 100 KB to 1.5 MB in the arm64 sysroot's library
    directories (sorted by name): the device's own machine code, from Debian's packages."""
    found = []
    for directory in (sysroot / "usr/lib/aarch64-linux-gnu", sysroot / "lib/aarch64-linux-gnu"):
        if not directory.is_dir():
            continue
        for path in sorted(directory.iterdir()):
            if path.is_symlink() or not path.is_file():
                continue
            if not 100_000 <= path.stat().st_size <= 1_500_000:
                continue
            with path.open("rb") as handle:
                header = handle.read(20)
            if header[:4] == b"\x7fELF" and header[18:20] == (183).to_bytes(2, "little"):
                found.append(path)
            if len(found) == count:
                return found
    return found


_BRANCH_MASK = 0x7C000000  # B and BL: bits 30..26 are 00101, bit 31 tells BL from B
_BRANCH = 0x14000000


def recompile_arm64(rng: random.Random, data: bytes, points: int = 6) -> bytes:
    """The AArch64 counterpart of `recompile`, at several places as a compiler's output of a
    changed source tree: whole instructions inserted at `points` word-aligned points, and
    every B/BL (imm26, in words) whose branch crosses them retargeted."""
    out = bytearray(data)
    for _ in range(points):
        point = rng.randrange(len(out) // 16, 3 * len(out) // 16) * 4
        grow = rng.randrange(4, 100) * 4
        for at in range(0, len(out) - 3, 4):
            word = int.from_bytes(out[at : at + 4], "little")
            if word & _BRANCH_MASK != _BRANCH:
                continue
            displacement = word & 0x3FFFFFF
            if displacement & 0x2000000:
                displacement -= 0x4000000
            target = at + 4 * displacement
            if not 0 <= target < len(out):
                continue
            shift = (grow if target >= point else 0) - (grow if at >= point else 0)
            if shift:
                moved = (displacement + shift // 4) & 0x3FFFFFF
                out[at : at + 4] = ((word & ~0x3FFFFFF) | moved).to_bytes(4, "little")
        out[point:point] = rng.randbytes(grow)
    return bytes(out)
