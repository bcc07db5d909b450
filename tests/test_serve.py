"""`avobuild serve`: the real server on loopback, real TLS certificates made by openssl.

Oracles: the bytes of the repository's bundle files; the rollout formula written out again
here (not avobuild's function); `curl` and `openssl s_client` as independent clients; the
telemetry database read with the `sqlite3` command; `statistics.median` of the durations the
test sent; update windows built around the current time in a named zone.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from conftest import avobuild_cli
from test_fleet_support import (
    COMPATIBLE,
    Pki,
    Releases,
    Server,
    index_key,
    init_repository,
    leaf,
    make_pki,
    openssl,
    release_bundles,
    running_server,
    wait_for_check,
)

from avobuild.bundle.keys import load_keyring
from avobuild.fleet.index import read_signed_index

DEVICES = [f"dev{n:03d}" for n in range(1, 13)]
OTHERS = ["early-1", "flood", "banned-1", "dup", *[f"halt-{n}" for n in range(1, 7)]]
OTHERS += [f"r-{n}" for n in range(1, 6)]


def bucket(device: str, version: str) -> int:
    """docs/repository-format.md section 6, written out independently of avobuild."""
    digest = hashlib.sha256(f"avobuild-rollout 1 {version} {device}".encode()).hexdigest()
    return int(digest[:8], 16) % 10000


def hhmm(moment: datetime) -> str:
    return moment.strftime("%H:%M")


@dataclass(frozen=True)
class Fleet:
    repository: Path
    releases: Releases
    pki: Pki
    server: Server
    sha: dict[str, str]  # version -> sha256 of the full bundle
    delta_sha: str


def check(
    server: Server,
    device: str,
    version: str,
    channel: str = "stable",
    compatible: str = COMPATIBLE,
    **headers: str,
) -> dict[str, object]:
    answer = server.client(device).get(
        f"/updates/check/{device}?version={version}&compatible={compatible}&channel={channel}",
        **headers,
    )
    assert answer.status == 200, answer.body
    result = answer.json()
    assert isinstance(result, dict)
    return result


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("serve")
    releases = release_bundles(tmp_path_factory)
    repository = root / "repo"
    init_repository(repository, releases, index_key(root / "keys"))
    avobuild_cli(
        "repo",
        "add",
        repository,
        releases.bundles["1.0.0"],
        releases.bundles["1.1.0"],
        "--channel",
        "stable",
    )
    delta = root / "delta.avb"
    avobuild_cli("repo", "deltas", repository, "--pair", "1.0.0:1.1.0", "-o", delta)
    avobuild_cli("repo", "add", repository, delta, releases.bundles["1.2.0"])
    avobuild_cli("repo", "promote", repository, "1.1.0", "--channel", "night")
    avobuild_cli("repo", "promote", repository, "1.2.0", "--channel", "canary")
    berlin = datetime.now(ZoneInfo("Europe/Berlin"))
    utc = datetime.now(UTC)
    settings = repository / "repository.toml"
    text = settings.read_text()
    text = text.replace("minimum-devices = 5", "minimum-devices = 4")
    text = text.replace("deny = []", 'deny = ["banned-*"]')
    text += (
        f'\n[channel.night]\nwindow = "{hhmm(utc + timedelta(hours=2))}-'
        f'{hhmm(utc + timedelta(hours=3))}"\ntimezone = "UTC"\n'
        f'\n[group.early]\ndevices = ["early-*"]\nwindow = "{hhmm(berlin - timedelta(hours=1))}-'
        f'{hhmm(berlin + timedelta(hours=1))}"\ntimezone = "Europe/Berlin"\n'
    )
    settings.write_text(text)
    pki = make_pki(root / "pki", DEVICES + OTHERS)
    sha = {v: hashlib.sha256(p.read_bytes()).hexdigest() for v, p in releases.bundles.items()}
    with running_server(repository, pki, root / "serve.log") as server:
        yield Fleet(
            repository, releases, pki, server, sha, hashlib.sha256(delta.read_bytes()).hexdigest()
        )


def test_check_answers_json_and_text(fleet: Fleet) -> None:
    server = fleet.server
    answer = check(server, "dev001", "1.0.0")
    assert answer["update_available"] is True
    assert answer["version"] == "1.1.0" and answer["hash"] == fleet.sha["1.1.0"]
    assert answer["url"] == "/updates/download/1.1.0"
    assert answer["size"] == fleet.releases.bundles["1.1.0"].stat().st_size
    delta = answer["delta"]
    assert isinstance(delta, dict) and delta["hash"] == fleet.delta_sha
    assert delta["url"] == "/updates/download/1.1.0?from=1.0.0"
    text = server.client("dev001").get(
        f"/updates/check/dev001?version=1.0.0&compatible={COMPATIBLE}", Accept="text/plain"
    )
    assert text.body.decode().splitlines() == [
        "avobuild-check 1",
        "channel stable",
        f"serial {answer['index_serial']}",
        f"update 1.1.0 {answer['size']} {fleet.sha['1.1.0']} /updates/download/1.1.0",
        f"delta 1.0.0 {delta['size']} {fleet.delta_sha} /updates/download/1.1.0?from=1.0.0",
    ]
    assert check(server, "dev001", "1.1.0")["reason"] == "current"
    assert check(server, "dev001", "1.0.0", compatible="other-board")["reason"] == "no-release"
    client = server.client("dev001")
    for query, message in (
        ("compatible=x", "'version' is required"),
        ("version=1%200&compatible=x", "not a valid version"),
        ("version=1&version=2&compatible=x", "given 2 times"),
        ("version=1&compatible=x&channel=Bad", "not a valid channel"),
    ):
        bad = client.get(f"/updates/check/dev001?{query}")
        assert bad.status == 400 and message in json.loads(bad.body)["error"], bad.body


def test_downloads_ranges_and_etags(fleet: Fleet, tmp_path: Path) -> None:
    client = fleet.server.client("dev002")
    full = fleet.releases.bundles["1.1.0"].read_bytes()
    tag = f'"{fleet.sha["1.1.0"]}"'
    whole = client.get("/updates/download/1.1.0")
    assert whole.status == 200 and whole.body == full and whole.headers["etag"] == tag
    assert client.get(f"/bundles/{fleet.sha['1.1.0']}.avb").body == full
    part = client.get("/updates/download/1.1.0", Range="bytes=100-199")
    assert part.status == 206 and part.body == full[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(full)}"
    assert client.get("/updates/download/1.1.0", Range="bytes=-10").body == full[-10:]
    guarded = client.get("/updates/download/1.1.0", Range="bytes=5-", If_Range=tag)
    assert guarded.status == 206 and guarded.body == full[5:]
    stale = client.get("/updates/download/1.1.0", Range="bytes=5-", If_Range='"0000"')
    assert stale.status == 200 and stale.body == full
    assert client.get("/updates/download/1.1.0", If_None_Match=tag).status == 304
    beyond = client.get("/updates/download/1.1.0", Range=f"bytes={len(full)}-")
    assert beyond.status == 416 and beyond.headers["content-range"] == f"bytes */{len(full)}"
    head = client.request("HEAD", "/updates/download/1.1.0")
    assert (
        head.status == 200 and head.body == b"" and int(head.headers["content-length"]) == len(full)
    )
    delta = client.get("/updates/download/1.1.0?from=1.0.0")
    assert hashlib.sha256(delta.body).hexdigest() == fleet.delta_sha
    missing = client.get("/updates/download/9.9.9")
    assert missing.status == 404 and "no release 9.9.9" in json.loads(missing.body)["error"]
    # curl resumes an interrupted download: the result is the file, byte for byte.
    certificate, key = fleet.pki.device("dev002")
    output = tmp_path / "resumed.avb"
    curl = [
        "curl",
        "-sS",
        "--fail",
        "--cacert",
        str(fleet.pki.server_ca),
        "--cert",
        str(certificate),
        "--key",
        str(key),
        "-o",
        str(output),
    ]
    url = f"https://localhost:{fleet.server.port}/updates/download/1.1.0"
    subprocess.run([*curl, "-r", "0-99999", url], check=True)
    assert output.stat().st_size == 100000
    subprocess.run([*curl, "-C", "-", url], check=True)
    assert output.read_bytes() == full


def s_client(server: Server, certificate: Path | None, key: Path | None, request: str) -> str:
    argv = [
        "openssl",
        "s_client",
        "-quiet",
        "-connect",
        f"127.0.0.1:{server.port}",
        "-servername",
        "localhost",
        "-CAfile",
        str(server.pki.server_ca),
    ]
    if certificate is not None and key is not None:
        argv += ["-cert", str(certificate), "-key", str(key)]
    result = subprocess.run(
        argv, input=request.encode(), capture_output=True, timeout=30, check=False
    )
    return result.stdout.decode(errors="replace")


def test_mutual_tls_the_device_is_its_certificate(fleet: Fleet, tmp_path: Path) -> None:
    server = fleet.server
    request = (
        f"GET /updates/check/dev001?version=1.0.0&compatible={COMPATIBLE} HTTP/1.1\r\n"
        "Host: localhost\r\nConnection: close\r\n\r\n"
    )
    certificate, key = fleet.pki.device("dev001")
    assert s_client(server, certificate, key, request).startswith("HTTP/1.1 200")
    # No certificate, a certificate of another CA, a device CA certificate for servers:
    # the handshake fails, not a byte of HTTP comes back.
    rogue = tmp_path / "rogue"
    rogue.mkdir()
    openssl(
        "req",
        "-x509",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        rogue / "ca.key",
        "-out",
        rogue / "ca.crt",
        "-subj",
        "/CN=rogue",
        "-days",
        "30",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
    )
    rogue_leaf = leaf(
        rogue, "dev001", "ca", "/CN=dev001", "clientAuth", "URI:urn:avobuild:device:dev001"
    )
    shutil.copyfile(fleet.pki.root / "device-ca.crt", tmp_path / "device-ca.crt")
    shutil.copyfile(fleet.pki.root / "device-ca.key", tmp_path / "device-ca.key")
    server_purpose = leaf(tmp_path, "srv", "device-ca", "/CN=dev001", "serverAuth", None)
    for pair in ((None, None), rogue_leaf, server_purpose):
        assert "HTTP/1.1" not in s_client(server, pair[0], pair[1], request), pair
    # Valid chain, but not a device id, or URI names of another device: 403 with a reason.
    bad_name = leaf(tmp_path, "bad", "device-ca", "/CN=not a device", "clientAuth", None)
    two_names = leaf(
        tmp_path, "two", "device-ca", "/CN=dev001", "clientAuth", "URI:urn:avobuild:device:dev002"
    )
    for pair, reason in ((bad_name, "is not a device id"), (two_names, "do not all name")):
        reply = s_client(server, pair[0], pair[1], request)
        assert reply.startswith("HTTP/1.1 403") and reason in reply, reply
    client = server.client("dev001")
    other = client.get(f"/updates/check/dev002?version=1.0.0&compatible={COMPATIBLE}")
    assert other.status == 403 and "may not ask for 'dev002'" in other.body.decode()
    report = json.dumps(
        {
            "device": "dev002",
            "events": [{"id": "x", "type": "error", "time": 1, "version": "1.0.0", "detail": "?"}],
        }
    )
    spoof = client.post_json("/telemetry", report.encode())
    assert spoof.status == 403 and "may not report for 'dev002'" in spoof.body.decode()
    banned = server.client("banned-1").get("/index.signed")
    assert banned.status == 403 and "not known to this server" in banned.body.decode()


def test_no_url_reaches_outside_the_index(fleet: Fleet) -> None:
    client = fleet.server.client("dev003")
    for path in (
        "/bundles/../repository.toml",
        "/bundles/%2e%2e/catalog.toml",
        "/bundles/..%2Frepository.toml",
        "/updates/download/..%2F..%2Frepository.toml",
        "/updates/download/%2e%2e",
        "/public/index.signed",
        "//etc/passwd",
        "/bundles/" + "0" * 64 + ".avb",
        "/index.signed/../repository.toml",
        "/updates/download/1.1.0%00",
    ):
        answer = client.get(path)
        assert answer.status in {400, 404}, (path, answer.status)
        assert b"[repository]" not in answer.body and b"root:" not in answer.body
        assert "error" in json.loads(answer.body), path
    index = client.get("/index.signed")
    assert index.body == (fleet.repository / "public" / "index.signed").read_bytes()
    assert client.request("DELETE", "/index.signed").status == 405


def test_phased_rollout_widens_and_never_takes_away(fleet: Fleet) -> None:
    server = fleet.server
    offered_before: set[str] = set()
    for percent in (25, 60, 100):
        avobuild_cli(
            "repo",
            "promote",
            fleet.repository,
            "1.2.0",
            "--channel",
            "phased",
            "--percent",
            str(percent),
        )
        expected = {d for d in DEVICES if bucket(d, "1.2.0") < percent * 100}
        offered = set()
        for device in DEVICES:
            answer = check(server, device, "1.1.0", channel="phased")
            if answer["update_available"]:
                assert answer["version"] == "1.2.0"
                offered.add(device)
            else:
                assert answer["reason"] == "rollout" and answer["pending"] == "1.2.0"
        assert offered == expected, percent
        assert offered_before <= offered
        offered_before = offered
    assert offered_before == set(DEVICES)


def test_update_windows_per_channel_and_group(fleet: Fleet) -> None:
    closed = check(fleet.server, "dev004", "1.0.0", channel="night")
    assert closed["update_available"] is False and closed["reason"] == "window"
    assert closed["pending"] == "1.1.0"
    assert isinstance(closed["retry_after"], int) and 3600 <= closed["retry_after"] <= 7260
    text = fleet.server.client("dev004").get(
        f"/updates/check/dev004?version=1.0.0&compatible={COMPATIBLE}&channel=night",
        Accept="text/plain",
    )
    keyword, reason, seconds = text.body.decode().splitlines()[-1].split()
    assert (keyword, reason) == ("none", "window")
    assert abs(int(seconds) - closed["retry_after"]) <= 2
    # The group's window (in Europe/Berlin, open now) overrides the channel's.
    assert check(fleet.server, "early-1", "1.0.0", channel="night")["version"] == "1.1.0"


def events(*items: dict[str, object]) -> bytes:
    return json.dumps({"events": list(items)}).encode()


def sqlite(database: Path, query: str) -> str:
    return subprocess.run(
        ["sqlite3", str(database), query], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_telemetry_is_validated_bounded_deduplicated_and_rate_limited(fleet: Fleet) -> None:
    database = fleet.repository / "telemetry.sqlite"
    client = fleet.server.client("dup")
    event = {
        "id": "dl-1",
        "type": "download",
        "time": 1767225600,
        "version": "1.1.0",
        "result": "ok",
        "duration": 12.5,
        "bytes": 2020,
        "delta": True,
        "from": "1.0.0",
        "channel": "lab",
    }
    first = client.post_json("/telemetry", events(event))
    assert first.status == 200 and json.loads(first.body) == {"stored": 1, "duplicates": 0}
    again = client.post_json("/telemetry", events(event, {**event, "id": "dl-2"}))
    assert json.loads(again.body) == {"stored": 1, "duplicates": 1}
    assert (
        sqlite(
            database, "SELECT id, type, duration, delta FROM events WHERE device='dup' ORDER BY id"
        )
        == "dl-1|download|12.5|1\ndl-2|download|12.5|1"
    )
    refused = {
        b"{not json": "not JSON",
        events({**event, "id": "a", "colour": "red"}): "'colour' is not part of",
        events({**event, "id": "b", "duration": -1}): "duration",
        b'{"events": [{"id": "c", "type": "boot", "time": 1, "version": "1", '
        b'"result": "ok", "duration": NaN}]}': "NaN",
        b'{"events": [], "events": []}': "twice",
        events(*[{**event, "id": f"n{n}"} for n in range(101)]): "at most 100",
        events({**event, "id": "d", "type": "apply", "bytes": 5}): "'bytes' is not part of",
        events({**event, "id": "e", "version": "1 0"}): "version",
    }
    for body, message in refused.items():
        answer = client.post_json("/telemetry", body)
        assert answer.status == 400 and message in json.loads(answer.body)["error"], answer.body
    huge = events({**event, "id": "f", "type": "error", "detail": "x" * 4000})
    huge = huge[:-2] + b"," + b" " * (70 << 10) + b"]}"
    too_big = client.post_json("/telemetry", huge)
    assert too_big.status == 413 and "at most 65536" in json.loads(too_big.body)["error"]
    wrong_type = client.request("POST", "/telemetry", events(event), {"Content-Type": "text/x"})
    assert wrong_type.status == 415
    assert sqlite(database, "SELECT COUNT(*) FROM events WHERE device='dup'") == "2"
    # A device over its burst (20 requests) is told when to come back; nothing it sent in
    # refused requests is stored.
    flood = fleet.server.client("flood")
    statuses = []
    for number in range(30):
        answer = flood.post_json("/telemetry", events({**event, "id": f"f-{number}"}))
        statuses.append(answer.status)
        if answer.status == 429:
            assert int(answer.headers["retry-after"]) >= 1
            assert "retry after" in json.loads(answer.body)["error"]
    # One token comes back every 30 s (120 an hour): a slow machine may see one more.
    accepted = statuses.count(200)
    assert 20 <= accepted <= 21 and statuses.count(429) == 30 - accepted, statuses
    assert sqlite(database, "SELECT COUNT(*) FROM events WHERE device='flood'") == str(accepted)


def test_fleet_report_counts_and_median_times(fleet: Fleet) -> None:
    rng = random.Random(7)
    durations: dict[str, list[float]] = {"download": [], "apply": [], "boot": []}
    devices = [f"r-{n}" for n in range(1, 6)]
    for device in devices:
        assert check(fleet.server, device, "1.0.0")["version"] == "1.1.0"
        items = []
        for kind in ("download", "apply", "boot"):
            value = round(rng.uniform(1, 90), 2)
            durations[kind].append(value)
            items.append(
                {
                    "id": f"{device}-{kind}",
                    "type": kind,
                    "time": 1767225600,
                    "version": "1.1.0",
                    "result": "ok",
                    "duration": value,
                }
            )
        if device != "r-5":
            items.append(
                {
                    "id": f"{device}-c",
                    "type": "confirm",
                    "time": 1767225700,
                    "version": "1.1.0",
                    "result": "ok",
                }
            )
        else:
            items.append(
                {
                    "id": f"{device}-rb",
                    "type": "rollback",
                    "time": 1767225700,
                    "version": "1.1.0",
                    "detail": "health check sshd failed",
                }
            )
        answer = fleet.server.client(device).post_json("/telemetry", events(*items))
        assert answer.status == 200, answer.body
    today = datetime.now(UTC).date().isoformat()
    report = json.loads(
        avobuild_cli(
            "fleet",
            "report",
            "--repository",
            fleet.repository,
            "--from",
            today,
            "--to",
            today,
            "--format",
            "json",
        ).stdout
    )
    row = next(r for r in report["releases"] if (r["version"], r["channel"]) == ("1.1.0", "stable"))
    assert row["confirmed"] == 4 and row["rolled_back"] == 1 and row["tried"] == 5
    assert row["installed"] == 5 and row["downloaded"] == 5
    assert row["offered"] >= 5 and row["success_rate"] == 80.0
    assert row["median_download"] == statistics.median(durations["download"])
    assert row["median_apply"] == statistics.median(durations["apply"])
    assert row["median_boot"] == statistics.median(durations["boot"])
    table = avobuild_cli(
        "fleet", "report", "--repository", fleet.repository, "--from", today, "--to", today
    ).stdout
    line = next(
        line for line in table.splitlines() if line.startswith("stable") and " 1.1.0 " in line
    )
    assert "80%" in line and f"{statistics.median(durations['boot']):.1f}s" in line
    yesterday = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
    empty = json.loads(
        avobuild_cli(
            "fleet",
            "report",
            "--repository",
            fleet.repository,
            "--from",
            yesterday,
            "--to",
            yesterday,
            "--format",
            "json",
        ).stdout
    )
    assert empty["releases"] == []


def test_a_release_over_the_failure_threshold_stops_being_offered(fleet: Fleet) -> None:
    server = fleet.server
    for device in (f"halt-{n}" for n in range(1, 6)):
        assert check(server, device, "1.1.0", channel="canary")["version"] == "1.2.0"
    # Three confirm 1.2.0, then two roll back: 20 % is passed once 4 devices tried it.
    for device in ("halt-3", "halt-4", "halt-5", "halt-1", "halt-2"):
        item: dict[str, object] = {"id": "e1", "time": 1, "version": "1.2.0", "channel": "canary"}
        if device in {"halt-1", "halt-2"}:
            item.update(type="rollback", detail="kernel panic")
        else:
            item.update(type="confirm", result="ok")
        assert server.client(device).post_json("/telemetry", events(item)).status == 200
    canary_query = f"version=1.1.0&compatible={COMPATIBLE}&channel=canary"
    wait_for_check(
        server, "halt-6", canary_query, lambda a: a.get("reason") == "halted", "the halt"
    )
    today = datetime.now(UTC).date().isoformat()
    report = avobuild_cli(
        "fleet", "report", "--repository", fleet.repository, "--from", today, "--to", today
    ).stdout
    match = re.search(
        r"HALTED 1\.2\.0 in canary: ([12]) of ([45]) devices that installed 1\.2\.0 in channel "
        r"canary failed \(([0-9]+) %\), over the failure threshold of 20 % "
        r"\(rollouts\.failure-threshold\)",
        report,
    )
    assert match is not None, report
    failed, tried, rate = map(int, match.groups())
    assert failed * 100 > 20 * tried and rate == round(100 * failed / tried)
    # The devices that have it keep it (nothing newer is offered, nothing older either).
    assert check(server, "halt-3", "1.2.0", channel="canary")["reason"] == "current"
    avobuild_cli(
        "fleet", "resume", "1.2.0", "--channel", "canary", "--repository", fleet.repository
    )
    wait_for_check(
        server, "halt-6", canary_query, lambda a: a["update_available"] is True, "resume"
    )


@pytest.fixture
def own_server(fleet: Fleet, tmp_path: Path) -> Iterator[tuple[Path, Server]]:
    """A repository and a server of their own, for a test that breaks things."""
    repository = tmp_path / "repo"
    init_repository(repository, fleet.releases, index_key(tmp_path / "keys"))
    bundles = fleet.releases.bundles
    avobuild_cli(
        "repo", "add", repository, bundles["1.0.0"], bundles["1.1.0"], "--channel", "stable"
    )
    avobuild_cli("repo", "add", repository, bundles["1.2.0"])
    settings = repository / "repository.toml"
    settings.write_text(
        settings.read_text()
        .replace("rate = 120", "rate = 100000")
        .replace("burst = 20", "burst = 1000")
    )
    with running_server(repository, fleet.pki, tmp_path / "serve.log") as server:
        yield repository, server


def test_the_access_log_shows_each_request_and_its_range(fleet: Fleet, tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    with running_server(
        fleet.repository, fleet.pki, log, "--access-log", "--database", str(tmp_path / "t.sqlite")
    ) as server:
        client = server.client("dev010")
        assert client.get("/updates/download/1.1.0", Range="bytes=4096-").status == 206
        assert client.get("/index.signed").status == 200
        deadline = time.monotonic() + 10
        while log.read_text().count('"GET ') < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
    size = fleet.releases.bundles["1.1.0"].stat().st_size
    lines = [line for line in log.read_text().splitlines() if '"GET ' in line]
    ranged = re.search(r'"GET /updates/download/1.1.0 HTTP/1.1" 206 (\d+) "bytes=4096-" ', lines[0])
    assert ranged and size - 4096 < int(ranged[1]) < size, lines  # the bytes sent, with headers
    assert '"GET /index.signed HTTP/1.1" 200 ' in lines[1] and ' "-" ' in lines[1], lines


def test_publishing_while_serving_and_a_file_that_does_not_match(
    fleet: Fleet, own_server: tuple[Path, Server]
) -> None:
    repository, server = own_server
    keyring = load_keyring(repository / "index-keyring.pem")
    client = server.client("dev005")
    first_index = client.get("/index.signed").body
    stop = threading.Event()
    asked = threading.Semaphore(0)

    def publish() -> None:
        from avobuild.fleet.repository import promote

        for step in range(1, 21):
            promote(repository, "1.2.0", "soak", step * 500)
            asked.acquire(timeout=10)  # let the client ask at least once between publishes
        stop.set()

    thread = threading.Thread(target=publish)
    thread.start()
    serials = []
    try:
        while not stop.is_set():
            answer = check(server, "dev005", "1.0.0")
            serials.append(answer["index_serial"])
            data = client.get("/index.signed").body
            read_signed_index(data, keyring, now=int(time.time()))
            asked.release()
    finally:
        thread.join()
    assert serials == sorted(serials) and len(set(serials)) > 5, serials
    # An index that does not verify, or an older one replayed, is not believed: the server
    # keeps answering from the last good one and says why on /healthz.
    index_file = repository / "public" / "index.signed"
    good = index_file.read_bytes()
    serial = read_signed_index(good, keyring, now=int(time.time())).index.serial
    tampered = bytearray(good)
    tampered[good.index(b"\nissued ") - 1] ^= 0x01  # the last digit of the serial
    for bad, reason in ((bytes(tampered), "does not match"), (first_index, "older than serial")):
        temporary = index_file.with_name(".replace.tmp")
        temporary.write_bytes(bad)
        temporary.replace(index_file)
        health = json.loads(client.get("/healthz").body)
        assert health["index_serial"] == serial and reason in health["index_error"], health
        assert check(server, "dev005", "1.0.0")["index_serial"] == serial
    index_file.write_bytes(good)
    # A bundle file changed on disk after publishing is never served, nor offered.
    path = repository / "public" / "bundles" / f"{fleet.sha['1.1.0']}.avb"
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF
    path.write_bytes(bytes(data))
    refused = client.get("/updates/download/1.1.0")
    assert refused.status == 503 and refused.headers["retry-after"] == "300"
    assert "is not the one the signed index names" in json.loads(refused.body)["error"]
    assert check(server, "dev005", "1.0.0")["reason"] == "halted"
    assert "sha256" in server.log.read_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_answers_507_and_keeps_what_was_stored(fleet: Fleet, tmp_path: Path) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mount], check=True)
    database = mount / "telemetry.sqlite"
    try:
        with running_server(
            fleet.repository, fleet.pki, tmp_path / "serve.log", "--database", str(database)
        ) as server:
            client = server.client("dev006")
            item = {"id": "ok-1", "type": "error", "time": 1, "version": "1.1.0", "detail": "a"}
            assert client.post_json("/telemetry", events(item)).status == 200
            filler = mount / "filler"
            with filler.open("wb", buffering=0) as handle:
                try:
                    while True:
                        handle.write(bytes(4096))
                except OSError:
                    pass
            big = [{**item, "id": f"big-{n}", "detail": "x" * 4000} for n in range(15)]
            full = client.post_json("/telemetry", events(*big))
            assert full.status == 507, full.body
            body = json.loads(full.body)
            assert body["stored"] == 0 and "disk is full" in body["error"]
            filler.unlink()
            assert sqlite(database, "SELECT id FROM events") == "ok-1"
            assert client.post_json("/telemetry", events(*big[:3])).status == 200
            assert sqlite(database, "SELECT COUNT(*) FROM events") == "4"
    finally:
        subprocess.run(["umount", mount], check=True)


def test_several_processes_share_the_port(fleet: Fleet, tmp_path: Path) -> None:
    with running_server(
        fleet.repository, fleet.pki, tmp_path / "serve.log", "--workers", "2"
    ) as server:
        for device in DEVICES[:6]:
            assert check(server, device, "1.0.0")["version"] == "1.1.0"
