"""Installation policy: what the signed manifest says a device must check before installing.

docs/signing.md, "Policy". Every check runs after the signature verified and before a byte is
written. The compatible string is an exact string or a glob pattern with `*` and `?` (the
meaning of a POSIX sh `case` pattern restricted to those two, so a shell applier matches it
with `case "$device" in $pattern)`); `security-version` is an anti-rollback counter compared
with the device's floor; `min-applier-version` is compared numerically, field by field;
`expires` is compared with the installer's clock.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from avobuild import __version__
from avobuild.boot.state import BootState
from avobuild.bundle.manifest import Manifest
from avobuild.errors import CompatibilityError

# The applier version of the host-side installer: the avobuild release that made it.
APPLIER_VERSION = __version__


def version_tuple(text: str) -> tuple[int, ...]:
    """'1.10.2' -> (1, 10, 2); trailing zero fields do not matter (1.2 == 1.2.0)."""
    numbers = [int(part) for part in text.split(".")]
    while len(numbers) > 1 and numbers[-1] == 0:
        numbers.pop()
    return tuple(numbers)


def compatible_matches(pattern: str, device: str) -> bool:
    return fnmatchcase(device, pattern)


def check_install_policy(
    manifest: Manifest,
    state: BootState,
    disk: Path,
    *,
    now: int | None = None,
    applier_version: str = APPLIER_VERSION,
    allow_downgrade: bool = False,
) -> None:
    """Refuse (CompatibilityError) a verified bundle this device must not install."""
    if not compatible_matches(manifest.compatible, state.compatible):
        kind = "pattern" if "*" in manifest.compatible or "?" in manifest.compatible else "string"
        raise CompatibilityError(
            f"bundle is for {manifest.compatible!r} ({kind}) but {disk} is "
            f"{state.compatible!r}; nothing was written"
        )
    check_security_floor(manifest, state.security_version, f"on {disk}")
    policy = manifest.policy
    if policy.min_applier_version is not None and version_tuple(applier_version) < version_tuple(
        policy.min_applier_version
    ):
        raise CompatibilityError(
            f"bundle {manifest.version} needs applier version {policy.min_applier_version} "
            f"or later, this is {applier_version}; nothing was written"
        )
    check_expiry(manifest, now)
    running = state.slots[state.active].version
    if not allow_downgrade and running and compare_versions(manifest.version, running) < 0:
        raise CompatibilityError(
            f"bundle {manifest.version} is older than {running}, which slot "
            f"{state.active.value} of {disk} runs (versions are ordered as docs/bundle-format.md "
            "3.7 says); pass --allow-downgrade to install it anyway; nothing was written"
        )


def check_security_floor(manifest: Manifest, floor: int, where: str) -> None:
    """Refuse a bundle whose security version (0 when absent) is below `floor`."""
    bundle_security = manifest.policy.security_version or 0
    if bundle_security < floor:
        raise CompatibilityError(
            f"bundle {manifest.version} has security version {bundle_security}, lower than "
            f"{floor} {where} (anti-rollback); nothing was written"
        )


def check_expiry(manifest: Manifest, now: int | None) -> None:
    """Refuse a bundle whose `expires` is before `now` (default: the clock)."""
    moment = int(time.time()) if now is None else now
    expires = manifest.policy.expires
    if expires is not None and moment > expires:
        raise CompatibilityError(
            f"bundle {manifest.version} expired at {expires} (seconds since 1970), it "
            f"is now {moment}; nothing was written"
        )


@dataclass(frozen=True)
class PolicyVerdict:
    """One policy line as `bundle verify` judged it: checked (and passed), or not checked."""

    line: str
    checked: bool
    why: str


def evaluate_policy(
    manifest: Manifest, *, now: int | None = None, security_floor: int | None = None
) -> tuple[PolicyVerdict, ...]:
    """What a verifier without a device can judge of the signed policy: `expires` against
    `now` (default: the clock) and `security-version` against `security_floor` when one is
    given. Refuses (CompatibilityError) what fails; says which lines it could not check."""
    policy = manifest.policy
    moment = int(time.time()) if now is None else now
    verdicts = [
        PolicyVerdict(f"compatible {manifest.compatible}", False, "it is the device's to match")
    ]
    security = policy.security_version
    shown_security = f"security-version {security if security is not None else '0 (absent)'}"
    if security_floor is None:
        verdicts.append(PolicyVerdict(shown_security, False, "no security floor was given"))
    else:
        check_security_floor(manifest, security_floor, "(the floor given)")
        verdicts.append(PolicyVerdict(shown_security, True, f"not below {security_floor}"))
    if policy.min_applier_version is not None:
        verdicts.append(
            PolicyVerdict(
                f"min-applier-version {policy.min_applier_version}",
                False,
                "it is the device's applier to compare",
            )
        )
    if policy.expires is not None:
        check_expiry(manifest, moment)
        verdicts.append(
            PolicyVerdict(f"expires {policy.expires}", True, f"not expired at {moment}")
        )
    return tuple(verdicts)


def compare_versions(left: str, right: str) -> int:
    """-1, 0 or 1 as `left` is older than, equal to or newer than `right`.

    The ordering of docs/bundle-format.md 3.7 (dpkg's, applied to the whole string): each
    version is cut into alternating runs of non-digits and digits; non-digit runs compare
    character by character, `~` below the end of the run, the end below letters, letters
    below every other character; digit runs compare as numbers. A missing run is empty (0).
    """
    left_runs, right_runs = _version_runs(left), _version_runs(right)
    length = max(len(left_runs), len(right_runs))
    left_runs += [("", 0)] * (length - len(left_runs))
    right_runs += [("", 0)] * (length - len(right_runs))
    for (left_text, left_number), (right_text, right_number) in zip(
        left_runs, right_runs, strict=True
    ):
        if left_text != right_text:
            return _compare_text(left_text, right_text)
        if left_number != right_number:
            return -1 if left_number < right_number else 1
    return 0


def _version_runs(version: str) -> list[tuple[str, int]]:
    """'1.0~rc2' -> [('', 1), ('.', 0), ('~rc', 2)]: each non-digit run with the number after."""
    return [
        (match.group(1), int(match.group(2) or "0"))
        for match in _VERSION_RUN.finditer(version)
        if match.group(0)
    ]


_VERSION_RUN = re.compile(r"([^0-9]*)([0-9]*)", re.ASCII)


def _character_weight(character: str) -> int:
    if character == "~":
        return -1
    if character.isascii() and character.isalpha():
        return ord(character)
    return ord(character) + 256


def _compare_text(left: str, right: str) -> int:
    for position in range(max(len(left), len(right))):
        left_weight = _character_weight(left[position]) if position < len(left) else 0
        right_weight = _character_weight(right[position]) if position < len(right) else 0
        if left_weight != right_weight:
            return -1 if left_weight < right_weight else 1
    return 0
