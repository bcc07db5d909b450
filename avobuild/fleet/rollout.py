"""Phased rollouts: which release a device is offered (docs/repository-format.md, section 6).

The rule is a function of the signed index and the device's own identity, so a device reading
a static repository and `avobuild serve` reach the same answer:

* the bucket of a device for a release is
  `int(sha256("avobuild-rollout 1 <version> <device-id>")[0:8 hex digits], 16) mod 10000`;
  a rollout of N basis points (N/100 %) includes the devices whose bucket is below N, so
  widening a rollout only ever adds devices, and each release picks its own first devices;
* a channel lists its rollouts newest promotion first; a device takes the first rollout whose
  release it may install (compatible pattern) and whose phase includes it, and the server
  skips releases it halted;
* the device is offered that release unless it already runs it or a newer promotion of the
  channel, so a halt or a narrower phase never makes the server offer a downgrade;
* with it, the delta from the device's version when the index has one that is smaller than
  the full bundle.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from dataclasses import dataclass
from enum import StrEnum

from avobuild.fleet.index import BASIS_POINTS, Index, IndexDelta, IndexRelease

BUCKET_DOMAIN = "avobuild-rollout 1"


def bucket(device_id: str, version: str) -> int:
    """The device's bucket for a release, 0 to 9999."""
    digest = hashlib.sha256(f"{BUCKET_DOMAIN} {version} {device_id}".encode()).hexdigest()
    return int(digest[:8], 16) % BASIS_POINTS


def in_phase(device_id: str, version: str, basis_points: int) -> bool:
    return bucket(device_id, version) < basis_points


class Reason(StrEnum):
    """Why a device is not offered an update (the `reason` of a check answer)."""

    CURRENT = "current"  # it runs the release it would be offered, or a newer one
    ROLLOUT = "rollout"  # a release exists for it, but its phase does not include the device yet
    HALTED = "halted"  # the release for it was stopped by the failure threshold
    NO_RELEASE = "no-release"  # the channel has no release for its compatible string
    WINDOW = "window"  # an update waits, but the device's update window is closed


@dataclass(frozen=True)
class Offer:
    """The outcome for one device: a release (and a delta from its version) or a reason."""

    release: IndexRelease | None
    delta: IndexDelta | None = None
    reason: Reason | None = None
    # The release that would be offered, had its rollout or window allowed it.
    pending: IndexRelease | None = None


def choose_offer(
    index: Index,
    device_id: str,
    compatible: str,
    version: str,
    channel: str,
    halted: Collection[str] = (),
) -> Offer:
    """The release `device_id` (running `version` on `compatible`) is offered in `channel`.

    `halted` names versions the server stopped in this channel; a static repository has none.
    """
    pending: tuple[int, IndexRelease] | None = None
    halt: int | None = None
    installed: int | None = None
    chosen: tuple[int, IndexRelease] | None = None
    for position, rollout in enumerate(index.channel(channel)):
        release = index.release(rollout.version, compatible)
        if release is None:
            continue
        if release.version == version and installed is None:
            installed = position
        if chosen is not None:
            continue
        if rollout.version in halted:
            halt = position if halt is None else halt
        elif in_phase(device_id, rollout.version, rollout.basis_points):
            chosen = (position, release)
        elif pending is None:
            pending = (position, release)
    if chosen is None or (installed is not None and installed <= chosen[0]):
        # Why not: a newer release than the device's waits for its phase, or was halted.
        if pending is not None and (installed is None or pending[0] < installed):
            return Offer(None, reason=Reason.ROLLOUT, pending=pending[1])
        if halt is not None and (installed is None or halt < installed):
            return Offer(None, reason=Reason.HALTED)
        if chosen is not None or installed is not None:
            return Offer(None, reason=Reason.CURRENT)
        return Offer(None, reason=Reason.NO_RELEASE)
    release = chosen[1]
    delta = index.delta(compatible, version, release.version)
    # A delta is worth it only when it is smaller than the full bundle.
    return Offer(release, delta if delta is not None and delta.size < release.size else None)
