"""Simulated devices on loopback: each opens its own TLS connection with its own client
certificate, sends two requests on it (keep-alive) and closes it.

Patterns (`--pattern`):
  serve   GET /updates/check/<id>?version=…&compatible=…, then POST /telemetry (2 events)
  static  GET /index.signed twice (what a device reading a static repository does)

At most `--concurrency` devices are in flight; the run stops after `--devices` devices or
`--time-limit` seconds, whichever comes first. Prints one JSON object: counts, wall time,
requests per second and latency percentiles (ms) per request kind, the TLS handshake
included in the first request's latency and also reported on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import ssl
import statistics
import time
from pathlib import Path


def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def read_response(reader: asyncio.StreamReader) -> int:
    status_line = await reader.readline()
    status = int(status_line.split()[1])
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    if length:
        await reader.readexactly(length)
    return status


class Run:
    def __init__(self, arguments: argparse.Namespace) -> None:
        self.args = arguments
        self.ca = Path(arguments.server_ca).read_text()
        self.latency: dict[str, list[float]] = {"handshake": [], "first": [], "second": []}
        self.statuses: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.done = 0

    def context(self, device: str) -> ssl.SSLContext:
        context = ssl.create_default_context(cadata=self.ca)
        context.load_cert_chain(Path(self.args.devices_dir) / f"{device}.pem")
        return context

    def requests(self, device: str, number: int) -> tuple[bytes, bytes]:
        host = f"Host: localhost:{self.args.port}\r\n"
        if self.args.pattern == "static":
            get = f"GET /index.signed HTTP/1.1\r\n{host}\r\n".encode()
            return get, get
        version = "1.0.0" if number % 2 else "1.1.0"
        check = (
            f"GET /updates/check/{device}?version={version}&compatible={self.args.compatible}"
            f" HTTP/1.1\r\n{host}Accept: application/json\r\n\r\n"
        ).encode()
        events = [
            {
                "id": f"{device}-dl-{number}",
                "type": "download",
                "time": 1767225600,
                "version": "1.1.0",
                "result": "ok",
                "duration": 10 + number % 50,
                "bytes": 2048,
            },
            {
                "id": f"{device}-ap-{number}",
                "type": "apply",
                "time": 1767225660,
                "version": "1.1.0",
                "result": "ok",
                "duration": 20 + number % 30,
            },
        ]
        body = json.dumps({"events": events}).encode()
        post = (
            f"POST /telemetry HTTP/1.1\r\n{host}Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        return check, post

    async def device(self, number: int) -> None:
        device = f"bench-{number:05d}"
        context = self.context(device)
        first, second = self.requests(device, number)
        start = time.perf_counter()
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", self.args.port, ssl=context, server_hostname="localhost"
            )
        except (OSError, ssl.SSLError) as error:
            self.errors[type(error).__name__] = self.errors.get(type(error).__name__, 0) + 1
            return
        connected = time.perf_counter()
        self.latency["handshake"].append((connected - start) * 1000)
        try:
            for kind, request in (("first", first), ("second", second)):
                sent = time.perf_counter()
                writer.write(request)
                status = await read_response(reader)
                self.latency[kind].append((time.perf_counter() - sent) * 1000)
                key = f"{kind} {status}"
                self.statuses[key] = self.statuses.get(key, 0) + 1
        except (OSError, ssl.SSLError, ValueError, asyncio.IncompleteReadError) as error:
            self.errors[type(error).__name__] = self.errors.get(type(error).__name__, 0) + 1
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
        self.done += 1

    async def main(self) -> dict[str, object]:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for number in range(self.args.devices):
            queue.put_nowait(number)
        deadline = time.monotonic() + self.args.time_limit
        started = time.perf_counter()

        async def worker() -> None:
            while time.monotonic() < deadline:
                try:
                    number = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await self.device(number)

        await asyncio.gather(*(worker() for _ in range(self.args.concurrency)))
        wall = time.perf_counter() - started
        requests = len(self.latency["first"]) + len(self.latency["second"])
        return {
            "pattern": self.args.pattern,
            "devices": self.done,
            "concurrency": self.args.concurrency,
            "requests": requests,
            "wall_s": round(wall, 2),
            "requests_per_s": round(requests / wall, 1),
            "devices_per_s": round(self.done / wall, 1),
            "statuses": self.statuses,
            "errors": self.errors,
            "latency_ms": {
                kind: {
                    "p50": round(percentile(values, 0.50) or 0, 2),
                    "p99": round(percentile(values, 0.99) or 0, 2),
                    "mean": round(statistics.fmean(values), 2) if values else 0,
                }
                for kind, values in self.latency.items()
            },
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--server-ca", required=True)
    parser.add_argument("--devices-dir", required=True)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--time-limit", type=float, default=300.0)
    parser.add_argument("--pattern", choices=("serve", "static"), default="serve")
    parser.add_argument("--compatible", default="bench-board")
    result = asyncio.run(Run(parser.parse_args()).main())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
