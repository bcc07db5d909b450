"""The device's update agent (`avocado-update check`, `download --version`, `agent`) under
busybox sh against a real `avobuild serve` on loopback, with real certificates.

The device is test_applier_device's simulated one (a factory disk image file, a grubenv
file, a state directory for the data partition). Oracles: the repository's bundle files and
their sha256; the server's telemetry database read with the `sqlite3` command; the slot
bytes before and after a refusal; a hostile TLS server written here (Python's ssl) that
serves tampered, replayed, foreign, oversized and substituted answers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import avobuild_cli, write_product
from test_applier_device import ROLLBACK, Device, Setup, _busybox_path
from test_fleet_support import (
    Pki,
    Releases,
    Server,
    free_port,
    index_key,
    init_repository,
    make_pki,
    release_bundles,
    running_server,
)

from avobuild.applier.render import render_applier
from avobuild.boot.state import BOOT_STATE_PATH
from avobuild.disk.plan import plan_layout
from avobuild.fs import read_vfat_file
from avobuild.image.factory import build_factory_image
from avobuild.model.layout import Role, Slot
from avobuild.model.recipe import load_recipe

FLEET = """
[fleet]
endpoint = "https://127.0.0.1:1"
product = "acme"
cohort = "stable"
index-keys = ["{index_key}"]
auto-apply = true
random-delay = "1s"

