"""`repository.toml`: the settings of an update repository and of the server that serves it.

`avobuild repo init` writes the file with tomli-w; people may edit it afterwards, and every
reader goes through `load_settings`, which refuses unknown keys and wrong types naming the
file, the table and the key. Paths are relative to the directory of the file. The keys and
their meaning are listed in docs/fleet.md, "repository.toml".
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from avobuild.errors import RecipeError
from avobuild.fleet.errors import RepositoryError
from avobuild.fleet.index import (
    CHANNEL,
    CHANNEL_GRAMMAR,
    IDENTIFIER,
    IDENTIFIER_GRAMMAR,
    compatible_matches,
)
from avobuild.fleet.signing import SigningPlan
from avobuild.fleet.windows import UpdateWindow, parse_window
from avobuild.model.tomlcheck import Table, load_toml

SETTINGS_FILE = "repository.toml"
SETTINGS_FORMAT = 1
DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)
DEVICE_ID_GRAMMAR = "[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_DEVICE_PATTERN = re.compile(r"[A-Za-z0-9*?][A-Za-z0-9._*?-]{0,63}", re.ASCII)
_DURATION = re.compile(r"([1-9][0-9]{0,8})([smhd])", re.ASCII)
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

DEFAULT_VALIDITY = 7 * 86400
DEFAULT_CHANNEL = "stable"


@dataclass(frozen=True)
class DeltaSettings:
    """`[deltas]`: how many previous releases get a delta to the newest, signed by whom."""

    previous: int = 3
    key: Path | None = None
    level: int = 9


@dataclass(frozen=True)
class RolloutSettings:
    """`[rollouts]`: the failure threshold that halts a release in a channel."""

    failure_threshold: int = 20  # percent of the devices that tried to install it
    minimum_devices: int = 5  # no verdict before this many devices tried


@dataclass(frozen=True)
class TelemetrySettings:
    """`[telemetry]`: bounds on what one device may send."""

    max_body: int = 64 << 10
    max_events: int = 100
    rate: int = 120  # requests (checks and telemetry) per device and hour
    burst: int = 20


@dataclass(frozen=True)
class ChannelSettings:
    """`[channel.NAME]`: the update window of a channel."""

    name: str
    window: UpdateWindow | None = None


@dataclass(frozen=True)
class GroupSettings:
    """`[group.NAME]`: devices by id pattern, with their channel and update window."""

    name: str
    devices: tuple[str, ...]
    channel: str | None = None
    window: UpdateWindow | None = None

    def includes(self, device_id: str) -> bool:
        return any(compatible_matches(pattern, device_id) for pattern in self.devices)


@dataclass(frozen=True)
class Settings:
    """The parsed repository.toml; `root` is the repository directory."""

    root: Path
    name: str
    index_validity: int = DEFAULT_VALIDITY
    default_channel: str = DEFAULT_CHANNEL
    signing: SigningPlan = field(default_factory=SigningPlan)
    index_keyring: Path | None = None
    bundle_keyring: Path | None = None
    deltas: DeltaSettings = DeltaSettings()
    rollouts: RolloutSettings = RolloutSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    channels: tuple[ChannelSettings, ...] = ()
    groups: tuple[GroupSettings, ...] = ()
    allow: tuple[str, ...] = ("*",)
    deny: tuple[str, ...] = ()

    @property
    def path(self) -> Path:
        return self.root / SETTINGS_FILE

    def group_for(self, device_id: str) -> GroupSettings | None:
        """The first group (in file order) whose patterns match the device."""
        return next((group for group in self.groups if group.includes(device_id)), None)

    def channel_for(self, device_id: str, asked: str | None) -> str:
        """The channel a device asked for, else its group's, else the default."""
        if asked:
            return asked
        group = self.group_for(device_id)
        if group is not None and group.channel is not None:
            return group.channel
        return self.default_channel

    def window_for(self, device_id: str, channel: str) -> UpdateWindow | None:
        """The device's group window if it has one, else the channel's, else none."""
        group = self.group_for(device_id)
        if group is not None and group.window is not None:
            return group.window
        settings = next((c for c in self.channels if c.name == channel), None)
        return settings.window if settings is not None else None

    def device_known(self, device_id: str) -> bool:
        """Allowed by a pattern of [devices] allow and by none of deny."""
        if any(compatible_matches(pattern, device_id) for pattern in self.deny):
            return False
        return any(compatible_matches(pattern, device_id) for pattern in self.allow)


