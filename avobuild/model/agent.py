"""The recipe's `[fleet]` and `[telemetry]` tables: the device's update agent.

`[fleet]` renders `/etc/avocado/agent.conf` in the product documentation's shape
(`[Fleet]` Organization/Product/Cohort, `[Connection]` Endpoint/Certificate/Key,
`[Updates]` CheckInterval/AutoDownload/AutoApply/UpdateWindow, plus what a signed
repository needs: the server's CA and the index keys); `[telemetry]` renders
`/etc/avocado/update-telemetry.yaml`. Every value ends up in a shell-read file, so each is
checked against a grammar that needs no quoting (docs/applier.md, "The update agent").
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from pathlib import Path

from avobuild.model.applier import SAFE_PATH, Duration, read_duration
from avobuild.model.names import IDENTIFIER
from avobuild.model.tomlcheck import Table

# https://HOST[:PORT][/PREFIX]: a DNS name or an IPv4 literal, no user, query or fragment.
ENDPOINT = re.compile(
    r"https://(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}[A-Za-z0-9])?)"
    r"(?::(?P<port>[1-9][0-9]{0,4}))?(?P<prefix>(?:/[A-Za-z0-9._~-]+)*)/?"
)
NAME_PATTERN = IDENTIFIER.pattern
CHANNEL = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
WINDOW = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])-([01][0-9]|2[0-3]):([0-5][0-9])")
MAX_CHECK_INTERVAL = 7 * 86400
MAX_RANDOM_DELAY = 86400


class FleetMode(enum.StrEnum):
    SERVER = "server"  # avobuild serve: /updates/check, halts and server windows
    STATIC = "static"  # any web server: the device computes its offer from the index


class Collect(enum.StrEnum):
    DOWNLOAD_TIME = "download_time"
    APPLY_TIME = "apply_time"
    BOOT_TIME = "boot_time"
    VALIDATION_RESULTS = "validation_results"
    ROLLBACK_EVENTS = "rollback_events"
    ERROR_LOGS = "error_logs"


# The telemetry event types (avobuild/fleet/telemetry.py) each collected item records.
COLLECT_EVENTS = {
    Collect.DOWNLOAD_TIME: ("download",),
    Collect.APPLY_TIME: ("apply",),
    Collect.BOOT_TIME: ("boot",),
    Collect.VALIDATION_RESULTS: ("validation", "confirm"),
    Collect.ROLLBACK_EVENTS: ("rollback",),
    Collect.ERROR_LOGS: ("error",),
}
_INTERVAL_WORDS = {"hourly": 3600, "daily": 86400}
HOUR = Duration("1h", 3600)
FIVE_MINUTES = Duration("5m", 300)
TEN_MINUTES = Duration("10m", 600)


@dataclass(frozen=True)
class FleetConfig:
    endpoint: str
    host: str
    port: int
    prefix: str
    product: str  # the repository's name: the index must name it
    organization: str = "default"
    cohort: str = "stable"  # the channel
    mode: FleetMode = FleetMode.SERVER
    # Per device, so on the data partition: an update replaces the root filesystem.
    certificate: str = "/data/avocado/device.crt"
    key: str = "/data/avocado/device.key"
    server_ca: Path | None = None  # host file, installed as /etc/avocado/fleet-ca.crt
    index_keys: tuple[Path, ...] = ()
    check_interval: Duration = HOUR
    random_delay: Duration = FIVE_MINUTES
    auto_download: bool = True
    auto_apply: bool = False
    update_window: str | None = None
    timeout: Duration = TEN_MINUTES


@dataclass(frozen=True)
class TelemetryConfig:
    enabled: bool = True
    endpoint: str | None = None  # None: the fleet endpoint
    collect: tuple[Collect, ...] = tuple(Collect)
    interval: str = "daily"
    interval_seconds: int = 86400
    on_failure: str = "immediate"
    max_queue: int = 256 << 10

    @property
    def event_types(self) -> tuple[str, ...]:
        return tuple(kind for item in self.collect for kind in COLLECT_EVENTS[item])


def _duration(table: Table, key: str, default: Duration, maximum: int) -> Duration:
    value = read_duration(table, key, default)
    if value.seconds > maximum:
        table.fail(key, f"a duration of at most {maximum} seconds", value.text)
    return value


def read_fleet(table: Table | None) -> FleetConfig | None:
    if table is None:
        return None
    endpoint = table.string("endpoint", what="an https://HOST[:PORT][/PREFIX] URL")
    match = ENDPOINT.fullmatch(endpoint)
    if match is None:
        table.fail("endpoint", "an https://HOST[:PORT][/PREFIX] URL", endpoint)
    port = int(match.group("port") or 443)
    if port > 65535:
        table.fail("endpoint", "a port from 1 to 65535", endpoint)
    name_rule = "letters, digits and . _ + ~ : @ - (at most 128, starting alphanumeric)"
    product = table.string("product", pattern=NAME_PATTERN, what=name_rule)
    organization = table.string(
        "organization", default="default", pattern=NAME_PATTERN, what=name_rule
    )
    cohort = table.string(
        "cohort", default="stable", pattern=CHANNEL, what="a channel name ([a-z0-9][a-z0-9_-]*)"
    )
    paths = {}
    defaults = (("certificate", "/data/avocado/device.crt"), ("key", "/data/avocado/device.key"))
    for key, default in defaults:
        paths[key] = table.string(
            key, default=default, pattern=SAFE_PATH, what="an absolute path on the device"
        )
    server_ca = table.path_value("server-ca", required=False)
    if server_ca is not None and not server_ca.is_file():
        table.fail("server-ca", "an existing PEM file of the server's CA", str(server_ca))
    index_keys = tuple(table.file_list("index-keys", "an existing public key file (PEM)"))
    if not index_keys:
        table.fail("index-keys", "at least one public key of the index signers")
    window = table.optional_string("update-window", what='a window like "02:00-04:00"')
    if window is not None and (not WINDOW.fullmatch(window) or window[:5] == window[6:]):
        table.fail("update-window", 'a window like "02:00-04:00" (start and end differ)', window)
    config = FleetConfig(
        endpoint=endpoint.rstrip("/"),
        host=match.group("host"),
        port=port,
        prefix=match.group("prefix"),
        product=product,
        organization=organization,
        cohort=cohort,
        mode=table.enum("mode", FleetMode, default=FleetMode.SERVER),
        certificate=paths["certificate"],
        key=paths["key"],
        server_ca=server_ca,
        index_keys=index_keys,
        check_interval=_duration(table, "check-interval", Duration("1h", 3600), MAX_CHECK_INTERVAL),
        random_delay=_duration(table, "random-delay", Duration("5m", 300), MAX_RANDOM_DELAY),
        auto_download=table.boolean("auto-download", default=True),
        auto_apply=table.boolean("auto-apply", default=False),
        update_window=window,
        timeout=_duration(table, "timeout", TEN_MINUTES, 86400),
    )
    table.check_unknown()
    return config


def read_telemetry(table: Table | None, fleet: FleetConfig | None) -> TelemetryConfig | None:
    if table is None:
        return TelemetryConfig() if fleet is not None else None
    if fleet is None:
        table.fail("enabled", "a [fleet] table too (telemetry goes to the fleet server)")
    enabled = table.boolean("enabled", default=True)
    endpoint = table.optional_string("endpoint", what="an https://HOST[:PORT][/PREFIX] URL")
    if endpoint is not None and not ENDPOINT.fullmatch(endpoint):
        table.fail("endpoint", "an https://HOST[:PORT][/PREFIX] URL", endpoint)
    collect = table.enum_list(
        "collect", Collect, default=list(Collect), what="items of update-telemetry.yaml"
    )
    interval = table.string("interval", default="daily", what='"hourly", "daily" or a duration')
    if interval in _INTERVAL_WORDS:
        seconds = _INTERVAL_WORDS[interval]
    else:
        seconds = _duration(table, "interval", Duration("24h", 86400), MAX_CHECK_INTERVAL).seconds
    on_failure = table.string("on-failure", default="immediate", what='"immediate" or "interval"')
    if on_failure not in ("immediate", "interval"):
        table.fail("on-failure", '"immediate" or "interval"', on_failure)
    max_queue = table.size("max-queue", default=256 << 10)
    if not 4096 <= max_queue <= 16 << 20:
        table.fail("max-queue", "a size from 4K to 16M", max_queue)
    config = TelemetryConfig(
        enabled=enabled,
        endpoint=endpoint.rstrip("/") if endpoint else None,
        collect=tuple(dict.fromkeys(collect)),
        interval=interval,
        interval_seconds=seconds,
        on_failure=on_failure,
        max_queue=max_queue,
    )
    table.check_unknown()
    return config
