"""The `avobuild` command line: the only package that prints, shows progress and exits.

Library functions raise `AvobuildError` subclasses; `main()` catches them once, prints the
message (a traceback only with --debug) and exits with the family's code. Each command group
lives in its own module of this package; every module is imported here so its commands
register themselves on `app`.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys

from rich.text import Text

from avobuild.cli.common import app, console, state
from avobuild.errors import AvobuildError

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def main() -> None:
    """Entry point: run the app, turn avobuild errors into messages and exit codes.

    typer handles usage errors itself (exit code 2, which no AvobuildError uses); our errors
    propagate out of it.
    """
    try:
        app()
    except AvobuildError as error:
        if state["debug"]:
            console.print_exception()
        console.print(Text("error: ", style="bold red") + Text(str(error)))
        sys.exit(error.exit_code)
    except BrokenPipeError:
        os._exit(0)


__all__ = ["app", "main"]