[telemetry]
interval = "1s"
"""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class World:
    setup: Setup
    releases: Releases
    pki: Pki
    server: Server
    repository: Path
    old_index: bytes  # an index of a lower serial, correctly signed
    foreign_index: bytes  # an index of a repository of the same name, another key
    delta: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("agent")
    releases = release_bundles(tmp_path_factory)
    key = index_key(root / "keys")
    public = key.with_name("index.pub.pem")
    product = write_product(releases.bundles["1.0.0"].parent / "product", version="0.9.0")
    with product.recipe.open("a") as handle:
        handle.write(ROLLBACK + FLEET.format(index_key=public))
    recipe = load_recipe(product.recipe)
    image = build_factory_image(recipe, root / "out", root / "work")
    rendered = root / "rendered"
    render_applier(recipe, rendered, test_hooks=True)
    plan = plan_layout(recipe.layout)
    boot = plan.by_role(Role.BOOT)
    assert boot is not None
    setup = Setup(
        root,
        image.path,
        releases.bundles["1.0.0"],
        releases.public_key,
        rendered,
        plan,
        read_vfat_file(image.path, boot.offset, BOOT_STATE_PATH),
        b"",
        _busybox_path(root / "bin"),
    )
    repository = root / "repo"
    init_repository(repository, releases, key)
    bundles = releases.bundles
    avobuild_cli(
        "repo", "add", repository, bundles["1.0.0"], bundles["1.1.0"], "--channel", "stable"
    )
    old_index = (repository / "public" / "index.signed").read_bytes()
    delta = root / "delta.avb"
    avobuild_cli("repo", "deltas", repository, "--pair", "1.0.0:1.1.0", "-o", delta)
    avobuild_cli("repo", "add", repository, delta)
    foreign = root / "foreign"
    init_repository(foreign, releases, index_key(root / "foreign-keys"))
    avobuild_cli("repo", "add", foreign, bundles["1.1.0"], "--channel", "stable")
    pki = make_pki(
        root / "pki",
        [
            "dev-a",
            "dev-b",
            "dev-c",
            "dev-e",
            "dev-f",
            "dev-g",
            "dev-h",
            "dev-s",
            "dev-r",
            "dev-t",
            "dev-w",
            *(f"dev-ra{n}" for n in range(10)),
            *(f"dev-d{n}" for n in range(7)),
        ],
    )
    with running_server(repository, pki, root / "serve.log") as server:
        yield World(
            setup,
            releases,
            pki,
            server,
            repository,
            old_index,
            (foreign / "public" / "index.signed").read_bytes(),
            delta,
        )


def fleet_device(world: World, root: Path, device_id: str, port: int | None = None) -> Device:
    """A device whose agent.conf names this test's server and certificates (what a factory
    provisioning step writes)."""
    device = Device(world.setup, root)
    certificate, key = world.pki.device(device_id)
    conf = device.conf / "agent.conf"
    lines = []
    for line in conf.read_text().splitlines():
        name = line.partition(" = ")[0]
        replacement = {
            "Endpoint": f"https://127.0.0.1:{port or world.server.port}",
            "Certificate": str(certificate),
            "Key": str(key),
            "ServerCA": str(world.pki.server_ca),
            "IndexKeys": str(device.conf / "index-keys"),
        }.get(name)
        lines.append(f"{name} = {replacement}" if replacement else line)
    conf.write_text("\n".join(lines) + "\n")
    # Every pass sends (the recipe's smallest interval, 1 s, would make sending depend on timing).
    yaml = device.conf / "update-telemetry.yaml"
    yaml.write_text(yaml.read_text().replace("interval_seconds: 1\n", "interval_seconds: 0\n"))
    (device.proc / "uptime").write_text("7.25 3.10\n")
    return device


def events(world: World, device_id: str, database: Path | None = None) -> list[tuple[str, ...]]:
    result = subprocess.run(
        [
            "sqlite3",
            str(database or world.repository / "telemetry.sqlite"),
            "SELECT id, type, version, result, COALESCE(bytes, ''), COALESCE(delta, ''),"
            f" COALESCE(detail, '') FROM events WHERE device = '{device_id}' ORDER BY time, id",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return [tuple(line.split("|")) for line in result.stdout.splitlines()]


def queue(device: Device) -> list[dict[str, object]]:
    """The queued events, oldest first: one file per event, one JSON line each."""
    spool = device.state / "telemetry" / "spool"
    if not spool.exists():
        return []
    names = sorted(
        (p.name for p in spool.iterdir() if not p.name.startswith(".")),
        key=lambda name: (int(name.split("-")[0]), name),
    )
    events = []
    for name in names:
        text = (spool / name).read_text()
        assert text.endswith("\n") and text.count("\n") == 1, (name, text)
        events.append(json.loads(text))
    return events


def test_agent_finds_fetches_the_delta_installs_and_reports(world: World, tmp_path: Path) -> None:
    device = fleet_device(world, tmp_path / "device", "dev-a")
    # Bring the device to 1.0.0 by hand, so that the index's delta 1.0.0 -> 1.1.0 applies.
    device.run("apply", "--target", "inactive", "--bundle", world.releases.bundles["1.0.0"])
    device.run("commit")
    assert device.reboot() is Slot.B
    device.run("health-check")
    assert "update available: 1.1.0" in device.run("check").stdout

    result = device.run("agent", "--once")
    assert "reboot required" in result.stdout
    delta_sha = sha256(world.delta.read_bytes())
    assert (
        device.state / "downloads" / f"{delta_sha}.avb"
    ).read_bytes() == world.delta.read_bytes()
    assert device.boot_state().primary is Slot.A
    assert device.reboot() is Slot.A
    device.run("health-check")
    assert device.boot_state().slots[Slot.A].ok
    assert device.boot_state().slots[Slot.A].version == "1.1.0"
    assert device.partition(Role.SYSTEM_A) != b""  # the delta wrote slot A (verified on commit)
    device.run("agent", "--once")  # sends what the reboot and the health check recorded
    assert queue(device) == []
    stored = events(world, "dev-a")
    kinds = [row[1] for row in stored]
    for kind in ("download", "apply", "boot", "validation", "confirm"):
        assert kind in kinds, (kind, stored)
    download = next(row for row in stored if row[1] == "download" and row[2] == "1.1.0")
    assert download[3:6] == ("ok", str(world.delta.stat().st_size), "1")
    assert len({row[0] for row in stored}) == len(stored)
    assert "no update: current" in device.run("check").stdout

    # A lost answer makes the device send again: the server keeps one copy of each event.
    ids = {row[0] for row in stored}
    replay = [{"id": i, "type": "error", "time": 1, "version": "1.1.0", "detail": "x"} for i in ids]
    # (as the single queue file of an applier before the spool: it is moved into the spool)
    (device.state / "telemetry" / "queue").write_text(
        "".join(json.dumps(event) + "\n" for event in replay)
    )
    (device.state / "telemetry" / "urgent").write_text("")
    device.run("agent", "--once")
    assert events(world, "dev-a") == stored and queue(device) == []


def test_agent_files_on_the_data_partition_come_first(world: World, tmp_path: Path) -> None:
    device = fleet_device(world, tmp_path / "device", "dev-c")
    data = device.root / "data" / "avocado"
    data.mkdir(parents=True)
    good = (device.conf / "agent.conf").read_text()
    (data / "agent.conf").write_text(good)
    (device.conf / "agent.conf").write_text(good.replace("Product = acme", "Product = other"))
    result = device.run("check", AVO_DATA_MOUNT=str(device.root / "data"))
    assert "update available: 1.1.0" in result.stdout
    result = device.run("check", check=False)  # the image's file: another repository
    assert result.returncode == 3 and "this device's is other" in result.stderr


def test_interrupted_download_resumes_with_a_range(world: World, tmp_path: Path) -> None:
    device = fleet_device(world, tmp_path / "device", "dev-b")
    device.run("check")
    full = world.releases.bundles["1.1.0"].read_bytes()
    part = device.state / "downloads" / f"{sha256(full)}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(full[:30000])  # a download the network cut
    out = device.run("download", "--version", "1.1.0").stdout.strip()
    assert Path(out).read_bytes() == full and not part.exists()
    download = [event for event in queue(device) if event["type"] == "download"]
    assert download[-1]["bytes"] == len(full) - 30000 and download[-1]["delta"] is False
    assert "verified" in device.run("verify", "--bundle", out).stdout


def test_a_connection_cut_mid_download_is_resumed_by_the_next_pass(
    world: World, tmp_path: Path
) -> None:
    device = fleet_device(world, tmp_path / "device", "dev-h")
    conf = device.conf / "agent.conf"
    conf.write_text(conf.read_text().replace("AutoApply = true", "AutoApply = false"))
    device.run("check")
    index = (world.repository / "public" / "index.signed").read_bytes()
    full = world.releases.bundles["1.1.0"].read_bytes()
    check = (
        f"avobuild-check 1\nchannel stable\nserial 3\nupdate 1.1.0 {len(full)} {sha256(full)} /x\n"
    )
    # The server announces the whole file, sends 40000 bytes, and the connection ends.
    cut = http(full[:40000], length=len(full))
    hostile = serving(world, index, check, cut)
    text = conf.read_text()
    try:
        conf.write_text(text.replace(f":{world.server.port}", f":{hostile.port}"))
        result = device.run("agent", "--once", check=False)
    finally:
        hostile.close()
    assert result.returncode == 1 and "truncated" in result.stderr, result.stderr
    part = device.state / "downloads" / f"{sha256(full)}.part"
    assert part.read_bytes() == full[:40000]
    conf.write_text(text)
    assert "downloaded 1.1.0" in device.run("agent", "--once").stdout
    assert (device.state / "downloads" / f"{sha256(full)}.avb").read_bytes() == full
    download = [e for e in queue(device) if e["type"] == "download"] or [
        {"bytes": int(row[4])} for row in events(world, "dev-h") if row[1] == "download"
    ]
    assert len(full) - 40000 in [e["bytes"] for e in download]


def test_outside_the_update_window_the_agent_waits(world: World, tmp_path: Path) -> None:
    device = fleet_device(world, tmp_path / "device", "dev-c")
    conf = device.conf / "agent.conf"
    conf.write_text(conf.read_text().replace("UpdateWindow = ", "UpdateWindow = 03:00-04:00"))
    result = device.run("agent", "--once", AVO_TEST_CLOCK_SHIFT=str(_shift_to_hour(12)))
    assert "waits for the update window 03:00-04:00" in result.stdout
    assert not (device.state / "downloads").exists()
    result = device.run("agent", "--once", AVO_TEST_CLOCK_SHIFT=str(_shift_to_hour(3)))
    assert "reboot required" in result.stdout


def test_a_failed_health_check_is_reported_as_a_rollback(world: World, tmp_path: Path) -> None:
    device = fleet_device(world, tmp_path / "device", "dev-f")
    hook = device.conf / "post-update.d" / "10-smoke"
    hook.write_text("#!/bin/sh\nexit 3\n")
    hook.chmod(0o755)
    result = device.run("agent", "--once")
    assert "reboot required" in result.stdout
    assert device.reboot() is Slot.B
    assert device.run("health-check", check=False).returncode == 1
    assert device.boot_state().primary is Slot.A
    assert [e["type"] for e in queue(device)][-2:] == ["validation", "rollback"]
    assert device.reboot() is Slot.A
    result = device.run("agent", "--once")  # back on 0.9.0: the failure goes out first
    assert "skipped: it was rolled back on this device" in result.stdout
    stored = {row[1]: row for row in events(world, "dev-f")}
    assert stored["rollback"][2] == "1.1.0" and "post-update hook" in stored["rollback"][6]
    assert stored["validation"][3] == "failed"


def _shift_to_hour(hour: int) -> int:
    now = int(time.time())
    return (hour * 3600 + 1800 - now % 86400) % 86400


# --- a hostile server -----------------------------------------------------------------------


class Hostile:
    """A TLS server with the test PKI that answers each path with the bytes `answer` gives
    (`answer_body`: given the request body too); `requests` lists (path, head, body)."""

    def __init__(
        self,
        pki: Pki,
        answer: Callable[[str], bytes] | None = None,
        answer_body: Callable[[str, bytes], bytes] | None = None,
    ) -> None:
        self.answer = answer_body or (lambda path, _body: answer(path) if answer else b"")
        self.requests: list[tuple[str, str, bytes]] = []
        self.port = free_port()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(pki.server_certificate, pki.server_key)
        context.load_verify_locations(pki.device_ca)
        context.verify_mode = ssl.CERT_REQUIRED
        self.context = context
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            try:
                with self.context.wrap_socket(raw, server_side=True) as connection:
                    head = b""
                    while b"\r\n\r\n" not in head and len(head) < 65536:
                        chunk = connection.recv(4096)
                        if not chunk:
                            break
                        head += chunk
                    head, _, body = head.partition(b"\r\n\r\n")
                    path = head.split(b" ", 2)[1].decode()
                    length = re.search(rb"\r\ncontent-length: *(\d+)", head, re.IGNORECASE)
                    while length and len(body) < int(length[1]):
                        chunk = connection.recv(65536)
                        if not chunk:
                            break
                        body += chunk
                    self.requests.append((path, head.decode("latin-1"), body))
                    connection.sendall(self.answer(path, body))
            except (OSError, IndexError):
                pass

    def close(self) -> None:
        # shutdown wakes the thread's accept(); close alone leaves the socket listening while
        # accept() holds it, and a later test's server on the same port number would not be
        # the one that answers.
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(timeout=10)


def http(
    body: bytes, status: str = "200 OK", length: int | None = None, headers: str = ""
) -> bytes:
    size = len(body) if length is None else length
    return (
        f"HTTP/1.1 {status}\r\nContent-Length: {size}\r\n{headers}Connection: close\r\n\r\n"
    ).encode() + body


def serving(world: World, index: bytes, check: str | None = None, bundle: bytes | None = None):  # type: ignore[no-untyped-def]
    def answer(path: str) -> bytes:
        if path.endswith("/index.signed"):
            return http(index)
        if "/updates/check/" in path and check is not None:
            return http(check.encode())
        if path.startswith("/bundles/") and bundle is not None:
            return bundle
        return http(b'{"error": "no"}', "404 Not Found")

    return Hostile(world.pki, answer)


def test_a_server_window_makes_the_agent_check_again_when_it_opens(
    world: World, tmp_path: Path
) -> None:
    device = fleet_device(world, tmp_path / "device", "dev-g")
    index = (world.repository / "public" / "index.signed").read_bytes()
    hostile = serving(world, index, "avobuild-check 1\nchannel stable\nserial 3\nnone window 120\n")
    try:
        conf = device.conf / "agent.conf"
        conf.write_text(conf.read_text().replace(f":{world.server.port}", f":{hostile.port}"))
        result = device.run("check")
    finally:
        hostile.close()
    assert "no update: window (retry after 120 s)" in result.stdout
    assert (device.state / "fleet" / "retry-after").read_text() == "120\n"


# --- Retry-After ------------------------------------------------------------------------------
DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date(at: float, form: str = "imf") -> str:
    """RFC 9110 section 5.6.7's three forms, spelled out (no locale)."""
    moment = time.gmtime(at)
    day, month = DAYS[moment.tm_wday], MONTHS[moment.tm_mon - 1]
    clock = time.strftime("%H:%M:%S", moment)
    if form == "rfc850":
        weekday = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
        date = f"{moment.tm_mday:02d}-{month}-{moment.tm_year % 100:02d}"
        return f"{weekday[moment.tm_wday]}, {date} {clock} GMT"
    if form == "asctime":
        return f"{day} {month} {moment.tm_mday:2d} {clock} {moment.tm_year}"
    return f"{day}, {moment.tm_mday:02d} {month} {moment.tm_year} {clock} GMT"


