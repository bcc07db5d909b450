"""The PostgreSQL store: the same tables and SQL as SQLite, shared by several servers.

`--database` is handed to libpq unchanged (psycopg 3), so every libpq URI works: host and
port, a socket directory, `sslmode`, `service=`. Each server process keeps a small
connection pool; every request is one transaction, and PostgreSQL's own group commit shares
the fsyncs. Creating the tables takes a transaction-scoped advisory lock, so servers
starting together against an empty database do not race each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import AsyncConnectionPool

from avobuild.fleet.errors import FleetStoreError
from avobuild.fleet.store import (
    COUNT_DEVICES,
    DELETE_HALT,
    INSERT_EVENT,
    INSERT_HALT,
    INSERT_OFFER,
    SCHEMA,
    SCHEMA_VERSION,
    SELECT_EVENTS,
    SELECT_HALTS,
    SELECT_OFFERS,
    EventRow,
    Halt,
    OfferRow,
    Store,
    StoreFull,
    event_parameters,
)
from avobuild.fleet.telemetry import Event

# pg_advisory_xact_lock key: "avobuild" in ASCII, as a 64-bit number.
_SCHEMA_LOCK = int.from_bytes(b"avobuild", "big") & ((1 << 63) - 1)
POOL_SIZE = 8


def _sql(query: str) -> str:
    return query.replace("?", "%s")


def _shown(url: str) -> str:
    """The URL without a password, for messages."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user}@{host}"


class PostgresStore(Store):
    def __init__(self, url: str) -> None:
        self.url = url
        self.description = f"PostgreSQL {_shown(url)}"
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] | None = None

    def _error(self, error: Exception, doing: str) -> FleetStoreError:
        if isinstance(error, pg_errors.DiskFull):
            return StoreFull(
                f"{self.description}: cannot {doing}: the database's disk is full; nothing of "
                "it was stored"
            )
        return FleetStoreError(f"{self.description}: cannot {doing}: {error}")

    async def open(self) -> None:
        pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
            self.url, min_size=1, max_size=POOL_SIZE, open=False, timeout=10
        )
        try:
            await pool.open(wait=True, timeout=10)
            async with pool.connection() as connection, connection.transaction():
                await connection.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                for statement in SCHEMA:
                    await connection.execute(statement)
                cursor = await connection.execute("SELECT COUNT(*) FROM fleet_schema")
                row = await cursor.fetchone()
                if row is not None and row[0] == 0:
                    await connection.execute(
                        "INSERT INTO fleet_schema VALUES (%s)", (SCHEMA_VERSION,)
                    )
        except Exception as error:
            await pool.close()
            raise self._error(error, "open") from None
        self._pool = pool

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    def _connections(self) -> AsyncConnectionPool[psycopg.AsyncConnection[Any]]:
        assert self._pool is not None
        return self._pool

    async def _execute(self, query: str, parameters: Sequence[Any], doing: str) -> int:
        try:
            async with self._connections().connection() as connection:
                cursor = await connection.execute(_sql(query), parameters)
                return cursor.rowcount
        except psycopg.Error as error:
            raise self._error(error, doing) from None

    async def _fetch(self, query: str, parameters: Sequence[Any]) -> list[tuple[Any, ...]]:
        try:
            async with self._connections().connection() as connection:
                cursor = await connection.execute(_sql(query), parameters)
                return list(await cursor.fetchall())
        except psycopg.Error as error:
            raise self._error(error, "read") from None

    async def add_events(
        self, device: str, events: Sequence[Event], received: int, default_channel: str
    ) -> int:
        query = _sql(INSERT_EVENT)
        rows = [event_parameters(device, event, received, default_channel) for event in events]
        try:
            async with (
                self._connections().connection() as connection,
                connection.transaction(),
                connection.cursor() as cursor,
            ):
                # One round trip for all the events (psycopg pipelines executemany); the row
                # count is the sum over the rows, those already stored counting 0.
                await cursor.executemany(query, rows)
                return cursor.rowcount
        except psycopg.Error as error:
            raise self._error(error, "store telemetry") from None

    async def record_offer(self, device: str, version: str, channel: str, now: int) -> None:
        await self._execute(INSERT_OFFER, (device, version, channel, now), "record an offer")

    async def halt(self, halt: Halt) -> bool:
        parameters = (halt.version, halt.channel, halt.time, halt.reason)
        return await self._execute(INSERT_HALT, parameters, "record a halt") == 1

    async def resume(self, version: str, channel: str) -> bool:
        return await self._execute(DELETE_HALT, (version, channel), "remove a halt") == 1

    async def halts(self) -> list[Halt]:
        return [Halt(*row) for row in await self._fetch(SELECT_HALTS, ())]

    async def device_counts(self, version: str, channel: str) -> tuple[int, int]:
        ((attempted, failed),) = await self._fetch(COUNT_DEVICES, (version, channel))
        return int(attempted), int(failed)

    async def report_rows(self, start: int, end: int) -> tuple[list[EventRow], list[OfferRow]]:
        events = [EventRow(*row) for row in await self._fetch(SELECT_EVENTS, (start, end))]
        offers = [OfferRow(*row) for row in await self._fetch(SELECT_OFFERS, (start, end))]
        return events, offers
