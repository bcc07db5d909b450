"""Installation policy: what the signed manifest says a device must check before installing.

docs/signing.md, "Policy". Every check runs after the signature verified and before a byte is
written. The compatible string is an exact string or a glob pattern with `*` and `?` (the
meaning of a POSIX sh `case` pattern restricted to those two, so a shell applier matches it
with `case "$device" in $pattern)`); `security-version` is an anti-rollback counter compared
with the device's floor; `min-applier-version` is compared numerically, field by field;
`expires` is compared with the installer's clock.
"""

from __future__ import annotations

import time
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
) -> None:
    """Refuse (CompatibilityError) a verified bundle this device must not install."""
    if not compatible_matches(manifest.compatible, state.compatible):
        kind = "pattern" if "*" in manifest.compatible or "?" in manifest.compatible else "string"
        raise CompatibilityError(
            f"bundle is for {manifest.compatible!r} ({kind}) but {disk} is "
            f"{state.compatible!r}; nothing was written"
        )
    policy = manifest.policy
    bundle_security = policy.security_version or 0
    if bundle_security < state.security_version:
        raise CompatibilityError(
            f"bundle {manifest.version} has security version {bundle_security}, lower than "
            f"{state.security_version} on {disk} (anti-rollback); nothing was written"
        )
    if policy.min_applier_version is not None and version_tuple(applier_version) < version_tuple(
        policy.min_applier_version
    ):
        raise CompatibilityError(
            f"bundle {manifest.version} needs applier version {policy.min_applier_version} "
            f"or later, this is {applier_version}; nothing was written"
        )
    moment = int(time.time()) if now is None else now
    if policy.expires is not None and moment > policy.expires:
        raise CompatibilityError(
            f"bundle {manifest.version} expired at {policy.expires} (seconds since 1970), it "
            f"is now {moment}; nothing was written"
        )
