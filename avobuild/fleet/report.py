"""The fleet report: per release and channel, how an update went (docs/fleet.md, "Reports").

Counts are of distinct devices. A device is *offered* a release when a check answered it
with that release; it *downloaded*, *installed* (applied) and *confirmed* when it reported a
successful `download`, `apply` and `confirm` event; *rolled back* when it reported a
`rollback`. It *tried* the release when it reported any install step (apply, boot,
validation, confirm or rollback) and *failed* when one of those failed or it rolled back;
the success rate is confirmed / tried, and the failure rate, which halts a rollout
(`rollouts.failure-threshold`), is failed / tried. Median times are over the successful
events of each kind. The window is the server's receive time (device clocks may be wrong),
and offers by the time they were first made.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from avobuild.fleet.store import EventRow, Halt, OfferRow
from avobuild.fleet.telemetry import EventType, Result, counts_as_failure, counts_as_install


@dataclass(frozen=True)
class ReleaseReport:
    version: str
    channel: str
    offered: int
    downloaded: int
    installed: int
    confirmed: int
    rolled_back: int
    tried: int
    failed: int
    success_rate: float | None  # percent
    median_download: float | None  # seconds
    median_apply: float | None
    median_boot: float | None
    halted: str | None  # the reason, when the failure threshold stopped the release


@dataclass(frozen=True)
class FleetReport:
    start: int
    end: int
    releases: tuple[ReleaseReport, ...]


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def build_report(
    events: Sequence[EventRow],
    offers: Sequence[OfferRow],
    halts: Sequence[Halt],
    start: int,
    end: int,
) -> FleetReport:
    keys = {(row.version, row.channel) for row in events} | {
        (row.version, row.channel) for row in offers
    }
    halted = {(halt.version, halt.channel): halt.reason for halt in halts}
    releases = []
    for version, channel in sorted(keys, key=lambda key: (key[1], key[0])):
        rows = [row for row in events if (row.version, row.channel) == (version, channel)]

        def devices(kind: str, rows: list[EventRow] = rows) -> set[str]:
            return {row.device for row in rows if row.type == kind and row.result == Result.OK}

        def times(kind: str, rows: list[EventRow] = rows) -> list[float]:
            return [
                row.duration
                for row in rows
                if row.type == kind and row.result == Result.OK and row.duration is not None
            ]

        tried = {row.device for row in rows if counts_as_install(row.type)}
        failed = {row.device for row in rows if counts_as_failure(row.type, row.result)}
        confirmed = devices(EventType.CONFIRM)
        releases.append(
            ReleaseReport(
                version=version,
                channel=channel,
                offered=len(
                    {o.device for o in offers if (o.version, o.channel) == (version, channel)}
                ),
                downloaded=len(devices(EventType.DOWNLOAD)),
                installed=len(devices(EventType.APPLY)),
                confirmed=len(confirmed),
                rolled_back=len({row.device for row in rows if row.type == EventType.ROLLBACK}),
                tried=len(tried),
                failed=len(failed),
                success_rate=100.0 * len(confirmed & tried) / len(tried) if tried else None,
                median_download=_median(times(EventType.DOWNLOAD)),
                median_apply=_median(times(EventType.APPLY)),
                median_boot=_median(times(EventType.BOOT)),
                halted=halted.get((version, channel)),
            )
        )
    return FleetReport(start, end, tuple(releases))
