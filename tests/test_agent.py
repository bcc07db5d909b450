"""The device's update agent (`avocado-update check`, `download --version`, `agent`) under
busybox sh against a real `avobuild serve` on loopback, with real certificates.

The device is test_applier_device's simulated one (a factory disk image file, a grubenv
file, a state directory for the data partition). Oracles: the repository's bundle files and
their sha256; the server's telemetry database read with the `sqlite3` command; the slot
bytes before and after a refusal; a hostile TLS server written here (Python's ssl) that
serves tampered, replayed, foreign, oversized and substituted answers.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import ssl
import subprocess
import threading
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


def events(world: World, device_id: str) -> list[tuple[str, ...]]:
    result = subprocess.run(
        [
            "sqlite3",
            str(world.repository / "telemetry.sqlite"),
            "SELECT id, type, version, result, COALESCE(bytes, ''), COALESCE(delta, ''),"
            f" COALESCE(detail, '') FROM events WHERE device = '{device_id}' ORDER BY time, id",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return [tuple(line.split("|")) for line in result.stdout.splitlines()]


def queue(device: Device) -> list[dict[str, object]]:
    path = device.state / "telemetry" / "queue"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


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
    import time

    now = int(time.time())
    return (hour * 3600 + 1800 - now % 86400) % 86400


# --- a hostile server -----------------------------------------------------------------------


class Hostile:
    """A TLS server with the test PKI that answers each path with the bytes `answer` gives."""

    def __init__(self, pki: Pki, answer: Callable[[str], bytes]) -> None:
        self.answer = answer
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
                    path = head.split(b" ", 2)[1].decode()
                    connection.sendall(self.answer(path))
            except (OSError, IndexError):
                pass

    def close(self) -> None:
        self.listener.close()


def http(body: bytes, status: str = "200 OK", length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    return (
        f"HTTP/1.1 {status}\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n".encode() + body
    )


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
    assert "interval: hourly\n" in yaml and "max_queue: 65536\n" in yaml
    assert list((first / "etc/avocado/index-keys").glob("*.ed25519.pem"))
    unit = first / "usr/lib/systemd/system/avocado-agent.service"
    script = first / "etc/init.d/S46avocado-agent"
    assert unit.exists() is (init == "systemd") and script.exists() is (init == "busybox")
    if init == "busybox":
        assert script.stat().st_mode & 0o111


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
