"""`avobuild serve`: the check/download/telemetry API over mutual TLS (docs/fleet.md, "API").

```
GET  /updates/check/<device-id>?version=V&compatible=C[&channel=N]   what to install next
GET  /updates/download/<version>[?from=V][&compatible=C]            a full or delta bundle
GET  /bundles/<sha256>.avb                                          the same, by content
GET  /index.signed                                                  the signed index
POST /telemetry                                                     events, JSON
GET  /healthz                                                       the server's own state
```

Every request comes over TLS with a verified device certificate (tls.py); the device id is
the certificate's, never the client's word, so a device can ask and report only for itself.
Every answer is decided from the signed index the repository published (rollout.py), the
halts the failure threshold recorded (shared through the database, so every server behind a
load balancer agrees within HALT_REFRESH seconds), and the update window of the device's
group or channel. Errors are JSON `{"error": "...", "status": N}` with the HTTP status that
fits; nothing outside the index's own files is ever read from disk for a request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote

from aiohttp import web

from avobuild.fleet.errors import FleetStoreError
from avobuild.fleet.index import (
    CHANNEL,
    IDENTIFIER,
    IndexDelta,
    IndexRelease,
    compatible_matches,
)
from avobuild.fleet.ranged import send_file
from avobuild.fleet.rollout import Reason, choose_offer
from avobuild.fleet.serving import (
    BundleFiles,
    FileRefused,
    IndexCache,
    LoadedIndex,
    RateLimiter,
    process_rss,
)
from avobuild.fleet.settings import Settings
from avobuild.fleet.store import Halt, Store, StoreFull
from avobuild.fleet.telemetry import TelemetryRefused, parse_report
from avobuild.fleet.tls import IdentityRefused, device_of

log = logging.getLogger("avobuild.fleet.serve")

HALT_REFRESH = 2.0
MAX_DOWNLOADS_PER_DEVICE = 4
JUDGE_PAUSE = 1.0
# Retry-After of a 503 (RFC 9110 section 10.2.3; the agent waits at least that long): the
# database is usually back soon; a bundle file that does not match the index needs an operator.
RETRY_STORE = 30
RETRY_FILE = 300
CHECK_TEXT = "avobuild-check 1"
_SHA_FILE = r"{name:[0-9a-f]{64}\.avb}"


class ApiError(Exception):
    """An answer other than success: the status, a message, extra JSON fields and headers."""

    def __init__(
        self,
        status: int,
        message: str,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.extra = extra


def _fail(status: int, message: str, **extra: Any) -> NoReturn:
    raise ApiError(status, message, **extra)


def _unavailable(message: str, seconds: int, **extra: Any) -> NoReturn:
    """503 with Retry-After: devices come back after `seconds`, not at once."""
    raise ApiError(
        503, message, headers={"Retry-After": str(seconds)}, retry_after=seconds, **extra
    )


def _json_error(
    status: int, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> web.Response:
    return web.json_response(
        {"error": message, "status": status, **extra}, status=status, headers=headers
    )


@web.middleware
async def errors_as_json(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as error:
        return _json_error(error.status, error.message, error.headers, **error.extra)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        message = {
            404: "no such resource",
            405: f"method {request.method} not allowed here",
            413: "request body too large",
        }.get(error.status, error.reason)
        headers = {k: v for k, v in error.headers.items() if k in {"Allow", "Retry-After"}}
        return _json_error(error.status, message, headers)


@dataclass
class _Halts:
    loaded: float = -HALT_REFRESH
    by_release: dict[tuple[str, str], Halt] | None = None


class FleetServer:
    """One server process's application: settings, index, store and per-device limits."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        index: IndexCache,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.index = index
        self.clock = clock
        self.limiter = RateLimiter(settings.telemetry.rate, settings.telemetry.burst)
        self.files: BundleFiles | None = None
        self._halts = _Halts()
        self._offers_recorded: set[tuple[str, str, str]] = set()
        self._downloads: dict[str, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._files_checked = ""
        self._judging: set[str] = set()
        self._judge_again: set[str] = set()

    # --- lifecycle ----------------------------------------------------------------------------

    def application(self) -> web.Application:
        app = web.Application(
            middlewares=[errors_as_json],
            client_max_size=self.settings.telemetry.max_body,
        )
        app.add_routes(
            [
                web.get("/updates/check/{device_id}", self.check),
                web.get("/updates/download/{version}", self.download),
                web.get("/bundles/" + _SHA_FILE, self.bundle),
                web.get("/index.signed", self.signed_index),
                web.post("/telemetry", self.telemetry),
                web.get("/healthz", self.health),
            ]
        )
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        app.on_response_prepare.append(_server_header)
        return app

    async def _start(self, _app: web.Application) -> None:
        await self.store.open()
        self.files = BundleFiles(self.index.path.parent)
        self._check_files(self.index.current())

    async def _stop(self, _app: web.Application) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self.store.close()

    def _background(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background work failed: %s", task.exception())

    def _current(self) -> LoadedIndex:
        loaded = self.index.current()
        self._check_files(loaded)
        return loaded

    def _check_files(self, loaded: LoadedIndex) -> None:
        """Start the hash checks of a newly loaded index's files (once per index)."""
        if loaded.verified.sha256 == self._files_checked:
            return
        assert self.files is not None
        self._files_checked = loaded.verified.sha256
        index = loaded.verified.index
        for release in index.releases:
            self.files.schedule(release.sha256, release.size)
        for delta in index.deltas:
            self.files.schedule(delta.sha256, delta.size)

    # --- identity and limits --------------------------------------------------------------

    def _device(self, request: web.Request) -> str:
        transport = request.transport
        peer = transport.get_extra_info("peercert") if transport is not None else None
        try:
            device = device_of(peer)
        except IdentityRefused as error:
            _fail(403, str(error))
        if not self.settings.device_known(device):
            _fail(403, f"device {device} is not known to this server ([devices] allow / deny)")
        return device

    def _limit(self, device: str) -> None:
        wait = self.limiter.take(device)
        if wait:
            seconds = max(1, int(wait + 0.999))
            _fail(
                429,
                f"device {device}: more than {self.settings.telemetry.burst} requests at once or "
                f"{self.settings.telemetry.rate} an hour; retry after {seconds} s",
                headers={"Retry-After": str(seconds)},
                retry_after=seconds,
            )

    # --- check ----------------------------------------------------------------------------

    async def _halted(self, channel: str) -> set[str]:
        now = time.monotonic()
        if self._halts.by_release is None or now - self._halts.loaded >= HALT_REFRESH:
            try:
                halts = await self.store.halts()
            except FleetStoreError as error:
                if self._halts.by_release is None:
                    _unavailable(str(error), RETRY_STORE)
                log.error("%s; using the halts read before", error)
            else:
                self._halts = _Halts(now, {(h.version, h.channel): h for h in halts})
        assert self._halts.by_release is not None
        return {version for version, name in self._halts.by_release if name == channel}

    def _query(self, request: web.Request, key: str, required: bool) -> str | None:
        values = request.query.getall(key, [])
        if len(values) > 1:
            _fail(400, f"query parameter {key!r} given {len(values)} times")
        if not values:
            if required:
                _fail(400, f"query parameter {key!r} is required")
            return None
        value = values[0]
        pattern = CHANNEL if key == "channel" else IDENTIFIER
        if not pattern.fullmatch(value):
            _fail(400, f"query parameter {key!r}: {value[:80]!r} is not a valid {key}")
        return value

    async def check(self, request: web.Request) -> web.Response:
        device = self._device(request)
        asked_for = request.match_info["device_id"]
        if asked_for != device:
            _fail(
                403,
                f"this certificate is for device {device}; it may not ask for {asked_for[:80]!r}",
            )
        self._limit(device)
        version = self._query(request, "version", required=True)
        compatible = self._query(request, "compatible", required=True)
        asked_channel = self._query(request, "channel", required=False)
        assert version is not None and compatible is not None
        channel = self.settings.channel_for(device, asked_channel)
        loaded = self._current()
        index = loaded.verified.index
        withheld = await self._halted(channel)
        assert self.files is not None
        withheld |= {
            rollout.version
            for rollout in index.channel(channel)
            if (release := index.release(rollout.version, compatible)) is not None
            and self.files.broken(release.sha256)
        }
        offer = choose_offer(index, device, compatible, version, channel, withheld)
        answer: dict[str, Any] = {
            "update_available": False,
            "channel": channel,
            "index_serial": index.serial,
        }
        release = offer.release
        if release is not None:
            window = self.settings.window_for(device, channel)
            now = self.clock()
            if window is not None and not window.is_open(now):
                answer.update(
                    reason=Reason.WINDOW.value,
                    pending=release.version,
                    window=f"{window.text} {window.zone}",
                    retry_after=window.seconds_until_open(now),
                )
            else:
                answer.update(self._offer_fields(index.releases, release, offer.delta, compatible))
                self._record_offer(device, release.version, channel)
        else:
            assert offer.reason is not None
            answer["reason"] = offer.reason.value
            if offer.pending is not None:
                answer["pending"] = offer.pending.version
        if "text/plain" in request.headers.get("Accept", ""):
            return web.Response(text=_check_text(answer), content_type="text/plain")
        return web.json_response(answer)

    def _offer_fields(
        self,
        releases: tuple[IndexRelease, ...],
        release: IndexRelease,
        delta: IndexDelta | None,
        compatible: str,
    ) -> dict[str, Any]:
        ambiguous = sum(1 for r in releases if r.version == release.version) > 1
        base = f"/updates/download/{quote(release.version, safe='')}"
        suffix = f"compatible={quote(compatible, safe='')}" if ambiguous else ""
        fields: dict[str, Any] = {
            "update_available": True,
            "version": release.version,
            "url": base + (f"?{suffix}" if suffix else ""),
            "size": release.size,
            "hash": release.sha256,
            "security_version": release.security_version,
        }
        if delta is not None:
            query = f"from={quote(delta.from_version, safe='')}" + (f"&{suffix}" if suffix else "")
            fields["delta"] = {
                "from": delta.from_version,
                "url": f"{base}?{query}",
                "size": delta.size,
                "hash": delta.sha256,
            }
        return fields

    def _record_offer(self, device: str, version: str, channel: str) -> None:
        key = (device, version, channel)
        if key in self._offers_recorded:
            return
        if len(self._offers_recorded) > 500_000:
            self._offers_recorded.clear()
        self._offers_recorded.add(key)

        async def record() -> None:
            try:
                await self.store.record_offer(device, version, channel, int(self.clock()))
            except FleetStoreError as error:
                self._offers_recorded.discard(key)
                log.error("offer of %s to %s not recorded: %s", version, device, error)

        self._background(record())

    # --- downloads --------------------------------------------------------------------------

    async def download(self, request: web.Request) -> web.StreamResponse:
        device = self._device(request)
        version = request.match_info["version"]
        if not IDENTIFIER.fullmatch(version):
            _fail(404, f"no release {version[:80]!r}")
        from_version = self._query(request, "from", required=False)
        compatible = self._query(request, "compatible", required=False)
        index = self._current().verified.index
        entries: list[IndexRelease | IndexDelta]
        if from_version is None:
            entries = [
                r
                for r in index.releases
                if r.version == version and (compatible is None or r.matches(compatible))
            ]
            what = f"release {version}"
        else:
            entries = [
                d
                for d in index.deltas
                if d.to_version == version
                and d.from_version == from_version
                and (compatible is None or compatible_matches(d.compatible, compatible))
            ]
            what = f"delta from {from_version} to {version}"
        if compatible is not None:
            what += f" for {compatible}"
        if not entries:
            _fail(404, f"the index has no {what}")
        if len(entries) > 1:
            _fail(
                409,
                f"the index has {what} for several device families; add ?compatible=",
                compatible=[entry.compatible for entry in entries],
            )
        return await self._send(request, device, entries[0].sha256, entries[0].size)

    async def bundle(self, request: web.Request) -> web.StreamResponse:
        device = self._device(request)
        sha256 = request.match_info["name"].removesuffix(".avb")
        entry = self._current().verified.index.file(sha256)
        if entry is None:
            _fail(404, f"bundles/{sha256}.avb is not in the index")
        return await self._send(request, device, entry.sha256, entry.size)

    async def _send(
        self, request: web.Request, device: str, sha256: str, size: int
    ) -> web.StreamResponse:
        assert self.files is not None
        try:
            path = await self.files.ready(sha256, size)
        except FileRefused as error:
            _unavailable(str(error), RETRY_FILE)
        running = self._downloads.get(device, 0)
        if running >= MAX_DOWNLOADS_PER_DEVICE:
            _fail(
                429,
                f"device {device}: {running} downloads already running",
                headers={"Retry-After": "10"},
                retry_after=10,
            )
        self._downloads[device] = running + 1
        try:
            return await send_file(
                request, path, sha256, size, cache_control="public, max-age=31536000, immutable"
            )
        finally:
            left = self._downloads[device] - 1
            if left:
                self._downloads[device] = left
            else:
                del self._downloads[device]

    async def signed_index(self, request: web.Request) -> web.StreamResponse:
        device = self._device(request)
        self._limit(device)
        verified = self._current().verified
        tag = f'"{verified.sha256}"'
        headers = {"ETag": tag, "Cache-Control": "no-cache"}
        if tag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        return web.Response(body=verified.data, headers=headers, content_type="text/plain")

    # --- telemetry --------------------------------------------------------------------------

    async def telemetry(self, request: web.Request) -> web.Response:
        device = self._device(request)
        self._limit(device)
        if request.content_type != "application/json":
            _fail(415, f"expected Content-Type application/json, got {request.content_type!r}")
        limit = self.settings.telemetry.max_body
        if request.content_length is not None and request.content_length > limit:
            _fail(
                413,
                f"the body has {request.content_length} bytes, at most {limit} are accepted",
                limit=limit,
            )
        body = await request.read()
        try:
            report = parse_report(body, self.settings.telemetry.max_events)
        except TelemetryRefused as error:
            _fail(400, f"telemetry refused, nothing stored: {error}")
        if report.device is not None and report.device != device:
            _fail(
                403,
                f"this certificate is for device {device}; it may not report for "
                f"{report.device[:80]!r}",
            )
        try:
            stored = await self.store.add_events(
                device,
                report.events,
                int(self.clock()),
                self.settings.channel_for(device, None),
            )
        except StoreFull as error:
            _fail(507, str(error), stored=0)
        except FleetStoreError as error:
            _unavailable(str(error), RETRY_STORE, stored=0)
        for version in {event.version for event in report.events if event.attempted}:
            self._want_judgement(version)
        return web.json_response({"stored": stored, "duplicates": len(report.events) - stored})

    def _want_judgement(self, version: str) -> None:
        """Judge `version` again soon: at most one judgement per release runs at a time, and
        reports arriving meanwhile make it run once more afterwards."""
        if version in self._judging:
            self._judge_again.add(version)
            return
        self._judging.add(version)
        self._background(self._judge_until_settled(version))

    async def _judge_until_settled(self, version: str) -> None:
        try:
            while True:
                self._judge_again.discard(version)
                await self._judge(version)
                if version not in self._judge_again:
                    return
                await asyncio.sleep(JUDGE_PAUSE)
        finally:
            self._judging.discard(version)

    async def _judge(self, version: str) -> None:
        """Halt the release in each channel that offers it where its failure rate passed the
        threshold (rollouts.failure-threshold, once rollouts.minimum-devices tried it)."""
        index = self.index.current().verified.index
        rules = self.settings.rollouts
        halted = self._halts.by_release or {}
        for rollout in index.rollouts:
            if rollout.version != version or (version, rollout.channel) in halted:
                continue
            tried, failed = await self.store.device_counts(version, rollout.channel)
            if tried < rules.minimum_devices or failed * 100 <= rules.failure_threshold * tried:
                continue
            reason = (
                f"{failed} of {tried} devices that installed {version} in channel "
                f"{rollout.channel} failed ({100 * failed / tried:.0f} %), over the failure "
                f"threshold of {rules.failure_threshold} % (rollouts.failure-threshold)"
            )
            if await self.store.halt(Halt(version, rollout.channel, int(self.clock()), reason)):
                log.warning("halted: %s", reason)
            self._halts = _Halts()

    # --- health -----------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        self._device(request)
        loaded = self._current()
        index = loaded.verified.index
        return web.json_response(
            {
                "repository": index.repository,
                "index_serial": index.serial,
                "index_expires": index.expires,
                "index_expired": loaded.expired,
                "index_error": self.index.error,
                "store": self.store.description,
                "peak_rss": process_rss(),
            }
        )


async def _server_header(_request: web.Request, response: web.StreamResponse) -> None:
    # Name the product, not the Python and aiohttp versions behind it.
    response.headers["Server"] = "avobuild"


def _check_text(answer: dict[str, Any]) -> str:
    """The check answer for a shell client (docs/fleet.md, "The text form")."""
    lines = [CHECK_TEXT, f"channel {answer['channel']}", f"serial {answer['index_serial']}"]
    if answer["update_available"]:
        lines.append(
            f"update {answer['version']} {answer['size']} {answer['hash']} {answer['url']}"
        )
        delta = answer.get("delta")
        if delta is not None:
            lines.append(f"delta {delta['from']} {delta['size']} {delta['hash']} {delta['url']}")
    elif answer["reason"] == Reason.WINDOW:
        lines.append(f"none window {answer['retry_after']}")
    else:
        lines.append(f"none {answer['reason']}")
    return "".join(line + "\n" for line in lines)


# One line per request: peer, request line, status, bytes sent (headers included), the Range
# asked for (a resumed download shows where it resumed), the client, seconds taken.
ACCESS_LOG_FORMAT = '%a "%r" %s %b "%{Range}i" "%{User-Agent}i" %Tf'


@dataclass(frozen=True)
class Listen:
    host: str
    port: int
    certificate: Path
    key: Path
    client_ca: Path
    access_log: bool = False
    reuse_port: bool = False


def run_server(server: FleetServer, listen: Listen) -> None:
    """Serve until SIGINT or SIGTERM (aiohttp's own server, not a development server)."""
    from avobuild.fleet.tls import server_context

    context = server_context(listen.certificate, listen.key, listen.client_ca)
    access_log = logging.getLogger("aiohttp.access")
    if listen.access_log:
        access_log.setLevel(logging.INFO)
    web.run_app(
        server.application(),
        host=listen.host,
        port=listen.port,
        ssl_context=context,
        access_log=access_log if listen.access_log else None,
        access_log_format=ACCESS_LOG_FORMAT,
        print=None,
        backlog=1024,
        reuse_port=listen.reuse_port,
        shutdown_timeout=10.0,
        # Devices make one or two requests per connection; idle ones are closed soon.
        keepalive_timeout=15.0,
    )
