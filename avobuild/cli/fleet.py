"""`avobuild fleet …`: reports from the telemetry devices send to `avobuild serve`."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from avobuild.cli.common import JsonOption, app, console, emit, out
from avobuild.cli.serve import DatabaseOption

if TYPE_CHECKING:
    from avobuild.fleet.report import FleetReport
    from avobuild.fleet.store import Store

fleet_app = typer.Typer(help="Reports on the fleet's updates (telemetry).", no_args_is_help=True)
app.add_typer(fleet_app, name="fleet")

RepositoryOption = Annotated[
    Path,
    typer.Option("--repository", help="The repository directory (its telemetry.sqlite)."),
]


def parse_moment(text: str, option: str, *, end: bool) -> int:
    """`2026-01-31` (a whole UTC day: its start, or with `end` the start of the next day) or an
    ISO 8601 time (UTC unless it names an offset), as seconds since 1970."""
    from avobuild.errors import RecipeError

    try:
        day = date.fromisoformat(text)
    except ValueError:
        pass
    else:
        moment = datetime(day.year, day.month, day.day, tzinfo=UTC)
        return int((moment + timedelta(days=1 if end else 0)).timestamp())
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise RecipeError(
            f"{option}: expected a date (2026-01-31) or an ISO 8601 time, got {text!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


def _store(repository: Path, database: str | None) -> Store:
    """The telemetry store of a repository that exists, or a SQLite file that does (a wrong
    --repository or --database must not leave an empty database behind)."""
    from avobuild.fleet.database import open_store
    from avobuild.fleet.errors import FleetStoreError, RepositoryError

    if database is None and not (repository / "repository.toml").is_file():
        raise RepositoryError(
            f"{repository}: not an update repository (no repository.toml); give --repository DIR"
        )
    if database is not None and "://" not in database and not Path(database).is_file():
        raise FleetStoreError(f"{database}: no such telemetry database (avobuild serve writes it)")
    return open_store(database, repository)


async def _report(store: Store, start: int, end: int) -> FleetReport:
    from avobuild.fleet.report import build_report

    await store.open()
    try:
        events, offers = await store.report_rows(start, end)
        halts = await store.halts()
    finally:
        await store.close()
    return build_report(events, offers, halts, start, end)


@fleet_app.command("report")
def fleet_report(
    start: Annotated[str, typer.Option("--from", help="First day (UTC) or time.")],
    end: Annotated[str, typer.Option("--to", help="Last day (UTC, included) or time.")],
    output_format: Annotated[
        str, typer.Option("--format", metavar="json|table", help="json or table.")
    ] = "table",
    repository: RepositoryOption = Path(),
    database: DatabaseOption = None,
    as_json: JsonOption = False,
) -> None:
    """Per release and channel: offered, downloaded, installed, confirmed, rolled back,
    success rate and median times."""
    from avobuild.errors import RecipeError

    if output_format not in {"json", "table"}:
        raise RecipeError(f"--format: expected json or table, got {output_format!r}")
    first = parse_moment(start, "--from", end=False)
    last = parse_moment(end, "--to", end=True)
    if last <= first:
        raise RecipeError(f"--to {end}: not after --from {start}")
    import asyncio

    report = asyncio.run(_report(_store(repository, database), first, last))
    if output_format == "json" or as_json:
        document = {
            "from": _iso(report.start),
            "to": _iso(report.end),
            "releases": [asdict(release) for release in report.releases],
        }
        out.print(json.dumps(document, indent=2, sort_keys=True))
        return
    _print_table(report)


def _iso(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def _print_table(report: FleetReport) -> None:
    header = (
        "channel",
        "release",
        "offered",
        "downloaded",
        "installed",
        "confirmed",
        "rolled back",
        "success",
        "download",
        "apply",
        "boot",
    )
    rows = [
        (
            r.channel,
            r.version,
            str(r.offered),
            str(r.downloaded),
            str(r.installed),
            str(r.confirmed),
            str(r.rolled_back),
            "-" if r.success_rate is None else f"{r.success_rate:.0f}%",
            _seconds(r.median_download),
            _seconds(r.median_apply),
            _seconds(r.median_boot),
        )
        for r in report.releases
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    out.print(f"update report {_iso(report.start)} to {_iso(report.end)} (median times)")
    for row in [header, *rows]:
        out.print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    for release in report.releases:
        if release.halted is not None:
            out.print(f"HALTED {release.version} in {release.channel}: {release.halted}")


@fleet_app.command("resume")
def fleet_resume(
    version: Annotated[str, typer.Argument(help="The halted release.")],
    channel: Annotated[str, typer.Option(help="The channel it was halted in.")],
    repository: RepositoryOption = Path(),
    database: DatabaseOption = None,
    as_json: JsonOption = False,
) -> None:
    """Offer a release again that the failure threshold halted."""
    from avobuild.fleet.errors import RepositoryError

    async def resume() -> bool:
        store = _store(repository, database)
        await store.open()
        try:
            return await store.resume(version, channel)
        finally:
            await store.close()

    import asyncio

    if not asyncio.run(resume()):
        raise RepositoryError(f"{version} is not halted in channel {channel}")
    if as_json:
        emit(True, {"version": version, "channel": channel, "resumed": True})
        return
    console.print(f"{version}: offered again in channel {channel} (servers see it within 2 s)")
