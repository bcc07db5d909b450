"""U-Boot environment images: what `fw_printenv`/`fw_setenv` and U-Boot's `saveenv` read and write.

Layout of one copy of `size` bytes (U-Boot's include/env_internal.h, `env_t`):

    offset 0   CRC32 (IEEE, little endian) of the data area
    offset 4   flags byte -- only with a redundant environment (two copies)
    then       data: "name=value" strings, each NUL-terminated, ended by an extra NUL,
               padded to the end of the copy with 0xff (what mkenvimage writes)

With a redundant environment the two copies live at two offsets (two lines in
fw_env.config); the valid copy with the newer flags value is current. The flags byte is a
counter that wraps at 255: a writer writes the *other* copy with flags+1, so a power cut
during the write leaves the previous copy valid. `render_uboot_env` makes one copy;
`render_redundant_pair` makes both copies of a fresh environment.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass

from avobuild.errors import InstallError

_NAME = re.compile(r"[^=\x00\s]+")
PAD_BYTE = 0xFF


@dataclass(frozen=True)
class UbootEnvCopy:
    variables: dict[str, str]
    flags: int | None
    crc_ok: bool


def _header_size(redundant: bool) -> int:
    return 5 if redundant else 4


def render_uboot_env(
    variables: dict[str, str], size: int, *, redundant: bool = False, flags: int = 1
) -> bytes:
    """One environment copy of exactly `size` bytes holding `variables` in the given order."""
    data = bytearray()
    for name, value in variables.items():
        if not _NAME.fullmatch(name) or "\x00" in value:
            raise ValueError(f"a U-Boot environment cannot hold {name}={value!r}")
        data += f"{name}={value}".encode() + b"\x00"
    data += b"\x00"
    room = size - _header_size(redundant)
    if len(data) > room:
        raise ValueError(f"the environment needs {len(data)} bytes, more than {room}")
    data += bytes([PAD_BYTE]) * (room - len(data))
    header = struct.pack("<I", zlib.crc32(data) & 0xFFFFFFFF)
    if redundant:
        header += bytes([flags & 0xFF])
    return header + bytes(data)


def render_redundant_pair(variables: dict[str, str], size: int) -> tuple[bytes, bytes]:
    """Both copies of a fresh redundant environment: the first current (flags 1), the
    second an older copy of the same variables (flags 0)."""
    return (
        render_uboot_env(variables, size, redundant=True, flags=1),
        render_uboot_env(variables, size, redundant=True, flags=0),
    )


def parse_uboot_copy(data: bytes, *, redundant: bool = False) -> UbootEnvCopy:
    """The variables of one copy and whether its CRC holds."""
    header = _header_size(redundant)
    if len(data) <= header:
        raise InstallError(f"U-Boot environment copy of {len(data)} bytes is too small")
    (crc,) = struct.unpack("<I", data[:4])
    body = data[header:]
    variables: dict[str, str] = {}
    for entry in body.split(b"\x00"):
        if not entry:
            break
        name, sep, value = entry.partition(b"=")
        if not sep:
            raise InstallError(f"U-Boot environment: malformed entry {entry[:40]!r}")
        variables[name.decode(errors="replace")] = value.decode(errors="replace")
    return UbootEnvCopy(
        variables=variables,
        flags=data[4] if redundant else None,
        crc_ok=zlib.crc32(body) & 0xFFFFFFFF == crc,
    )


def _newer(a: int, b: int) -> bool:
    """Flags counters wrap: 0 is newer than 255."""
    difference = (a - b) & 0xFF
    return 0 < difference < 128


def read_uboot_env(first: bytes, second: bytes | None = None) -> dict[str, str]:
    """The current environment: the only copy, or the valid, newer copy of a redundant pair."""
    if second is None:
        copy = parse_uboot_copy(first)
        if not copy.crc_ok:
            raise InstallError("U-Boot environment: CRC mismatch (the environment is not valid)")
        return copy.variables
    copies = [parse_uboot_copy(data, redundant=True) for data in (first, second)]
    valid = [copy for copy in copies if copy.crc_ok]
    if not valid:
        raise InstallError("U-Boot environment: both redundant copies fail their CRC")
    if len(valid) == 2:
        a, b = valid
        assert a.flags is not None and b.flags is not None
        return b.variables if _newer(b.flags, a.flags) else a.variables
    return valid[0].variables