# (Retry-After, the wait the device keeps: None when the value is refused)
RETRY_AFTER: dict[str, tuple[Callable[[float], str], int | None]] = {
    "seconds": (lambda now: "120", 120),
    "leading-zeros": (lambda now: "0090", 90),
    "imf-date": (lambda now: http_date(now + 300), 300),
    "rfc850-date": (lambda now: http_date(now + 600, "rfc850"), 600),
    "asctime-date": (lambda now: http_date(now + 900, "asctime"), 900),
    "huge": (lambda now: "9" * 40, 86400),
    "year-9999": (lambda now: "Fri, 31 Dec 9999 23:59:59 GMT", 86400),
    "past-date": (lambda now: http_date(now - 3600), 0),
    "negative": (lambda now: "-5", None),
    "words": (lambda now: "soon", None),
    "no-such-day": (lambda now: "Wed, 32 Dec 2026 06:00:00 GMT", None),
    "two-values": (lambda now: "120, 60", None),
}


@pytest.mark.parametrize(
    ("case", "status"),
    [(case, "429 Too Many Requests") for case in sorted(RETRY_AFTER)]
    # a 503 answer takes the same path: three cases show it
    + [(case, "503 Service Unavailable") for case in ("seconds", "imf-date", "words")],
)
def test_retry_after_stops_every_request_until_it_passes(
    world: World, tmp_path: Path, case: str, status: str
) -> None:
    make, wait = RETRY_AFTER[case]
    device = fleet_device(world, tmp_path / "device", "dev-c")
    value = make(time.time())
    busy = http(b'{"error": "busy"}', status, headers=f"Retry-After: {value}\r\n")
    hostile = Hostile(world.pki, lambda path: busy)
    conf = device.conf / "agent.conf"
    conf.write_text(conf.read_text().replace(f":{world.server.port}", f":{hostile.port}"))

    def asked() -> int:  # index requests (a failure also sends its error event)
        return sum(1 for path, _, _ in hostile.requests if path == "/index.signed")

    try:
        first = device.run("check", check=False)
        status_file = device.state / "fleet" / "status"
        status_text = status_file.read_text() if status_file.exists() else ""
        not_before = device.state / "fleet" / f"not-before.127.0.0.1-{hostile.port}"
        until = int(not_before.read_text()) if not_before.exists() else 0
        asked_first = asked()
        second = device.run("check", check=False)
        asked_again = asked() - asked_first
        later = device.run("check", check=False, AVO_TEST_CLOCK_SHIFT=str((wait or 0) + 2))
        asked_later = asked() - asked_first - asked_again
    finally:
        hostile.close()
    history = device.history()
    assert asked_first == 1 and asked_later == 1  # once the wait is over, the device asks again
    if wait:
        assert first.returncode == 5 and "Retry-After" in first.stderr, first.stderr
        kept = re.search(
            r"\tbackoff\tHTTP \d+ from [^\n]*: no request to it for (\d+) s\n", history
        )
        assert kept and wait - 5 <= int(kept[1]) <= wait, history  # a date: seconds passed
        assert f"for {kept[1]} s (Retry-After)" in first.stderr, first.stderr
        assert abs(until - (time.time() + wait)) <= 10
        assert "result=waiting" in status_text, status_text
        # no request before it: the second check does not reach the server
        assert second.returncode == 5 and asked_again == 0, second.stderr
        assert "asked for no request before" in second.stderr
    else:
        # nothing to wait for: a failure like any other, and the next check asks again
        assert first.returncode == 1 and status[:3] in first.stderr, first.stderr
        assert second.returncode == 1 and asked_again == 1
        if wait is None:
            assert "is neither seconds nor an HTTP-date; ignored" in history
    assert later.returncode in (1, 5)  # the server still answers busy, once asked