def parse_duration(text: str) -> int:
    """`90s`, `30m`, `12h`, `7d` in seconds; ValueError otherwise."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(text)
    return int(match.group(1)) * _DURATION_UNITS[match.group(2)]


def format_duration(seconds: int) -> str:
    for unit in ("d", "h", "m"):
        if seconds % _DURATION_UNITS[unit] == 0:
            return f"{seconds // _DURATION_UNITS[unit]}{unit}"
    return f"{seconds}s"


def load_settings(root: Path) -> Settings:
    """Read `root/repository.toml` strictly."""
    path = root / SETTINGS_FILE
    if not path.is_file():
        raise RepositoryError(
            f"{path}: no such file; {root} is not an update repository "
            "(make one with 'avobuild repo init')"
        )
    try:
        return _parse(root.resolve(), load_toml(path))
    except RecipeError as error:
        raise RepositoryError(str(error)) from None


def _parse(root: Path, table: Table) -> Settings:
    version = table.integer("format", minimum=1)
    if version != SETTINGS_FORMAT:
        table.fail(
            "format", f"{SETTINGS_FORMAT} (this avobuild reads format {SETTINGS_FORMAT})", version
        )
    repository = _required_table(table, "repository")
    name = repository.string(
        "name", pattern=IDENTIFIER, what=f"a name matching {IDENTIFIER_GRAMMAR}"
    )
    validity_text = repository.string("index-validity", default=format_duration(DEFAULT_VALIDITY))
    try:
        validity = parse_duration(validity_text)
    except ValueError:
        repository.fail(
            "index-validity", 'a duration like "7d", "12h", "30m" or "90s"', validity_text
        )
    default_channel = repository.string(
        "default-channel",
        default=DEFAULT_CHANNEL,
        pattern=CHANNEL,
        what=f"a channel name matching {CHANNEL_GRAMMAR}",
    )
    repository.check_unknown()

    signing_table = table.table("signing")
    signing = SigningPlan()
    index_keyring = None
    if signing_table is not None:
        module = signing_table.path_value("pkcs11-module", required=False)
        signing = SigningPlan(
            keys=tuple(signing_table.file_list("keys", "an existing PEM private key file")),
            pkcs11=tuple(signing_table.string_list("pkcs11")),
            pkcs11_module=module,
            certificates=tuple(
                signing_table.file_list("certificates", "an existing PEM certificate file")
            ),
        )
        index_keyring = signing_table.path_value("keyring", required=False)
        signing_table.check_unknown()

    bundles = table.table("bundles")
    bundle_keyring = None
    if bundles is not None:
        bundle_keyring = bundles.path_value("keyring", required=False)
        bundles.check_unknown()

    deltas = DeltaSettings()
    deltas_table = table.table("deltas")
    if deltas_table is not None:
        deltas = DeltaSettings(
            previous=deltas_table.integer("previous", default=deltas.previous, minimum=0),
            key=deltas_table.path_value("key", required=False),
            level=deltas_table.integer("level", default=deltas.level, minimum=1),
        )
        if deltas.level > 22:
            deltas_table.fail("level", "a zstd level from 1 to 22", deltas.level)
        deltas_table.check_unknown()

    rollouts = RolloutSettings()
    rollouts_table = table.table("rollouts")
    if rollouts_table is not None:
        rollouts = RolloutSettings(
            failure_threshold=rollouts_table.integer(
                "failure-threshold", default=rollouts.failure_threshold, minimum=1
            ),
            minimum_devices=rollouts_table.integer(
                "minimum-devices", default=rollouts.minimum_devices, minimum=1
            ),
        )
        if rollouts.failure_threshold > 100:
            rollouts_table.fail(
                "failure-threshold", "a percentage from 1 to 100", rollouts.failure_threshold
            )
        rollouts_table.check_unknown()

    telemetry = TelemetrySettings()
    telemetry_table = table.table("telemetry")
    if telemetry_table is not None:
        telemetry = TelemetrySettings(
            max_body=telemetry_table.size("max-body", default=telemetry.max_body),
            max_events=telemetry_table.integer(
                "max-events", default=telemetry.max_events, minimum=1
            ),
            rate=telemetry_table.integer("rate", default=telemetry.rate, minimum=1),
            burst=telemetry_table.integer("burst", default=telemetry.burst, minimum=1),
        )
        if telemetry.max_body > 16 << 20:
            telemetry_table.fail("max-body", "a size of at most 16M", telemetry.max_body)
        telemetry_table.check_unknown()

    channels = tuple(_parse_channel(name, channel) for name, channel in table.subtables("channel"))
    groups = tuple(_parse_group(name, group) for name, group in table.subtables("group"))

    allow: tuple[str, ...] = ("*",)
    deny: tuple[str, ...] = ()
    devices = table.table("devices")
    if devices is not None:
        allow = _patterns(devices, "allow", default=allow)
        deny = _patterns(devices, "deny", default=())
        devices.check_unknown()
    table.check_unknown()
    return Settings(
        root=root,
        name=name,
        index_validity=validity,
        default_channel=default_channel,
        signing=signing,
        index_keyring=index_keyring,
        bundle_keyring=bundle_keyring,
        deltas=deltas,
        rollouts=rollouts,
        telemetry=telemetry,
        channels=channels,
        groups=groups,
        allow=allow,
        deny=deny,
    )


def _required_table(table: Table, key: str) -> Table:
    child = table.table(key, required=True)
    assert child is not None
    return child


def _window(table: Table) -> UpdateWindow | None:
    text = table.optional_string("window")
    zone = table.string("timezone", default="UTC")
    if text is None:
        if "timezone" in table:
            table.fail("timezone", 'a window = "HH:MM-HH:MM" beside it')
        return None
    try:
        return parse_window(text, zone, f"{table.path}: [{table.name}] window")
    except RepositoryError as error:
        raise RecipeError(str(error)) from None


def _parse_channel(name: str, table: Table) -> ChannelSettings:
    if not CHANNEL.fullmatch(name):
        raise RecipeError(f"{table.path}: [{table.name}]: a channel name matches {CHANNEL_GRAMMAR}")
    window = _window(table)
    table.check_unknown()
    return ChannelSettings(name, window)


def _parse_group(name: str, table: Table) -> GroupSettings:
    if not CHANNEL.fullmatch(name):
        raise RecipeError(f"{table.path}: [{table.name}]: a group name matches {CHANNEL_GRAMMAR}")
    devices = _patterns(table, "devices", default=())
    if not devices:
        table.fail("devices", "a non-empty list of device id patterns")
    channel = table.optional_string("channel")
    if channel is not None and not CHANNEL.fullmatch(channel):
        table.fail("channel", f"a channel name matching {CHANNEL_GRAMMAR}", channel)
    window = _window(table)
    table.check_unknown()
    return GroupSettings(name, devices, channel, window)


def _patterns(table: Table, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    if key not in table:
        table.string_list(key)
        return default
    values = table.string_list(key)
    for index, value in enumerate(values):
        if not _DEVICE_PATTERN.fullmatch(value):
            table.fail(f"{key}[{index}]", "a device id or a pattern with * and ?", value)
    return tuple(values)


# --- writing ---------------------------------------------------------------------------------


def _relative(root: Path, path: Path) -> str:
    """`path` as repository.toml names it: relative to the repository when inside it."""
    absolute = path.resolve()
    try:
        return absolute.relative_to(root.resolve()).as_posix()
    except ValueError:
        return os.path.relpath(absolute, root.resolve())


def settings_document(settings: Settings) -> dict[str, Any]:
    """The TOML document of `settings` (the inverse of `load_settings`)."""
    root = settings.root
    document: dict[str, Any] = {
        "format": SETTINGS_FORMAT,
        "repository": {
            "name": settings.name,
            "index-validity": format_duration(settings.index_validity),
            "default-channel": settings.default_channel,
        },
    }
    signing: dict[str, Any] = {}
    if settings.signing.keys:
        signing["keys"] = [_relative(root, path) for path in settings.signing.keys]
    if settings.signing.pkcs11:
        signing["pkcs11"] = list(settings.signing.pkcs11)
    if settings.signing.pkcs11_module is not None:
        signing["pkcs11-module"] = str(settings.signing.pkcs11_module)
    if settings.signing.certificates:
        signing["certificates"] = [_relative(root, p) for p in settings.signing.certificates]
    if settings.index_keyring is not None:
        signing["keyring"] = _relative(root, settings.index_keyring)
    if signing:
        document["signing"] = signing
    if settings.bundle_keyring is not None:
        document["bundles"] = {"keyring": _relative(root, settings.bundle_keyring)}
    deltas: dict[str, Any] = {"previous": settings.deltas.previous, "level": settings.deltas.level}
    if settings.deltas.key is not None:
        deltas["key"] = _relative(root, settings.deltas.key)
    document["deltas"] = deltas
    document["rollouts"] = {
        "failure-threshold": settings.rollouts.failure_threshold,
        "minimum-devices": settings.rollouts.minimum_devices,
    }
    document["telemetry"] = {
        "max-body": settings.telemetry.max_body,
        "max-events": settings.telemetry.max_events,
        "rate": settings.telemetry.rate,
        "burst": settings.telemetry.burst,
    }
    if settings.channels:
        document["channel"] = {c.name: _window_document(c.window) for c in settings.channels}
    if settings.groups:
        groups: dict[str, Any] = {}
        for group in settings.groups:
            entry: dict[str, Any] = {"devices": list(group.devices)}
            if group.channel is not None:
                entry["channel"] = group.channel
            entry.update(_window_document(group.window))
            groups[group.name] = entry
        document["group"] = groups
    document["devices"] = {"allow": list(settings.allow), "deny": list(settings.deny)}
    return document


def _window_document(window: UpdateWindow | None) -> Mapping[str, str]:
    if window is None:
        return {}
    return {"window": window.text, "timezone": window.zone}


def render_settings(settings: Settings) -> bytes:
    return tomli_w.dumps(settings_document(settings)).encode()
