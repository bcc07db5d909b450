"""The recipe's `[applier]` and `[rollback]` tables: how the on-target applier is rendered.

Every value here ends up inside a shell script or a YAML file on the device, so each one is
checked against a grammar that needs no quoting (paths, service names, URLs without quotes or
`$`). Durations are written like rollback.yaml spells them ("30s", "5m", "1h") and kept in
seconds; thresholds keep their unit ("95%", "85C").

`[rollback]` keys use the underscores of /etc/avocado/rollback.yaml, which they render to one
for one (docs/applier.md); `[applier]` keys use the hyphens of the rest of the recipe.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from avobuild.model.tomlcheck import Table

SAFE_PATH = re.compile(r"/[A-Za-z0-9._+@/-]*")
SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9@._:-]{0,127}")
TOOL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
# No quotes, spaces, `$`, backquotes or backslashes: the URL is embedded in single quotes.
URL_PATTERN = re.compile(r"https?://[A-Za-z0-9._~:/?=&%+@,{}-]+")
_DURATION = re.compile(r"([1-9][0-9]{0,6})(s|m|h)")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600}


class Bootloader(enum.StrEnum):
    GRUB = "grub"
    UBOOT = "u-boot"


class InitSystem(enum.StrEnum):
    SYSTEMD = "systemd"
    BUSYBOX = "busybox"


class Metric(enum.StrEnum):
    MEMORY_USAGE = "memory_usage"
    CPU_TEMPERATURE = "cpu_temperature"


METRIC_UNIT = {Metric.MEMORY_USAGE: "%", Metric.CPU_TEMPERATURE: "C"}
# What every applier needs on the target, whatever the configuration.
BASE_TOOLS = ("busybox", "openssl", "zstd")


@dataclass(frozen=True)
class Duration:
    """A duration as written ("30s") and in seconds."""

    text: str
    seconds: int


@dataclass(frozen=True)
class MetricCondition:
    metric: Metric
    threshold: int
    duration: Duration

    @property
    def threshold_text(self) -> str:
        return f"{self.threshold}{METRIC_UNIT[self.metric]}"


@dataclass(frozen=True)
class RollbackConfig:
    """The triggers of /etc/avocado/rollback.yaml (the product documentation's defaults)."""

    boot_failure: bool = True
    max_attempts: int = 3
    boot_timeout: Duration = Duration("120s", 120)
    service_health: bool = True
    critical_services: tuple[str, ...] = ()
    check_interval: Duration = Duration("30s", 30)
    failure_threshold: int = 2
    system_metrics: bool = True
    conditions: tuple[MetricCondition, ...] = (
        MetricCondition(Metric.MEMORY_USAGE, 95, Duration("5m", 300)),
        MetricCondition(Metric.CPU_TEMPERATURE, 85, Duration("2m", 120)),
    )
    app_validation: bool = False
    validation_script: str = "/usr/local/bin/validate-system"
    validation_timeout: Duration = Duration("60s", 60)


@dataclass(frozen=True)
class ApplierConfig:
    """How the applier reaches the slots, the boot state and the data partition."""

    bootloader: Bootloader = Bootloader.GRUB
    init: InitSystem = InitSystem.BUSYBOX
    target_tools: tuple[str, ...] = BASE_TOOLS
    # None: slots are /dev/disk/by-partlabel/<label>; a path: partitions at byte offsets.
    disk: str | None = None
    esp_mount: str = "/boot/efi"
    data_mount: str = "/data"
    state_dir: str = "/data/avocado-update"
    uboot_env_device: str = "/dev/mmcblk0"
    uboot_env_offset: int = 0x3F8000
    uboot_env_size: int = 0x4000
    uboot_env_redundant: bool = False
    download_url: str | None = None
    min_free_space: int = 64 << 20
    min_battery: int = 20
    # Seconds after a kernel panic before the kernel resets the board (panic=N), so that a
    # panicking trial boot uses up one attempt and the bootloader falls back; 0 waits forever.
    panic_reboot: int = 10
    keys: tuple[Path, ...] = field(default=())

    @property
    def grubenv_path(self) -> str:
        return self.esp_mount.rstrip("/") + "/avobuild/grubenv"

    def required_tools(self) -> tuple[str, ...]:
        """The target tools this configuration needs, each with why (for error messages)."""
        tools = list(BASE_TOOLS)
        if self.bootloader is Bootloader.UBOOT:
            tools += ["fw_printenv", "fw_setenv"]
        if self.init is InitSystem.SYSTEMD:
            tools.append("systemctl")
        return tuple(tools)


def read_duration(table: Table, key: str, default: Duration) -> Duration:
    text = table.optional_string(key, what='a duration like "30s", "5m" or "1h"')
    if text is None:
        return default
    match = _DURATION.fullmatch(text)
    if match is None:
        table.fail(key, 'a duration like "30s", "5m" or "1h"', text)
    return Duration(text, int(match.group(1)) * _DURATION_UNITS[match.group(2)])


def read_applier(table: Table | None) -> ApplierConfig:
    if table is None:
        return ApplierConfig()
    defaults = ApplierConfig()
    bootloader = table.enum("bootloader", Bootloader, default=defaults.bootloader)
    init = table.enum("init", InitSystem, default=defaults.init)
    tools = table.string_list("target-tools") if "target-tools" in table else list(BASE_TOOLS)
    for tool in tools:
        if not TOOL_NAME.fullmatch(tool):
            table.fail("target-tools", "tool names (letters, digits, . _ + -)", tool)
    paths = {}
    for key, default in (
        ("esp-mount", defaults.esp_mount),
        ("data-mount", defaults.data_mount),
        ("state-dir", defaults.state_dir),
        ("uboot-env-device", defaults.uboot_env_device),
    ):
        paths[key] = table.string(
            key, default=default, pattern=SAFE_PATH, what="an absolute path (A-Z a-z 0-9 . _ + @ -)"
        )
    disk = table.optional_string("disk")
    if disk is not None and not SAFE_PATH.fullmatch(disk):
        table.fail("disk", "an absolute device path like /dev/mmcblk0", disk)
    url = table.optional_string("download-url")
    if url is not None and not URL_PATTERN.fullmatch(url):
        table.fail("download-url", "an http(s) URL without quotes, spaces or '$'", url)
    min_battery = table.integer("min-battery", default=defaults.min_battery)
    if min_battery > 100:
        table.fail("min-battery", "a percentage from 0 to 100", min_battery)
    panic_reboot = table.integer("panic-reboot", default=defaults.panic_reboot)
    if panic_reboot > 3600:
        table.fail("panic-reboot", "seconds from 0 (never) to 3600", panic_reboot)
    keys = tuple(table.file_list("keys", "an existing public key file (PEM)"))
    config = ApplierConfig(
        bootloader=bootloader,
        init=init,
        target_tools=tuple(tools),
        disk=disk,
        esp_mount=paths["esp-mount"],
        data_mount=paths["data-mount"],
        state_dir=paths["state-dir"],
        uboot_env_device=paths["uboot-env-device"],
        uboot_env_offset=table.integer("uboot-env-offset", default=defaults.uboot_env_offset),
        uboot_env_size=table.size("uboot-env-size", default=defaults.uboot_env_size),
        uboot_env_redundant=table.boolean("uboot-env-redundant", default=False),
        download_url=url,
        min_free_space=table.size("min-free-space", default=defaults.min_free_space),
        min_battery=min_battery,
        panic_reboot=panic_reboot,
        keys=keys,
    )
    table.check_unknown()
    return config


def read_rollback(table: Table | None) -> RollbackConfig:
    """The [rollback] table; a sub-table that is present is enabled unless it says otherwise."""
    config = RollbackConfig()
    if table is None:
        return config
    boot = table.table("boot_failure")
    if boot is not None:
        enabled = boot.boolean("enabled", default=True)
        max_attempts = boot.integer("max_attempts", default=3, minimum=1)
        if max_attempts > 9:
            boot.fail("max_attempts", "a number of boot attempts from 1 to 9", max_attempts)
        timeout = read_duration(boot, "timeout", config.boot_timeout)
        boot.check_unknown()
        config = replace(
            config, boot_failure=enabled, max_attempts=max_attempts, boot_timeout=timeout
        )
    health = table.table("service_health")
    if health is not None:
        enabled = health.boolean("enabled", default=True)
        services = health.string_list("critical_services")
        for service in services:
            if not SERVICE_NAME.fullmatch(service):
                health.fail(
                    "critical_services", "service names (letters, digits, @ . _ : -)", service
                )
        interval = read_duration(health, "check_interval", config.check_interval)
        threshold = health.integer("failure_threshold", default=2, minimum=1)
        health.check_unknown()
        config = replace(
            config,
            service_health=enabled,
            critical_services=tuple(services),
            check_interval=interval,
            failure_threshold=threshold,
        )
    metrics = table.table("system_metrics")
    if metrics is not None:
        enabled = metrics.boolean("enabled", default=True)
        conditions = config.conditions
        if "conditions" in metrics:
            conditions = tuple(
                _read_condition(entry) for entry in metrics.array_of_tables("conditions")
            )
        metrics.check_unknown()
        config = replace(config, system_metrics=enabled, conditions=conditions)
    app = table.table("app_validation")
    if app is not None:
        enabled = app.boolean("enabled", default=True)
        script = app.string(
            "script", default=config.validation_script, pattern=SAFE_PATH, what="an absolute path"
        )
        timeout = read_duration(app, "timeout", config.validation_timeout)
        app.check_unknown()
        config = replace(
            config, app_validation=enabled, validation_script=script, validation_timeout=timeout
        )
    table.check_unknown()
    return config


def _read_condition(table: Table) -> MetricCondition:
    metric = table.enum("metric", Metric)
    unit = METRIC_UNIT[metric]
    threshold_text = table.string("threshold")
    match = re.fullmatch(r"([0-9]{1,3})" + re.escape(unit), threshold_text)
    if match is None or (metric is Metric.MEMORY_USAGE and int(match.group(1)) > 100):
        example = "95%" if metric is Metric.MEMORY_USAGE else "85C"
        table.fail("threshold", f'a threshold like "{example}"', threshold_text)
    duration = read_duration(table, "duration", Duration("1m", 60))
    table.check_unknown()
    return MetricCondition(metric, int(match.group(1)), duration)
