"""What a server process keeps between requests: the index, checked files, rate buckets.

* `IndexCache` re-reads the published index when the file changes (one `stat` per request;
  the repository replaces the file by rename, so a read sees the old or the new index, never
  half). A new index is believed only if it verifies with the devices' own keyring and is not
  older than the one served; otherwise the previous one stays in service and the error is
  reported by /healthz and the log.
* `BundleFiles` hashes each bundle file the index names once (per inode, size and mtime) in a
  worker thread, before its first byte is served: a file that does not match the signed index
  is never sent, and its release is not offered.
* `RateLimiter` is a token bucket per device (telemetry.rate per hour, telemetry.burst at
  once), per server process; idle buckets are forgotten so memory stays bounded.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from avobuild.fleet.errors import IndexRefused
from avobuild.fleet.index import VerifiedIndex, read_signed_index
from avobuild.fleet.signing import Keyring

log = logging.getLogger("avobuild.fleet.serve")

MAX_BUCKETS = 200_000


@dataclass(frozen=True)
class LoadedIndex:
    verified: VerifiedIndex
    expired: bool
    file_key: tuple[int, int, int, int]


def _file_key(path: Path) -> tuple[int, int, int, int]:
    status = path.stat()
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)


class IndexCache:
    def __init__(
        self, path: Path, keyring: Keyring, repository: str, clock: Callable[[], float]
    ) -> None:
        self.path = path
        self.keyring = keyring
        self.repository = repository
        self.clock = clock
        self.error: str | None = None
        loaded = self._load(None)
        if loaded is None:
            raise IndexRefused(self.error or f"{path}: cannot load the index")
        self._loaded: LoadedIndex = loaded

    def _load(self, previous: LoadedIndex | None) -> LoadedIndex | None:
        try:
            key = _file_key(self.path)
            data = self.path.read_bytes()
        except OSError as error:
            self.error = f"{self.path}: cannot read the index: {error.strerror}"
            return None
        now = int(self.clock())
        try:
            verified = read_signed_index(
                data,
                self.keyring,
                now=now,
                repository=self.repository,
                last_serial=previous.verified.index.serial if previous else None,
                name=str(self.path),
                allow_expired=True,
            )
        except IndexRefused as error:
            self.error = str(error)
            return None
        self.error = None
        return LoadedIndex(verified, now >= verified.index.expires, key)

    def current(self) -> LoadedIndex:
        """The index to answer from: the file's, if it changed and is acceptable."""
        loaded = self._loaded
        try:
            key = _file_key(self.path)
        except OSError:
            return loaded
        if key != loaded.file_key:
            fresh = self._load(loaded)
            if fresh is None:
                log.error("%s; still serving serial %d", self.error, loaded.verified.index.serial)
                # Do not retry this same file on every request.
                self._loaded = LoadedIndex(loaded.verified, loaded.expired, key)
            else:
                log.info("%s: now serving serial %d", self.path, fresh.verified.index.serial)
                self._loaded = fresh
        expired = int(self.clock()) >= self._loaded.verified.index.expires
        if expired != self._loaded.expired:
            self._loaded = LoadedIndex(self._loaded.verified, expired, self._loaded.file_key)
        return self._loaded


class FileRefused(Exception):
    """A bundle file is missing or does not match the signed index."""


def _hash_file(path: Path) -> tuple[str, int]:
    with path.open("rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    return digest, path.stat().st_size


class BundleFiles:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._checks: dict[str, tuple[tuple[int, int, int, int], asyncio.Task[None]]] = {}
        self._hashing = asyncio.Semaphore(1)

    def path(self, sha256: str) -> Path:
        return self.root / "bundles" / f"{sha256}.avb"

    def schedule(self, sha256: str, size: int) -> asyncio.Task[None] | None:
        """Start (or find) the check of the current file for `sha256`."""
        path = self.path(sha256)
        try:
            key = _file_key(path)
        except OSError:
            return None
        known = self._checks.get(sha256)
        if known is not None and known[0] == key:
            return known[1]
        task = asyncio.get_running_loop().create_task(self._check(path, sha256, size))
        self._checks[sha256] = (key, task)
        return task

    async def _check(self, path: Path, sha256: str, size: int) -> None:
        async with self._hashing:
            try:
                digest, actual = await asyncio.to_thread(_hash_file, path)
            except OSError as error:
                raise FileRefused(f"{path}: cannot read: {error.strerror}") from None
        if (digest, actual) != (sha256, size):
            log.error(
                "%s: sha256 %s, %d bytes; the index says %s, %d", path, digest, actual, sha256, size
            )
            raise FileRefused(
                f"bundles/{sha256}.avb: the file on the server ({actual} bytes, sha256 "
                f"{digest}) is not the one the signed index names; it is not served"
            )

    async def ready(self, sha256: str, size: int) -> Path:
        """The verified file for `sha256`; FileRefused when missing or wrong."""
        task = self.schedule(sha256, size)
        if task is None:
            raise FileRefused(f"bundles/{sha256}.avb: missing on the server")
        await asyncio.shield(task)
        return self.path(sha256)

    def broken(self, sha256: str) -> bool:
        """Known to be missing or wrong (a check that has not finished is not broken)."""
        known = self._checks.get(sha256)
        if known is None:
            return not self.path(sha256).is_file()
        task = known[1]
        return task.done() and not task.cancelled() and task.exception() is not None


class RateLimiter:
    def __init__(self, per_hour: int, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate = per_hour / 3600.0
        self.burst = float(burst)
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> float:
        """0 if a request may proceed (and counts it), else the seconds until it may."""
        now = self.clock()
        tokens, then = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens - 1.0, now)
        if len(self._buckets) > MAX_BUCKETS:
            self._forget_full(now)
        return 0.0

    def _forget_full(self, now: float) -> None:
        full_after = self.burst / self.rate
        for key, (_, then) in list(self._buckets.items()):
            if now - then >= full_after:
                del self._buckets[key]
        if len(self._buckets) > MAX_BUCKETS:
            # Everyone is active: drop the oldest half (they get a fresh burst, no more).
            ordered = sorted(self._buckets.items(), key=lambda item: item[1][1])
            for key, _ in ordered[: len(ordered) // 2]:
                del self._buckets[key]


def process_rss() -> int:
    """This process's peak resident set, bytes (for /healthz)."""
    try:
        with open(f"/proc/{os.getpid()}/status") as status:  # noqa: PTH123 - procfs
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