def test_a_503_during_a_download_keeps_the_partial_file(world: World, tmp_path: Path) -> None:
    device = fleet_device(world, tmp_path / "device", "dev-r")
    conf = device.conf / "agent.conf"
    conf.write_text(conf.read_text().replace("AutoApply = true", "AutoApply = false"))
    device.run("check")
    index = (world.repository / "public" / "index.signed").read_bytes()
    full = world.releases.bundles["1.1.0"].read_bytes()
    part = device.state / "downloads" / f"{sha256(full)}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(full[:30000])
    offer = (
        f"avobuild-check 1\nchannel stable\nserial 3\nupdate 1.1.0 {len(full)} {sha256(full)} /x\n"
    )
    busy = http(b'{"error": "busy"}', "503 Service Unavailable", headers="Retry-After: 60\r\n")
    hostile = serving(world, index, offer, busy)
    text = conf.read_text()
    conf.write_text(text.replace(f":{world.server.port}", f":{hostile.port}"))
    try:
        result = device.run("agent", "--once", check=False)
    finally:
        hostile.close()
    assert result.returncode == 5 and "waiting" in result.stderr, result.stderr
    bundle_requests = [head for path, head, _ in hostile.requests if path.startswith("/bundles/")]
    assert len(bundle_requests) == 1 and "\r\nRange: bytes=30000-" in bundle_requests[0]
    assert part.read_bytes() == full[:30000]  # kept for the next pass
    assert not [e for e in queue(device) if e["type"] in ("download", "error")]  # not a failure
    conf.write_text(text)
    assert "downloaded 1.1.0" in device.run("agent", "--once").stdout
    assert (device.state / "downloads" / f"{sha256(full)}.avb").read_bytes() == full


