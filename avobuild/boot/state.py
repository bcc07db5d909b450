"""Which slot boots, which slots are confirmed, and how many trial boots remain.

The state lives in the bootloader's environment so the bootloader itself can fall back to
the other slot when a trial boot fails `max_attempts` times, without any userspace help.
Variables (all prefixed `avo_`, documented in docs/architecture.md):

  avo_primary      slot the bootloader tries first: A or B
  avo_<S>_ok       1 when slot S booted and was confirmed, else 0
  avo_<S>_tries    trial boots left for an unconfirmed slot S
  avo_<S>_version  version installed in slot S ("" when empty; U-Boot drops empty
                   variables when it rewrites its environment, so absent means "")
  avo_compatible   compatible string of the device, checked against every bundle
  avo_security_version    the device's anti-rollback floor: bundles with a lower
                          security-version are refused (absent: 0)
  avo_<S>_security_version  security-version of the bundle installed in slot S (absent: 0);
                          confirming slot S raises the floor to it
  avo_<S>_incomplete      1 while an install into slot S is under way or was cut short
                          (absent otherwise): the slot holds no usable system
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from avobuild.errors import InstallError
from avobuild.model.layout import Slot

DEFAULT_MAX_ATTEMPTS = 3


@dataclass(frozen=True)
class SlotState:
    ok: bool
    tries: int
    version: str
    security_version: int = 0
    incomplete: bool = False


@dataclass(frozen=True)
class BootState:
    primary: Slot
    slots: dict[Slot, SlotState]
    compatible: str
    security_version: int = 0

    @property
    def active(self) -> Slot:
        """The slot running now (on a host image: the slot that would boot next)."""
        return self.primary

    @property
    def inactive(self) -> Slot:
        return self.primary.other

    def with_pending(
        self, slot: Slot, version: str, tries: int, security_version: int = 0
    ) -> BootState:
        """Make `slot` primary for trial boots; the current slot stays the fallback."""
        slots = dict(self.slots)
        slots[slot] = SlotState(
            ok=False, tries=tries, version=version, security_version=security_version
        )
        return replace(self, primary=slot, slots=slots)

    def with_incomplete(self, slot: Slot) -> BootState:
        """Mark `slot` as being written: unconfirmed, no tries, no version. An installer does
        this before its first write to the slot, so an interruption never leaves a slot
        that looks bootable or confirmed while it holds part of another system."""
        slots = dict(self.slots)
        slots[slot] = SlotState(ok=False, tries=0, version="", incomplete=True)
        return replace(self, slots=slots)

    def with_confirmed(self, slot: Slot) -> BootState:
        """Mark `slot` good; only now does the anti-rollback floor rise to its bundle's
        security version, so a failed trial boot can still fall back."""
        slots = dict(self.slots)
        slots[slot] = replace(slots[slot], ok=True, tries=0)
        floor = max(self.security_version, slots[slot].security_version)
        return replace(self, primary=slot, slots=slots, security_version=floor)

    def to_variables(self) -> dict[str, str]:
        variables = {"avo_primary": self.primary.value, "avo_compatible": self.compatible}
        for slot in Slot:
            state = self.slots[slot]
            variables[f"avo_{slot.value}_ok"] = "1" if state.ok else "0"
            variables[f"avo_{slot.value}_tries"] = str(state.tries)
            variables[f"avo_{slot.value}_version"] = state.version
            # Written only when set, so boot states without anti-rollback stay as they were.
            if state.security_version:
                variables[f"avo_{slot.value}_security_version"] = str(state.security_version)
            if state.incomplete:
                variables[f"avo_{slot.value}_incomplete"] = "1"
        if self.security_version:
            variables["avo_security_version"] = str(self.security_version)
        return variables

    @classmethod
    def from_variables(cls, variables: dict[str, str], source: str) -> BootState:
        def get(name: str) -> str:
            if name not in variables:
                raise InstallError(f"{source}: boot state variable {name} is missing")
            return variables[name]

        primary = get("avo_primary")
        if primary not in ("A", "B"):
            raise InstallError(f"{source}: avo_primary: expected A or B, got {primary!r}")

        def number(name: str) -> int:
            value = variables.get(name, "0")
            if not value.isdigit() or len(value) > 19:
                raise InstallError(f"{source}: {name}: expected a number, got {value!r}")
            return int(value)

        slots = {}
        for slot in Slot:
            tries = get(f"avo_{slot.value}_tries")
            if not tries.isdigit():
                raise InstallError(f"{source}: avo_{slot.value}_tries: expected a count")
            slots[slot] = SlotState(
                ok=get(f"avo_{slot.value}_ok") == "1",
                tries=int(tries),
                version=variables.get(f"avo_{slot.value}_version", ""),
                security_version=number(f"avo_{slot.value}_security_version"),
                incomplete=variables.get(f"avo_{slot.value}_incomplete") == "1",
            )
        return cls(Slot(primary), slots, get("avo_compatible"), number("avo_security_version"))


def factory_state(version: str, compatible: str) -> BootState:
    """Slot A holds the factory system and is confirmed; slot B is empty."""
    return BootState(
        primary=Slot.A,
        slots={
            Slot.A: SlotState(ok=True, tries=0, version=version),
            Slot.B: SlotState(ok=False, tries=0, version=""),
        },
        compatible=compatible,
    )


# Where the boot state lives on the boot partition (FAT). GRUB reads it with
# `load_env -f ($root)/avobuild/grubenv`; the installer rewrites it with mtools.
BOOT_STATE_PATH = "/avobuild/grubenv"
