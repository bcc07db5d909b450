"""`avobuild serve DIR`: the check/download/telemetry server over mutual TLS (docs/fleet.md)."""

from __future__ import annotations

import logging
import multiprocessing
import signal
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated

import typer

from avobuild.cli.common import app, console

if TYPE_CHECKING:
    from avobuild.fleet.server import FleetServer, Listen
    from avobuild.fleet.settings import Settings
    from avobuild.fleet.signing import Keyring

DatabaseOption = Annotated[
    str | None,
    typer.Option(
        help="postgresql://… (several servers share it) or a SQLite file "
        "(default: DIR/telemetry.sqlite)."
    ),
]


@app.command("serve")
def serve(
    root: Annotated[Path, typer.Argument(help="The repository directory (repo init).")],
    certificate: Annotated[Path, typer.Option(help="The server's certificate chain, PEM.")],
    key: Annotated[Path, typer.Option(help="The server's private key, PEM.")],
    client_ca: Annotated[
        Path, typer.Option(help="The CA certificates device certificates must chain to.")
    ],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8443,
    database: DatabaseOption = None,
    workers: Annotated[
        int, typer.Option(help="Server processes sharing the port (SO_REUSEPORT).")
    ] = 1,
    access_log: Annotated[
        bool, typer.Option("--access-log", help="Log every request to standard error.")
    ] = False,
) -> None:
    """Answer /updates/check, /updates/download, /telemetry; devices need a certificate."""
    from avobuild.fleet.errors import RepositoryError
    from avobuild.fleet.server import Listen, run_server
    from avobuild.fleet.settings import load_settings
    from avobuild.fleet.signing import load_index_keyring
    from avobuild.fleet.tls import server_context

    settings = load_settings(root)
    if settings.index_keyring is None:
        raise RepositoryError(f"{settings.path}: [signing] keyring: missing")
    if workers < 1:
        raise RepositoryError(f"--workers: expected 1 or more, got {workers}")
    keyring = load_index_keyring(settings.index_keyring)
    listen = Listen(host, port, certificate, key, client_ca, access_log, reuse_port=workers > 1)
    server_context(certificate, key, client_ca)  # refuse a bad certificate before forking

    first = _make_server(settings, keyring, database)
    logging.getLogger("avobuild.fleet").setLevel(logging.INFO)
    console.print(
        f"serving {settings.root / 'public'} (repository {settings.name}, index serial "
        f"{first.index.current().verified.index.serial}) on https://{host}:{port}, "
        f"telemetry in {first.store.description}, {workers} process(es)"
    )
    if workers == 1:
        run_server(first, listen)
        return
    _run_workers(workers, settings, keyring, database, listen)


def _make_server(settings: Settings, keyring: Keyring, database: str | None) -> FleetServer:
    from avobuild.fleet.database import open_store
    from avobuild.fleet.repository import index_path
    from avobuild.fleet.server import FleetServer
    from avobuild.fleet.serving import IndexCache

    index = IndexCache(index_path(settings.root), keyring, settings.name, time.time)
    return FleetServer(settings, open_store(database, settings.root), index)


def _worker(settings: Settings, keyring: Keyring, database: str | None, listen: Listen) -> None:
    from avobuild.fleet.server import run_server

    run_server(_make_server(settings, keyring, database), listen)


def _run_workers(
    workers: int, settings: Settings, keyring: Keyring, database: str | None, listen: Listen
) -> None:
    """Fork the server processes (each opens its own store and event loop after the fork)
    and stop them all on SIGTERM or SIGINT."""
    context = multiprocessing.get_context("fork")
    processes = [
        context.Process(target=_worker, args=(settings, keyring, database, listen))
        for _ in range(workers)
    ]

    def stop(_signum: int, _frame: FrameType | None) -> None:
        for process in processes:
            if process.is_alive():
                process.terminate()

    for process in processes:
        process.start()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for process in processes:
        process.join()