def test_the_servers_rate_limit_makes_the_agent_wait(world: World, tmp_path: Path) -> None:
    """`avobuild serve` answers a device over its burst with 429 and Retry-After."""
    device = fleet_device(world, tmp_path / "device", "dev-ra0")
    for _ in range(20):  # 20 requests at once (burst), two a check
        result = device.run("check", check=False)
        if result.returncode != 0:
            break
    assert result.returncode == 5 and "HTTP 429" in result.stderr, result.stderr
    found = re.search(r"for (\d+) s \(Retry-After\)", result.stderr)
    assert found and 1 <= int(found[1]) <= 31, result.stderr  # one token: 30 s at 120 an hour
    assert f"HTTP 429 from 127.0.0.1:{world.server.port}: Retry-After '{found[1]}'" in (
        device.history()
    )
    again = device.run("check", check=False)
    assert again.returncode == 5 and "asked for no request before" in again.stderr


# --- the telemetry endpoint ------------------------------------------------------------------


def test_events_go_to_the_telemetry_endpoint(world: World, tmp_path: Path) -> None:
    """update-telemetry.yaml's endpoint, with the device's own certificate: a second server
    (the same repository, its own database) gets the events; the fleet server none."""
    device = fleet_device(world, tmp_path / "device", "dev-t")
    yaml = device.conf / "update-telemetry.yaml"
    text = yaml.read_text()
    assert "\n  collect:" in text
    second_database = tmp_path / "second.sqlite"
    with running_server(
        world.repository, world.pki, tmp_path / "second.log", "--database", str(second_database)
    ) as second:
        endpoint = f"https://127.0.0.1:{second.port}/"
        yaml.write_text(text.replace("\n  collect:", f"\n  endpoint: {endpoint}\n  collect:", 1))
        device.run("check")
        device.run("download", "--version", "1.1.0")
        device.run("check")  # sends
    assert queue(device) == []
    stored = events(world, "dev-t", second_database)
    assert [row[1:4] for row in stored] == [("download", "1.1.0", "ok")], stored
    assert events(world, "dev-t") == []

    # A bad endpoint: check refuses to run, naming it; events are still queued.
    yaml.write_text(text.replace("\n  collect:", "\n  endpoint: http://127.0.0.1\n  collect:", 1))
    result = device.run("check", check=False)
    assert result.returncode == 2 and "metrics.endpoint 'http://127.0.0.1'" in result.stderr


