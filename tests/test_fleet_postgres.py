"""Two `avobuild serve` instances on one real PostgreSQL server (started by the test).

Oracles: the rows read back with `psql`; one server seeing the other's halts and deduplicating
the other's events; the report of `avobuild fleet report --database`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import avobuild_cli
from test_fleet_support import (
    COMPATIBLE,
    Postgres,
    Server,
    index_key,
    init_repository,
    make_pki,
    postgres_cluster,
    release_bundles,
    running_server,
    wait_for_check,
)

DEVICES = [f"pg-{n}" for n in range(1, 9)]


@dataclass(frozen=True)
class Shared:
    postgres: Postgres
    repository: Path
    first: Server
    second: Server


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    root = tmp_path_factory.mktemp("pg")
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
    avobuild_cli("repo", "add", repository, releases.bundles["1.2.0"], "--channel", "canary")
    settings = repository / "repository.toml"
    settings.write_text(settings.read_text().replace("minimum-devices = 5", "minimum-devices = 3"))
    pki = make_pki(root / "pki", DEVICES)
    with postgres_cluster() as postgres, ExitStack() as stack:
        first = stack.enter_context(
            running_server(repository, pki, root / "first.log", "--database", postgres.url)
        )
        second = stack.enter_context(
            running_server(repository, pki, root / "second.log", "--database", postgres.url)
        )
        yield Shared(postgres, repository, first, second)


def check(server: Server, device: str, version: str, channel: str) -> dict[str, object]:
    answer = server.client(device).get(
        f"/updates/check/{device}?version={version}&compatible={COMPATIBLE}&channel={channel}"
    )
    assert answer.status == 200, answer.body
    result = answer.json()
    assert isinstance(result, dict)
    return result


def post(server: Server, device: str, *items: dict[str, object]) -> dict[str, int]:
    answer = server.client(device).post_json("/telemetry", json.dumps({"events": items}).encode())
    assert answer.status == 200, answer.body
    result = answer.json()
    assert isinstance(result, dict)
    return result


def test_events_offers_and_halts_are_shared(shared: Shared) -> None:
    first, second = shared.first, shared.second
    download = {
        "id": "dl",
        "type": "download",
        "time": 1767225600,
        "version": "1.1.0",
        "result": "ok",
        "duration": 4.25,
    }
    assert check(first, "pg-1", "1.0.0", "stable")["version"] == "1.1.0"
    assert post(first, "pg-1", download) == {"stored": 1, "duplicates": 0}
    # The device resends through the other server behind the load balancer: kept once.
    assert post(second, "pg-1", download) == {"stored": 0, "duplicates": 1}
    rows = shared.postgres.psql(
        "SELECT device, id, type, channel, duration FROM events ORDER BY device, id"
    )
    assert rows.split() == ["pg-1|dl|download|stable|4.25"]

    # Four devices try 1.2.0 in canary through either server; two roll back.
    for number, device in enumerate(DEVICES[1:5]):
        server = first if number % 2 else second
        assert check(server, device, "1.1.0", "canary")["version"] == "1.2.0"
        kind = "rollback" if number < 2 else "confirm"
        item: dict[str, object] = {"id": "r", "type": kind, "time": 1, "version": "1.2.0"}
        if kind == "rollback":
            item["detail"] = "watchdog"
        else:
            item["result"] = "ok"
        post(server, device, item)
    assert (
        shared.postgres.psql(
            "SELECT COUNT(*) FROM offers WHERE version = '1.2.0' AND channel = 'canary'"
        ).strip()
        == "4"
    )
    # Whichever server judged it, both stop offering 1.2.0.
    canary_query = f"version=1.1.0&compatible={COMPATIBLE}&channel=canary"
    for server in (first, second):
        wait_for_check(
            server, "pg-8", canary_query, lambda a: a.get("reason") == "halted", "the halt"
        )
    halt = shared.postgres.psql("SELECT version, channel, reason FROM halts").strip()
    assert halt.startswith("1.2.0|canary|2 of ") and "failure threshold of 20 %" in halt

    today = datetime.now(UTC).date().isoformat()
    report = json.loads(
        avobuild_cli(
            "fleet",
            "report",
            "--database",
            shared.postgres.url,
            "--from",
            today,
            "--to",
            today,
            "--format",
            "json",
        ).stdout
    )
    rows_by_release = {(r["version"], r["channel"]): r for r in report["releases"]}
    canary = rows_by_release[("1.2.0", "canary")]
    assert canary["offered"] == 4 and canary["tried"] == 4 and canary["rolled_back"] == 2
    assert canary["confirmed"] == 2 and canary["success_rate"] == 50.0
    assert canary["halted"] == halt.split("|", 2)[2]
    assert rows_by_release[("1.1.0", "stable")]["median_download"] == 4.25

    avobuild_cli(
        "fleet", "resume", "1.2.0", "--channel", "canary", "--database", shared.postgres.url
    )
    assert shared.postgres.psql("SELECT COUNT(*) FROM halts").strip() == "0"
    wait_for_check(second, "pg-8", canary_query, lambda a: a["update_available"] is True, "resume")


def test_servers_starting_together_create_the_schema_once(shared: Shared) -> None:
    """Several stores opening an empty database at once: the advisory lock serialises the
    schema creation, and every one of them works."""
    from avobuild.fleet.postgres import PostgresStore

    fresh_url = shared.postgres.url.rsplit("/", 1)[0] + "/fresh"
    shared.postgres.psql("CREATE DATABASE fresh")

    async def open_all() -> list[int]:
        stores = [PostgresStore(fresh_url) for _ in range(4)]
        await asyncio.gather(*(store.open() for store in stores))
        try:
            return [len(await store.halts()) for store in stores]
        finally:
            await asyncio.gather(*(store.close() for store in stores))

    assert asyncio.run(open_all()) == [0, 0, 0, 0]
    count = shared.postgres.psql("SELECT COUNT(*) FROM fleet_schema", "fresh").strip()
    assert count == "1"
