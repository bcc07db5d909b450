"""What every command module shares: the app, the consoles, progress and work directories.

Only the `avobuild.cli` package prints; library code reports through callbacks.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from avobuild import __version__
from avobuild.cli.output import (
    JsonOption,
    byte_progress,
    console,
    emit,
    out,
    state,
    step,
    step_progress,
)
from avobuild.errors import (
    AvobuildError,
    BuildError,
    BundleError,
    InstallError,
    KeyError_,
    RecipeError,
)
from avobuild.fleet.errors import FleetStoreError, RepositoryError

app = typer.Typer(
    help="Build A/B factory images, signed update bundles and on-target appliers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)


def _version_callback(value: bool) -> None:
    if value:
        out.print(f"avobuild {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    debug: Annotated[
        bool, typer.Option("--debug", help="Log every tool command; show tracebacks.")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("-q", "--quiet", help="No steps and no progress on standard error.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Show it."),
    ] = False,
) -> None:
    state["debug"] = debug
    state["quiet"] = quiet
    console.quiet = quiet
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(message)s",
        stream=sys.stderr,
    )


# The family of a file error (an OSError the library did not turn into one of its own) is the
# family of the command that met it: `install` onto a read-only disk is an install error (10),
# `image -o` into a full disk a build error (5). Keys are "group command" or the group alone.
OS_ERROR_FAMILIES: dict[str, type[AvobuildError]] = {
    "image": BuildError,
    "bundle": BundleError,
    "delta": BundleError,
    "install": InstallError,
    "status": InstallError,
    "keys": KeyError_,
    "recipe": RecipeError,
    "layout": RecipeError,
    "applier": BuildError,
    "recovery build": BuildError,
    "recovery install": InstallError,
    "media": BuildError,
    "repo": RepositoryError,
    "serve": RepositoryError,
    "fleet": FleetStoreError,
}


def os_error_family(argv: list[str]) -> type[AvobuildError]:
    """The error family of the command `argv` names (global options skipped), else the base."""
    words = [word for word in argv if not word.startswith("-")][:2]
    for key in (" ".join(words), words[0] if words else ""):
        if key in OS_ERROR_FAMILIES:
            return OS_ERROR_FAMILIES[key]
    return AvobuildError


_OUTPUT_OPTIONS = ("-o", "--output", "--disk")


def output_paths(argv: list[str]) -> list[str]:
    """The values of the output options (`-o`, `--output`, `--disk`) on a command line."""
    found: list[str] = []
    for index, word in enumerate(argv):
        name, equals, value = word.partition("=")
        if name in _OUTPUT_OPTIONS and equals:
            found.append(value)
        elif word in _OUTPUT_OPTIONS and index + 1 < len(argv):
            found.append(argv[index + 1])
    return found


def check_output_directory(path: Path, family: type[AvobuildError]) -> None:
    """Refuse an output directory that exists as something else, before any work."""
    if path.exists() and not path.is_dir():
        raise family(f"{path}: not a directory (the output is a directory of files)")


@contextmanager
def output_file(path: Path) -> Iterator[Path]:
    """`path`, removed again if the command fails before it completes and it did not exist
    before (a full disk must not leave a partial ISO or image that looks finished)."""
    existed = path.exists() or path.is_symlink()
    try:
        yield path
    except BaseException:
        if not existed and path.is_file() and not path.is_symlink():
            path.unlink()
        raise


@contextmanager
def work_directory(keep: Path | None) -> Iterator[Path]:
    """`keep` if given (intermediate files stay for inspection), else a temp directory."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
    else:
        with tempfile.TemporaryDirectory(prefix="avobuild-") as tmp:
            yield Path(tmp)


WorkdirOption = Annotated[
    Path | None,
    typer.Option("--workdir", help="Keep intermediate files here instead of a temp directory."),
]


__all__ = [
    "JsonOption",
    "WorkdirOption",
    "app",
    "byte_progress",
    "check_output_directory",
    "console",
    "emit",
    "os_error_family",
    "out",
    "output_file",
    "output_paths",
    "state",
    "step",
    "step_progress",
    "work_directory",
]