# --- the queue: several processes, kills ------------------------------------------------------


def test_concurrent_writers_a_sender_and_a_kill_lose_and_repeat_no_event(
    world: World, tmp_path: Path
) -> None:
    """The agent, the boot hook and the health check are separate processes on one data
    partition. Three write events at once (each `check` against its own closed port queues
    one error event naming that port) while a fourth sends, and one writer is killed at a
    seeded moment. The oracle: the collector got every id exactly once, as valid JSON; the
    two writers that ran to the end have exactly their events; the killed one those of the
    checks it finished, or one more (killed after the event, before its "done" line)."""
    rng = random.Random(20261202)
    device = fleet_device(world, tmp_path / "device", "dev-w")
    index = (world.repository / "public" / "index.signed").read_bytes()
    posted: list[dict[str, object]] = []
    malformed: list[bytes] = []

    def collect(path: str, body: bytes) -> bytes:
        if path.endswith("/index.signed"):
            return http(index)
        if "/updates/check/" in path:
            return http(b"avobuild-check 1\nchannel stable\nserial 3\nnone current\n")
        if path.endswith("/telemetry"):
            try:
                batch = json.loads(body)["events"]
            except (ValueError, KeyError):
                malformed.append(body)
                return http(b'{"error": "bad"}', "400 Bad Request")
            posted.extend(batch)
            return http(json.dumps({"stored": len(batch), "duplicates": 0}).encode())
        return http(b"{}", "404 Not Found")

    collector = Hostile(world.pki, answer_body=collect)
    conf = device.conf / "agent.conf"
    text = conf.read_text()
    conf.write_text(text.replace(f":{world.server.port}", f":{collector.port}"))
    script = world.setup.rendered / "usr" / "sbin" / "avocado-update"
    checks = 12
    writers: list[tuple[int, subprocess.Popen[bytes], Path]] = []
    for number in range(3):
        port = free_port()  # nothing listens there
        writer_conf = device.conf / f"writer-{number}.conf"
        writer_conf.write_text(text.replace(f":{world.server.port}", f":{port}"))
        log = tmp_path / f"writer-{number}.log"
        loop = (
            f"i=0; while [ $i -lt {checks} ]; do i=$((i + 1)); "
            f"sh {script} check > /dev/null 2>&1; echo done $i; done"
        )
        with log.open("wb") as output:
            process = subprocess.Popen(
                [f"{world.setup.busybox_path}/sh", "-c", loop],
                env=device.env(AVO_AGENT_CONF=str(writer_conf)),
                stdout=output,
                start_new_session=True,
            )
        writers.append((port, process, log))
    try:
        killed_at = time.monotonic() + rng.uniform(1.0, 3.0)
        killed = False
        while any(process.poll() is None for _, process, _ in writers):
            device.run("check", check=False)  # the sender, against the collector
            if not killed and time.monotonic() >= killed_at:
                os.killpg(writers[2][1].pid, signal.SIGKILL)
                killed = True
        if not killed:
            pytest.fail("the writers finished before the kill; make them longer")
        left = device.run("check", check=False)  # what is left
        assert left.returncode == 0, left.stderr
        # What a process killed between writing and renaming leaves is swept once it is gone.
        leftover = device.state / "telemetry" / "spool" / ".new-4194305-7-0badcafe"
        leftover.write_text('{"id": "half')
        (device.state / "telemetry" / "urgent").write_text("")
        device.run("check")
        assert not leftover.exists()
    finally:
        for _, process, _ in writers:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        collector.close()
    assert malformed == []
    ids = [str(event["id"]) for event in posted]
    assert len(ids) == len(set(ids)), "an event was sent twice"
    assert queue(device) == []
    for number, (port, _, log) in enumerate(writers):
        mine = [e for e in posted if f"127.0.0.1:{port}:" in str(e.get("detail", ""))]
        finished = len(log.read_text().split()) // 2
        if number < 2:
            assert finished == checks and len(mine) == checks, (number, finished, len(mine))
        else:
            assert finished < checks and len(mine) in (finished, finished + 1), (finished, mine)


