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
