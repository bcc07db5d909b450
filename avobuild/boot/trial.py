"""The trial-boot decision the rendered bootloader scripts make, as a Python model.

grub.cfg (avobuild/applier/templates/grub.cfg.j2) and U-Boot's boot.cmd (boot.cmd.j2) both
implement this rule on the boot state of docs/architecture.md:

* the primary slot is confirmed (`avo_<S>_ok=1`): boot it;
* it is unconfirmed with tries left: spend one (`save_env`/`saveenv`) and boot it;
* it is unconfirmed with no tries left: boot the other slot (the fallback).

Tests play the bootloader with `trial_boot` on the same environment file the applier writes;
docs/applier.md explains the mapping line by line.
"""

from __future__ import annotations

from avobuild.model.layout import Slot


def trial_boot(variables: dict[str, str]) -> tuple[Slot, dict[str, str]]:
    """The slot the bootloader boots and the environment it saves before booting it."""
    saved = dict(variables)
    primary = Slot.B if variables.get("avo_primary") == "B" else Slot.A
    if variables.get(f"avo_{primary.value}_ok") == "1":
        return primary, saved
    tries = variables.get(f"avo_{primary.value}_tries", "")
    if tries in {str(count) for count in range(1, 10)}:
        saved[f"avo_{primary.value}_tries"] = str(int(tries) - 1)
        return primary, saved
    return primary.other, saved