def test_a_static_repository_gives_the_same_offer(world: World, tmp_path: Path) -> None:
    """Mode = static: any HTTPS server of the repository's public/ directory will do; the
    device computes its offer from the index (repository-format.md section 6)."""
    public = world.repository / "public"

    def static(path: str) -> bytes:
        name = path.removeprefix("/")
        if name == "index.signed" or (name.startswith("bundles/") and "/" not in name[8:]):
            file = public / name
            if file.is_file():
                return http(file.read_bytes())
        return http(b"not found", "404 Not Found")

    device = fleet_device(world, tmp_path / "device", "dev-s")
    conf = device.conf / "agent.conf"
    server = Hostile(world.pki, static)
    try:
        text = conf.read_text().replace("Mode = server", "Mode = static")
        conf.write_text(text.replace(f":{world.server.port}", f":{server.port}"))
        assert "update available: 1.1.0" in device.run("check").stdout
        out = device.run("download", "--version", "1.1.0").stdout.strip()
    finally:
        server.close()
    assert Path(out).read_bytes() == world.releases.bundles["1.1.0"].read_bytes()


def _tampered(index: bytes) -> bytes:
    data = bytearray(index)
    at = index.index(b"\nserial ") + 8
    data[at] = ord("9") if data[at] != ord("9") else ord("8")
    return bytes(data)


def _refused(device: Device, result: subprocess.CompletedProcess[str], text: str) -> None:
    assert result.returncode == 3, result.stderr
    assert text in result.stderr, result.stderr
    assert "refused" in (device.state / "fleet" / "status").read_text()
    assert "\trefused\t" in device.history()
    assert any(event["type"] == "error" for event in queue(device))


CASES = ["tampered", "replayed", "foreign", "expired", "offer-hash", "bundle-hash", "more-bytes"]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("tampered", "does not verify"),
        ("replayed", "older than"),
        ("foreign", "none of them trusted"),
        ("expired", "expired at"),
        ("offer-hash", "the signed index says"),
        ("bundle-hash", "the signed index says"),
        ("more-bytes", "sends more bytes than expected"),
    ],
)
def test_bad_input_is_refused_and_nothing_is_written(
    world: World, tmp_path: Path, case: str, message: str
) -> None:
    device_id = f"dev-d{CASES.index(case)}"  # its own rate limit
    device = fleet_device(world, tmp_path / "device", device_id)
    device.run("check")  # the real server: the newest index is accepted, serial stored
    index = (world.repository / "public" / "index.signed").read_bytes()
    full = world.releases.bundles["1.1.0"].read_bytes()
    good = (
        f"avobuild-check 1\nchannel stable\nserial 3\nupdate 1.1.0 {len(full)} {sha256(full)} /x\n"
    )
    hostile = {
        "tampered": lambda: serving(world, _tampered(index)),
        "replayed": lambda: serving(world, world.old_index),
        "foreign": lambda: serving(world, world.foreign_index),
        "expired": lambda: serving(world, index),
        "offer-hash": lambda: serving(world, index, good.replace(sha256(full), "0" * 64)),
        "bundle-hash": lambda: serving(world, index, good, http(full[:-1] + bytes([full[-1] ^ 1]))),
        "more-bytes": lambda: serving(world, index, good, http(full + b"x" * 100)),
    }[case]()
    system_a, system_b = device.partition(Role.SYSTEM_A), device.partition(Role.SYSTEM_B)
    try:
        conf = device.conf / "agent.conf"
        text = conf.read_text()
        conf.write_text(text.replace(f":{world.server.port}", f":{hostile.port}"))
        shift = {"expired": str(400 * 86400)}.get(case, "0")
        result = device.run("agent", "--once", check=False, AVO_TEST_CLOCK_SHIFT=shift)
    finally:
        hostile.close()
    _refused(device, result, message)
    assert device.partition(Role.SYSTEM_A) == system_a
    assert device.partition(Role.SYSTEM_B) == system_b
    if (device.state / "state").exists():
        assert device.state_value("state") in ("Idle", "Downloading")
    assert not list(device.state.glob("downloads/*.avb"))
    # The refusal is reported as soon as the real server is reachable again.
    conf.write_text(text)
    device.run("check")
    assert queue(device) == []
    assert any(row[1] == "error" and message in row[6] for row in events(world, device_id))


def test_a_clock_far_in_the_past_uses_the_last_index_as_the_time(
    world: World, tmp_path: Path
) -> None:
    device = fleet_device(world, tmp_path / "device", "dev-e")
    device.run("check")
    result = device.run("check", AVO_TEST_CLOCK_SHIFT=str(-20 * 365 * 86400))
    assert "update available: 1.1.0" in result.stdout
    issued = int((device.state / "fleet" / "index-issued").read_text())
    assert issued > 1_700_000_000


def test_a_full_data_partition_refuses_the_download(world: World, tmp_path: Path) -> None:
    device = fleet_device(world, tmp_path / "device", "dev-e")
    data = device.root / "data"
    data.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(data)], check=True)
    try:
        device.run("check")
        (data / "filler").write_bytes(b"\0" * (200 << 10))
        system_b = device.partition(Role.SYSTEM_B)
        result = device.run("download", "--version", "1.1.0", check=False)
        assert result.returncode == 1 and "data partition full" in result.stderr
        assert "\trefused\t" in device.history()
        assert device.partition(Role.SYSTEM_B) == system_b
        assert not list((device.state / "downloads").glob("*.avb"))
        (data / "filler").unlink()
        device.run("check")  # the error event reaches the server afterwards
        assert queue(device) == []
    finally:
        subprocess.run(["umount", str(data)], check=True)
    shutil.rmtree(device.root, ignore_errors=True)


