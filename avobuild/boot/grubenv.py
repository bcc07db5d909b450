"""GRUB environment blocks (`grubenv`): the file `load_env`/`save_env` read and rewrite.

The format is GRUB's own (grub-core/lib/envblk.c): exactly 1024 bytes, starting with the line
"# GRUB Environment Block", then `name=value` lines, the rest filled with '#'. GRUB rewrites
the block in place, so its size must never change. Values here never contain newlines or
backslashes (GRUB would escape them), which keeps the block readable by busybox tools too.
"""

from __future__ import annotations

import re

from avobuild.errors import InstallError

GRUBENV_SIZE = 1024
_HEADER = b"# GRUB Environment Block\n"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_VALUE = re.compile(r"[^\n\\]*")


def render_grubenv(variables: dict[str, str]) -> bytes:
    """A 1024-byte environment block holding `variables` in the given order."""
    body = bytearray(_HEADER)
    for name, value in variables.items():
        if not _NAME.fullmatch(name) or not _VALUE.fullmatch(value):
            raise ValueError(f"grubenv cannot hold {name}={value!r}")
        body += f"{name}={value}\n".encode()
    if len(body) > GRUBENV_SIZE:
        raise ValueError(f"grubenv variables need {len(body)} bytes, more than {GRUBENV_SIZE}")
    return bytes(body) + b"#" * (GRUBENV_SIZE - len(body))


def parse_grubenv(data: bytes, source: str = "grubenv") -> dict[str, str]:
    """The variables of an environment block; `InstallError` if it is not one."""
    if len(data) != GRUBENV_SIZE or not data.startswith(_HEADER):
        raise InstallError(
            f"{source}: not a GRUB environment block (expected {GRUBENV_SIZE} bytes "
            f"starting with {_HEADER.strip().decode()!r}, got {len(data)} bytes)"
        )
    variables: dict[str, str] = {}
    for line in data[len(_HEADER) :].split(b"\n"):
        if not line or line.startswith(b"#"):
            continue
        name, sep, value = line.partition(b"=")
        if not sep:
            raise InstallError(f"{source}: malformed line {line[:40]!r}")
        variables[name.decode(errors="replace")] = value.decode(errors="replace")
    return variables
