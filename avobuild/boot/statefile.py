"""The boot state file on a disk image's FAT boot partition, in whichever format it is.

GRUB devices keep `/avobuild/grubenv` (a GRUB environment block); U-Boot devices keep
`/uboot.env` (a U-Boot environment image, read by the boot script with `env import` and
written with `env export` + `fatwrite`, docs/applier.md). The host-side installer and
`avobuild status` read and rewrite either, so a factory image can be preloaded with an
update whatever its boot loader. Variables that are not part of the boot state are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from avobuild.boot.grubenv import parse_grubenv, render_grubenv
from avobuild.boot.state import BOOT_STATE_PATH, BootState
from avobuild.boot.uboot import read_uboot_env, render_uboot_env
from avobuild.errors import InstallError, ToolFailed
from avobuild.fs import read_vfat_file, write_vfat_file

UBOOT_STATE_PATH = "/uboot.env"


@dataclass(frozen=True)
class StateFile:
    """Where the state was found, its variables as read and the file's size."""

    path: str
    variables: dict[str, str]
    size: int

    @property
    def uboot(self) -> bool:
        return self.path == UBOOT_STATE_PATH


def read_state_file(image: Path, offset: int, where: str) -> StateFile:
    """The boot state file of the FAT filesystem at `offset`; `where` names the partition."""
    for path in (BOOT_STATE_PATH, UBOOT_STATE_PATH):
        try:
            data = read_vfat_file(image, offset, path)
        except ToolFailed:
            continue
        source = f"{where}: {path}"
        if path == BOOT_STATE_PATH:
            return StateFile(path, parse_grubenv(data, source), len(data))
        try:
            return StateFile(path, read_uboot_env(data), len(data))
        except InstallError as error:
            raise InstallError(f"{source}: {error}") from None
    raise InstallError(
        f"{where}: no boot state: neither {BOOT_STATE_PATH} (GRUB) nor {UBOOT_STATE_PATH} "
        "(U-Boot) is on the boot partition"
    )


def read_state(image: Path, offset: int, where: str) -> BootState:
    found = read_state_file(image, offset, where)
    return BootState.from_variables(found.variables, f"{where}: {found.path}")


def write_state(image: Path, offset: int, where: str, state: BootState) -> None:
    """Rewrite the boot state file in the format it has, keeping other variables."""
    found = read_state_file(image, offset, where)
    # The state first, in its own order (what the on-target applier writes too), then the rest.
    variables = state.to_variables()
    for name, value in found.variables.items():
        if not name.startswith("avo_"):
            variables[name] = value
    data = render_uboot_env(variables, found.size) if found.uboot else render_grubenv(variables)
    write_vfat_file(image, offset, found.path, data)
