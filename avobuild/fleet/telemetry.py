"""Telemetry from devices: the events of the documentation's `update-telemetry.yaml`.

`POST /telemetry` carries a JSON object `{"events": [...]}` (docs/fleet.md, "Telemetry"),
each event one of

| type         | collects (update-telemetry.yaml) | fields beyond id, type, time, version |
|--------------|----------------------------------|----------------------------------------|
| `download`   | download_time                    | result, duration, bytes, delta, from  |
| `apply`      | apply_time                       | result, duration, from                |
| `boot`       | boot_time                        | result, duration                      |
| `validation` | validation_results               | result, detail                        |
| `confirm`    | (the update is confirmed)        | result                                |
| `rollback`   | rollback_events                  | detail (the reason)                   |
| `error`      | error_logs                       | detail                                |

The body is hostile input: it is bounded in size before it is parsed, parsed strictly (no
duplicate keys, no NaN, no unknown fields, every value checked against its grammar), and
refused whole if any event is wrong, so a device learns which event to fix and the store
never holds half a report. Each event carries an `id` chosen by the device; the store
keeps the first copy of every (device, id), so a device may resend after a lost answer and
nothing is counted twice.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from avobuild.fleet.index import CHANNEL, IDENTIFIER, MAX_DECIMAL

EVENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}", re.ASCII)
MAX_DETAIL = 4096
MAX_DURATION = 10_000_000.0  # seconds: about 115 days
_DETAIL_FORBIDDEN = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class EventType(StrEnum):
    DOWNLOAD = "download"
    APPLY = "apply"
    BOOT = "boot"
    VALIDATION = "validation"
    CONFIRM = "confirm"
    ROLLBACK = "rollback"
    ERROR = "error"


class Result(StrEnum):
    OK = "ok"
    FAILED = "failed"


# Fields each type may carry besides id, type, time, version and channel.
_FIELDS: dict[EventType, frozenset[str]] = {
    EventType.DOWNLOAD: frozenset({"result", "duration", "bytes", "delta", "from"}),
    EventType.APPLY: frozenset({"result", "duration", "from"}),
    EventType.BOOT: frozenset({"result", "duration"}),
    EventType.VALIDATION: frozenset({"result", "detail"}),
    EventType.CONFIRM: frozenset({"result"}),
    EventType.ROLLBACK: frozenset({"detail", "from"}),
    EventType.ERROR: frozenset({"detail", "result"}),
}
_COMMON = frozenset({"id", "type", "time", "version", "channel"})
# Events that say a device installed a release, and so count toward its failure rate
# (rollouts.failure-threshold). Downloads and error logs do not: a failed download is the
# network's fault as often as the release's, and error logs are free-form.
INSTALL_TYPES = frozenset(
    {EventType.APPLY, EventType.BOOT, EventType.VALIDATION, EventType.CONFIRM, EventType.ROLLBACK}
)


class TelemetryRefused(ValueError):
    """The body is not a valid telemetry report; the message says what to fix."""


@dataclass(frozen=True)
class Event:
    id: str
    type: EventType
    time: int
    version: str
    result: Result
    channel: str | None = None
    from_version: str | None = None
    duration: float | None = None
    bytes: int | None = None
    delta: bool | None = None
    detail: str | None = None

    @property
    def attempted(self) -> bool:
        """The device installed (or tried to install) the release."""
        return counts_as_install(self.type)

    @property
    def failed(self) -> bool:
        """The release failed on the device: a rollback, or an install step that failed."""
        return counts_as_failure(self.type, self.result)


def counts_as_install(event_type: str) -> bool:
    return event_type in INSTALL_TYPES


def counts_as_failure(event_type: str, result: str) -> bool:
    return counts_as_install(event_type) and (
        event_type == EventType.ROLLBACK or result == Result.FAILED
    )


@dataclass(frozen=True)
class Report:
    device: str | None
    events: tuple[Event, ...]


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise TelemetryRefused(f"the key {key!r} appears twice in one object")
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise TelemetryRefused(f"{name} is not a JSON number")


def parse_report(body: bytes, max_events: int) -> Report:
    """Parse a telemetry body; TelemetryRefused naming the event and field at fault."""
    try:
        text = body.decode("utf-8")
        data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except UnicodeDecodeError as error:
        raise TelemetryRefused(f"the body is not UTF-8 (byte offset {error.start})") from None
    except json.JSONDecodeError as error:
        raise TelemetryRefused(f"not JSON: {error.msg} at byte offset {error.pos}") from None
    except RecursionError:
        raise TelemetryRefused("not JSON this server accepts: nested too deeply") from None
    if not isinstance(data, dict):
        raise TelemetryRefused('expected a JSON object {"events": [...]}')
    unknown = sorted(set(data) - {"events", "device"})
    if unknown:
        raise TelemetryRefused(f"unknown field {unknown[0]!r} (known: device, events)")
    device = data.get("device")
    if device is not None and not isinstance(device, str):
        raise TelemetryRefused("device: expected a string")
    events = data.get("events")
    if not isinstance(events, list) or not events:
        raise TelemetryRefused("events: expected a non-empty list of event objects")
    if len(events) > max_events:
        raise TelemetryRefused(f"events: {len(events)} events, at most {max_events} per request")
    parsed = []
    seen: set[str] = set()
    for number, item in enumerate(events):
        try:
            event = parse_event(item)
        except TelemetryRefused as error:
            raise TelemetryRefused(f"events[{number}]: {error}") from None
        if event.id in seen:
            raise TelemetryRefused(f"events[{number}]: id {event.id!r} twice in one request")
        seen.add(event.id)
        parsed.append(event)
    return Report(device, tuple(parsed))


def _string(item: dict[str, Any], key: str, pattern: re.Pattern[str], grammar: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise TelemetryRefused(f"{key}: expected a string matching {grammar}, got {value!r:.80}")
    return value


def _integer(item: dict[str, Any], key: str) -> int:
    value = item.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_DECIMAL:
        raise TelemetryRefused(f"{key}: expected an integer from 0 to {MAX_DECIMAL}")
    return value


def parse_event(item: object) -> Event:
    if not isinstance(item, dict):
        raise TelemetryRefused("expected an object")
    kind = item.get("type")
    if kind not in {member.value for member in EventType}:
        known = ", ".join(member.value for member in EventType)
        raise TelemetryRefused(f"type: expected one of {known}, got {kind!r:.40}")
    event_type = EventType(kind)
    allowed = _COMMON | _FIELDS[event_type]
    unknown = sorted(set(item) - allowed)
    if unknown:
        raise TelemetryRefused(
            f"field {unknown[0]!r:.40} is not part of a {event_type} event "
            f"(it has: {', '.join(sorted(allowed))})"
        )
    identifier = _string(item, "id", EVENT_ID, "[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
    version = _string(item, "version", IDENTIFIER, "a release version")
    channel = None
    if "channel" in item:
        channel = _string(item, "channel", CHANNEL, "a channel name")
    from_version = None
    if "from" in item:
        from_version = _string(item, "from", IDENTIFIER, "a release version")
    if "result" in item:
        if item["result"] not in {"ok", "failed"}:
            raise TelemetryRefused(f"result: expected 'ok' or 'failed', got {item['result']!r:.40}")
        result = Result(item["result"])
    elif event_type in {EventType.ROLLBACK, EventType.ERROR}:
        result = Result.FAILED
    else:
        raise TelemetryRefused(f"result: missing ('ok' or 'failed'; required for {event_type})")
    duration = None
    if "duration" in item:
        value = item["duration"]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or not 0 <= value <= MAX_DURATION
        ):
            raise TelemetryRefused(f"duration: expected seconds from 0 to {MAX_DURATION:.0f}")
        duration = float(value)
    size = _integer(item, "bytes") if "bytes" in item else None
    delta = None
    if "delta" in item:
        if not isinstance(item["delta"], bool):
            raise TelemetryRefused("delta: expected true or false")
        delta = item["delta"]
    detail = None
    if "detail" in item:
        detail = item["detail"]
        if not isinstance(detail, str) or len(detail) > MAX_DETAIL:
            raise TelemetryRefused(f"detail: expected a string of at most {MAX_DETAIL} characters")
        if _DETAIL_FORBIDDEN.search(detail):
            raise TelemetryRefused("detail: control characters other than tab and newline")
    return Event(
        id=identifier,
        type=event_type,
        time=_integer(item, "time"),
        version=version,
        result=result,
        channel=channel,
        from_version=from_version,
        duration=duration,
        bytes=size,
        delta=delta,
        detail=detail,
    )