# --- the recipe tables ----------------------------------------------------------------------


def _fleet_recipe(tmp_path: Path, extra: str) -> Path:
    product = write_product(tmp_path / "product")
    with product.recipe.open("a") as handle:
        handle.write(extra.replace("INDEX_KEY", str(product.public_key)))
    return product.recipe


AGENT_TABLES = """
[applier]
init = "INIT"
target-tools = ["busybox", "openssl", "zstd", "systemctl"]

[fleet]
endpoint = "https://updates.example.com:8443/acme/"
product = "acme"
organization = "acme-corp"
cohort = "beta"
index-keys = ["INDEX_KEY"]
check-interval = "30m"
auto-apply = true
update-window = "22:30-04:00"

[telemetry]
collect = ["download_time", "rollback_events"]
interval = "hourly"
max-queue = "64K"
"""


@pytest.mark.parametrize("init", ["busybox", "systemd"])
def test_fleet_and_telemetry_tables_render_the_agent_files(tmp_path: Path, init: str) -> None:
    import configparser

    recipe = load_recipe(_fleet_recipe(tmp_path, AGENT_TABLES.replace("INIT", init)))
    first, second = tmp_path / "one", tmp_path / "two"
    render_applier(recipe, first)
    render_applier(recipe, second)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for relative in files:  # reproducible: same recipe, same bytes
        assert (first / relative).read_bytes() == (second / relative).read_bytes(), relative
    conf = configparser.ConfigParser()
    conf.read_string((first / "etc/avocado/agent.conf").read_text())
    assert dict(conf["Fleet"]) == {
        "organization": "acme-corp",
        "product": "acme",
        "cohort": "beta",
        "mode": "server",
    }
    assert conf["Connection"]["endpoint"] == "https://updates.example.com:8443/acme"
    assert conf["Connection"]["certificate"] == "/data/avocado/device.crt"
    assert conf["Updates"]["checkinterval"] == "1800"
    assert conf["Updates"]["autoapply"] == "true" and conf["Updates"]["autodownload"] == "true"
    assert conf["Updates"]["updatewindow"] == "22:30-04:00"
    yaml = (first / "etc/avocado/update-telemetry.yaml").read_text()
    assert "    - download_time\n    - rollback_events\n\n" in yaml
    assert "\n  endpoint:" not in yaml  # events go to agent.conf's endpoint
    assert "interval: hourly\n" in yaml and "max_queue: 65536\n" in yaml
    assert list((first / "etc/avocado/index-keys").glob("*.ed25519.pem"))
    unit = first / "usr/lib/systemd/system/avocado-agent.service"
    script = first / "etc/init.d/S46avocado-agent"
    assert unit.exists() is (init == "systemd") and script.exists() is (init == "busybox")
    if init == "busybox":
        assert script.stat().st_mode & 0o111


def test_a_telemetry_endpoint_is_rendered_for_the_agent(tmp_path: Path) -> None:
    tables = AGENT_TABLES.replace("INIT", "busybox").replace(
        'max-queue = "64K"', 'max-queue = "64K"\nendpoint = "https://telemetry.example.com:9443/t/"'
    )
    rendered = tmp_path / "rendered"
    render_applier(load_recipe(_fleet_recipe(tmp_path, tables)), rendered)
    yaml = (rendered / "etc/avocado/update-telemetry.yaml").read_text()
    assert "\n  endpoint: https://telemetry.example.com:9443/t\n" in yaml


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ('"https://updates.example.com:8443/acme/"', '"http://updates.example.com"', "endpoint"),
        ('"https://updates.example.com:8443/acme/"', '"https://h:99999"', "endpoint"),
        ('"22:30-04:00"', '"25:00-04:00"', "update-window"),
        ('"22:30-04:00"', '"04:00-04:00"', "update-window"),
        ('cohort = "beta"', 'cohort = "Beta!"', "cohort"),
        ('"30m"', '"30d"', "check-interval"),
        ('interval = "hourly"', 'interval = "weekly"', "interval"),
        ('"64K"', '"1K"', "max-queue"),
        ('collect = ["download_time"', 'collect = ["cpu_time"', "collect"),
    ],
)
def test_bad_agent_values_are_refused_naming_the_key(
    tmp_path: Path, old: str, new: str, key: str
) -> None:
    from avobuild.errors import RecipeError

    text = AGENT_TABLES.replace("INIT", "busybox")
    assert old in text
    with pytest.raises(RecipeError) as error:
        load_recipe(_fleet_recipe(tmp_path, text.replace(old, new)))
    assert key in str(error.value)
