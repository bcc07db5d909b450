"""Where telemetry, offers and halts are kept: SQLite by default, PostgreSQL for several servers.

Both back ends run the same SQL (written with `?` placeholders; the PostgreSQL store turns
them into `%s`) over the same three tables (docs/fleet.md, "Telemetry database"):

* `events`: one row per (device, event id), the first copy kept, so resending is harmless;
* `offers`: the first time each device was offered each release in each channel;
* `halts`: the releases the failure threshold stopped, per channel, with the reason.

The SQLite store is one file in WAL mode with `synchronous=FULL`: an answer that says
"stored" is on disk. All its work runs on one thread with one connection; concurrent writes
are committed together in one transaction (group commit), each in its own savepoint, so the
fsync per commit is shared without one bad request spoiling the others. A full disk rolls the
whole batch back and every waiting request learns it (StoreFull): nothing already stored is
touched, and nothing is half stored.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from avobuild.fleet.errors import FleetStoreError
from avobuild.fleet.telemetry import Event

log = logging.getLogger("avobuild.fleet.store")

SCHEMA_VERSION = 1
SQLITE_FILE = "telemetry.sqlite"
_BATCH = 256

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS fleet_schema (version INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS events ("
    " device TEXT NOT NULL, id TEXT NOT NULL, type TEXT NOT NULL, time BIGINT NOT NULL,"
    " received BIGINT NOT NULL, version TEXT NOT NULL, channel TEXT NOT NULL,"
    " from_version TEXT, result TEXT NOT NULL, duration DOUBLE PRECISION, bytes BIGINT,"
    " delta SMALLINT, detail TEXT, attempted SMALLINT NOT NULL, failed SMALLINT NOT NULL,"
    " PRIMARY KEY (device, id))",
    "CREATE INDEX IF NOT EXISTS events_received ON events (received)",
    "CREATE INDEX IF NOT EXISTS events_release ON events (version, channel)",
    "CREATE TABLE IF NOT EXISTS offers ("
    " device TEXT NOT NULL, version TEXT NOT NULL, channel TEXT NOT NULL,"
    " first BIGINT NOT NULL, PRIMARY KEY (device, version, channel))",
    "CREATE INDEX IF NOT EXISTS offers_first ON offers (first)",
    "CREATE TABLE IF NOT EXISTS halts ("
    " version TEXT NOT NULL, channel TEXT NOT NULL, time BIGINT NOT NULL,"
    " reason TEXT NOT NULL, PRIMARY KEY (version, channel))",
)

INSERT_EVENT = (
    "INSERT INTO events (device, id, type, time, received, version, channel, from_version,"
    " result, duration, bytes, delta, detail, attempted, failed)"
    " VALUES (?, ?, ?, ?, ?, ?,"
    " COALESCE(?, (SELECT o.channel FROM offers o WHERE o.device = ? AND o.version = ?"
    " ORDER BY o.first DESC LIMIT 1), ?),"
    " ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (device, id) DO NOTHING"
)
INSERT_OFFER = (
    "INSERT INTO offers (device, version, channel, first) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (device, version, channel) DO NOTHING"
)
INSERT_HALT = (
    "INSERT INTO halts (version, channel, time, reason) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (version, channel) DO NOTHING"
)
DELETE_HALT = "DELETE FROM halts WHERE version = ? AND channel = ?"
SELECT_HALTS = "SELECT version, channel, time, reason FROM halts ORDER BY time, version, channel"
COUNT_DEVICES = (
    "SELECT COUNT(DISTINCT CASE WHEN attempted = 1 THEN device END),"
    " COUNT(DISTINCT CASE WHEN failed = 1 THEN device END)"
    " FROM events WHERE version = ? AND channel = ?"
)
SELECT_EVENTS = (
    "SELECT version, channel, type, result, device, duration FROM events"
    " WHERE received >= ? AND received < ?"
)
SELECT_OFFERS = "SELECT version, channel, device FROM offers WHERE first >= ? AND first < ?"


class StoreFull(FleetStoreError):
    """The database's disk is full: nothing of the request was stored."""


@dataclass(frozen=True)
class Halt:
    version: str
    channel: str
    time: int
    reason: str


@dataclass(frozen=True)
class EventRow:
    version: str
    channel: str
    type: str
    result: str
    device: str
    duration: float | None


@dataclass(frozen=True)
class OfferRow:
    version: str
    channel: str
    device: str


def event_parameters(
    device: str, event: Event, received: int, default_channel: str
) -> tuple[Any, ...]:
    return (
        device,
        event.id,
        event.type.value,
        event.time,
        received,
        event.version,
        event.channel,
        device,
        event.version,
        default_channel,
        event.from_version,
        event.result.value,
        event.duration,
        event.bytes,
        None if event.delta is None else int(event.delta),
        event.detail,
        int(event.attempted),
        int(event.failed),
    )


class Store(ABC):
    """The server's and the report's access to the database (one instance per process)."""

    description: str

    @abstractmethod
    async def open(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def add_events(
        self, device: str, events: Sequence[Event], received: int, default_channel: str
    ) -> int:
        """Store the events not stored before; how many were new."""

    @abstractmethod
    async def record_offer(self, device: str, version: str, channel: str, now: int) -> None: ...

    @abstractmethod
    async def halts(self) -> list[Halt]: ...

    @abstractmethod
    async def halt(self, halt: Halt) -> bool:
        """Record a halt unless one exists; whether this call recorded it."""

    @abstractmethod
    async def resume(self, version: str, channel: str) -> bool: ...

    @abstractmethod
    async def device_counts(self, version: str, channel: str) -> tuple[int, int]:
        """(devices that installed, devices that failed) for a release in a channel."""

    @abstractmethod
    async def report_rows(self, start: int, end: int) -> tuple[list[EventRow], list[OfferRow]]:
        """Events received and offers first made in [start, end)."""


T = TypeVar("T")


@dataclass
class _Write:
    run: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]


