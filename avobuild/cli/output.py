"""What the command line writes: results on standard output, everything else on standard error.

Results are text, or with `--json` exactly one JSON object (docs/json.md), so a pipeline can
parse standard output whatever happens on standard error. Steps and progress go to standard
error: on a terminal as bars with rate and ETA; elsewhere (CI logs) as plain lines, at most one
per `PLAIN_INTERVAL` seconds per task, plus the last; `--quiet` silences both.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

console = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)
# Errors have their own console: --quiet silences `console` (steps, progress, notes), not them.
error_console = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)
out = Console(highlight=False, soft_wrap=True, markup=False)
state = {"debug": False, "quiet": False}

PLAIN_INTERVAL = 5.0

JsonOption = Annotated[
    bool,
    typer.Option("--json", help="Print one JSON object on standard output (docs/json.md)."),
]


def emit(as_json: bool, document: object, lines: Callable[[], None] | None = None) -> None:
    """The command's result: `document` as JSON, or `lines()` prints the text form."""
    if as_json or lines is None:
        out.print(json.dumps(document, indent=2, sort_keys=True), markup=False)
    else:
        lines()


def step(message: str) -> None:
    """Report one named build step on standard error."""
    if not state["quiet"]:
        console.print(Text("• ", style="bold") + Text(message))


def _amount(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


class PlainProgress:
    """Progress as plain lines for logs: `writing: 12.0 MiB of 96.0 MiB (12%), 30.1 MiB/s,
    ETA 3s`, at most one line per `interval` seconds per task, and the line that ends it."""

    def __init__(
        self, interval: float = PLAIN_INTERVAL, clock: Callable[[], float] = time.monotonic
    ):
        self.interval = interval
        self.clock = clock
        self.started: dict[str, float] = {}
        self.printed: dict[str, float] = {}
        self.finished: set[str] = set()

    def update(self, task: str, done: int, total: int | None) -> str | None:
        """The line to print for this update, or None (too soon, or already finished)."""
        now = self.clock()
        start = self.started.setdefault(task, now)
        complete = total is not None and done >= total
        if task in self.finished:
            return None
        if not complete and now - self.printed.get(task, start) < self.interval:
            return None
        self.printed[task] = now
        if complete:
            self.finished.add(task)
        line = f"{task}: {_amount(done)}"
        if total:
            line += f" of {_amount(total)} ({100 * done // total}%)"
        elapsed = now - start
        if elapsed > 0 and done > 0:
            rate = done / elapsed
            line += f", {_amount(int(rate))}/s"
            if total and not complete:
                line += f", ETA {int((total - done) / rate)}s"
        return line


def _columns() -> tuple[object, ...]:
    return (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )


@contextmanager
def step_progress() -> Iterator[Callable[[str, int, int], None]]:
    """A (step, done, total) callback: one bar per named step, or plain lines, or nothing."""
    if state["quiet"]:
        yield lambda _step, _done, _total: None
        return
    if not console.is_terminal:
        plain = PlainProgress()

        def log(step: str, done: int, total: int) -> None:
            line = plain.update(step, done, total)
            if line is not None:
                console.print(line)

        yield log
        return
    with Progress(*_columns(), console=console, transient=True) as progress:  # type: ignore[arg-type]
        tasks: dict[str, TaskID] = {}

        def update(step: str, done: int, total: int) -> None:
            if step not in tasks:
                tasks[step] = progress.add_task(step, total=total)
            progress.update(tasks[step], completed=done, total=total)

        yield update


@contextmanager
def byte_progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """A progress display fed with (bytes done, bytes total)."""
    with step_progress() as update:
        yield lambda done, total: update(description, done, total)


def print_error(message: str, exit_code: int, as_json: bool) -> None:
    """An error on standard error; with --json also as `{"error": …}` on standard output."""
    error_console.print(Text("error: ", style="bold red") + Text(message))
    if as_json:
        out.print(json.dumps({"error": {"message": message, "exit_code": exit_code}}, indent=2))


def is_json(argv: list[str]) -> bool:
    """Whether the command line asks for JSON (`--json`, or `fleet report --format json`)."""
    pairs = itertools.pairwise(argv)
    return "--json" in argv or "--format=json" in argv or ("--format", "json") in pairs


__all__ = [
    "JsonOption",
    "PlainProgress",
    "byte_progress",
    "console",
    "emit",
    "is_json",
    "out",
    "print_error",
    "state",
    "step",
    "step_progress",
]
