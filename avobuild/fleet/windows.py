"""Update windows: the daily times at which a device may be told to update.

A window is `HH:MM-HH:MM` in a time zone (`UTC` or an IANA name such as `Europe/Berlin`,
read from the system's zoneinfo). It is judged on the local wall clock of that zone: on a
day when the clocks jump, the window is the part of it the local clock shows (spring
forward shortens it, fall back lengthens it), as a person keeping the window by the clock
would expect. An end before the start crosses midnight (`22:00-02:00`); equal times mean
the whole day.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from avobuild.fleet.errors import RepositoryError

_WINDOW = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])-([01][0-9]|2[0-3]):([0-5][0-9])")
_ZONE = re.compile(r"[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+)*")
DAY_MINUTES = 24 * 60


@dataclass(frozen=True)
class UpdateWindow:
    """Minutes after local midnight: the window is [start, end), wrapping at midnight."""

    start: int
    end: int
    zone: str = "UTC"

    @property
    def text(self) -> str:
        return f"{_hhmm(self.start)}-{_hhmm(self.end)}"

    def local_minute(self, now: float) -> int:
        moment = datetime.fromtimestamp(now, UTC).astimezone(_zone(self.zone))
        return moment.hour * 60 + moment.minute

    def is_open(self, now: float) -> bool:
        return self._minutes_until_open(self.local_minute(now)) == 0

    def seconds_until_open(self, now: float) -> int:
        """0 when open; else the seconds until the local clock reaches the start (a lower
        bound on a day when the clocks jump)."""
        minute = self.local_minute(now)
        waiting = self._minutes_until_open(minute)
        if waiting == 0:
            return 0
        seconds_into_minute = int(now) % 60
        return max(1, waiting * 60 - seconds_into_minute)

    def _minutes_until_open(self, minute: int) -> int:
        if self.start == self.end:
            return 0
        if self.start < self.end:
            inside = self.start <= minute < self.end
        else:
            inside = minute >= self.start or minute < self.end
        return 0 if inside else (self.start - minute) % DAY_MINUTES


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise RepositoryError(
            f"time zone {name!r}: not found in the system's zoneinfo (Debian package tzdata)"
        ) from None


def parse_window(text: str, zone: str = "UTC", where: str = "window") -> UpdateWindow:
    """`HH:MM-HH:MM` in `zone`; RepositoryError naming `where` otherwise."""
    match = _WINDOW.fullmatch(text)
    if match is None:
        raise RepositoryError(f"{where}: expected HH:MM-HH:MM (24-hour clock), got {text!r}")
    if not _ZONE.fullmatch(zone):
        raise RepositoryError(f"{where}: time zone {zone!r} is not a zone name")
    _zone(zone)
    start = int(match.group(1)) * 60 + int(match.group(2))
    end = int(match.group(3)) * 60 + int(match.group(4))
    return UpdateWindow(start, end, zone)