class SqliteStore(Store):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = f"SQLite {path}"
        self._connection: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._queue: asyncio.Queue[_Write] | None = None
        self._writer: asyncio.Task[None] | None = None

    async def open(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="avobuild-sqlite")
        await self._call(self._connect)
        self._queue = asyncio.Queue()
        self._writer = asyncio.create_task(self._write_loop())

    def _connect(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            connection.execute("PRAGMA busy_timeout = 10000")
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute("PRAGMA synchronous = FULL")
            connection.execute("BEGIN IMMEDIATE")
            for statement in SCHEMA:
                connection.execute(statement)
            if connection.execute("SELECT COUNT(*) FROM fleet_schema").fetchone()[0] == 0:
                connection.execute("INSERT INTO fleet_schema VALUES (?)", (SCHEMA_VERSION,))
            connection.execute("COMMIT")
        except (sqlite3.Error, OSError) as error:
            raise _store_error(self.path, error, "open") from None
        self._connection = connection

    async def close(self) -> None:
        if self._writer is not None:
            assert self._queue is not None
            await self._queue.join()
            self._writer.cancel()
        if self._executor is not None:
            await self._call(self._disconnect)
            self._executor.shutdown()

    def _disconnect(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    async def _call(self, function: Callable[..., T], *args: Any) -> T:
        assert self._executor is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def _db(self) -> sqlite3.Connection:
        assert self._connection is not None
        return self._connection

    async def _write(self, run: Callable[[sqlite3.Connection], T]) -> T:
        assert self._queue is not None
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Write(run, future))
        return await future

    async def _write_loop(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            while len(batch) < _BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                outcomes = await self._call(self._commit, batch)
            except BaseException as error:
                outcomes = [error] * len(batch)
            for item, outcome in zip(batch, outcomes, strict=True):
                if not item.future.done():
                    if isinstance(outcome, BaseException):
                        item.future.set_exception(outcome)
                    else:
                        item.future.set_result(outcome)
                self._queue.task_done()

    def _commit(self, batch: list[_Write]) -> list[Any]:
        """Run a batch in one transaction, each write in a savepoint (on the DB thread)."""
        connection = self._db()
        outcomes: list[Any] = []
        try:
            connection.execute("BEGIN IMMEDIATE")
            for item in batch:
                connection.execute("SAVEPOINT request")
                try:
                    outcomes.append(item.run(connection))
                    connection.execute("RELEASE request")
                except sqlite3.Error as error:
                    if _is_full(error):
                        raise
                    connection.execute("ROLLBACK TO request")
                    connection.execute("RELEASE request")
                    outcomes.append(_store_error(self.path, error, "write"))
            connection.execute("COMMIT")
        except BaseException as error:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            if not isinstance(error, sqlite3.Error):
                raise
            failure = _store_error(self.path, error, "write")
            return [failure] * len(batch)
        return outcomes

    async def add_events(
        self, device: str, events: Sequence[Event], received: int, default_channel: str
    ) -> int:
        rows = [event_parameters(device, event, received, default_channel) for event in events]

        def run(connection: sqlite3.Connection) -> int:
            # The row count sums over the rows; those already stored count 0.
            return connection.executemany(INSERT_EVENT, rows).rowcount

        return await self._write(run)

    async def record_offer(self, device: str, version: str, channel: str, now: int) -> None:
        await self._write(lambda c: c.execute(INSERT_OFFER, (device, version, channel, now)))

    async def halt(self, halt: Halt) -> bool:
        def run(connection: sqlite3.Connection) -> bool:
            parameters = (halt.version, halt.channel, halt.time, halt.reason)
            return connection.execute(INSERT_HALT, parameters).rowcount == 1

        return await self._write(run)

    async def resume(self, version: str, channel: str) -> bool:
        return await self._write(lambda c: c.execute(DELETE_HALT, (version, channel)).rowcount == 1)

    async def halts(self) -> list[Halt]:
        def run() -> list[Halt]:
            return [Halt(*row) for row in self._read(SELECT_HALTS, ())]

        return await self._call(run)

    async def device_counts(self, version: str, channel: str) -> tuple[int, int]:
        def run() -> tuple[int, int]:
            ((attempted, failed),) = self._read(COUNT_DEVICES, (version, channel))
            return int(attempted), int(failed)

        return await self._call(run)

    async def report_rows(self, start: int, end: int) -> tuple[list[EventRow], list[OfferRow]]:
        def run() -> tuple[list[EventRow], list[OfferRow]]:
            events = [EventRow(*row) for row in self._read(SELECT_EVENTS, (start, end))]
            offers = [OfferRow(*row) for row in self._read(SELECT_OFFERS, (start, end))]
            return events, offers

        return await self._call(run)

    def _read(self, query: str, parameters: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        try:
            return list(self._db().execute(query, parameters).fetchall())
        except sqlite3.Error as error:
            raise _store_error(self.path, error, "read") from None


def _is_full(error: sqlite3.Error) -> bool:
    return getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL


def _store_error(path: Path, error: BaseException, doing: str) -> FleetStoreError:
    if isinstance(error, sqlite3.Error) and _is_full(error):
        return StoreFull(f"{path}: cannot {doing}: the disk is full; nothing of it was stored")
    if isinstance(error, OSError):
        return FleetStoreError(f"{path}: cannot {doing}: {error.strerror or error}")
    return FleetStoreError(f"{path}: cannot {doing}: {error}")
