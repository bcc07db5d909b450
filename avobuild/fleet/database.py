"""Choosing the telemetry store from `--database`."""

from __future__ import annotations

from pathlib import Path

from avobuild.fleet.errors import FleetStoreError
from avobuild.fleet.store import SQLITE_FILE, SqliteStore, Store


def open_store(database: str | None, root: Path) -> Store:
    """`postgresql://…` (or `postgres://…`, any libpq URI), a SQLite path, or the default:
    `telemetry.sqlite` in the repository directory."""
    if database is None:
        return SqliteStore(root / SQLITE_FILE)
    if database.startswith(("postgresql://", "postgres://")):
        from avobuild.fleet.postgres import PostgresStore

        return PostgresStore(database)
    if "://" in database:
        raise FleetStoreError(
            f"--database {database!r}: expected postgresql://… or a SQLite file path"
        )
    return SqliteStore(Path(database))
