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

from avobuild.cli.common import app, os_error_family, output_paths, state
from avobuild.cli.help import build_command
from avobuild.cli.output import error_console, is_json, print_error
from avobuild.errors import AvobuildError

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def main() -> None:
    """Entry point: run the app, turn avobuild errors into messages and exit codes.

    typer handles usage errors itself (exit code 2, which no AvobuildError uses); our errors
    propagate out of it.
    """
    try:
        build_command(app)(prog_name="avobuild")
    except AvobuildError as error:
        _fail(error)
    except BrokenPipeError:
        os._exit(0)
    except OSError as error:
        # A file the library opened itself (an output directory that is a file, a read-only
        # or full disk): the error of the command's family, naming the path.
        _fail(os_error_family(sys.argv[1:])(_describe(error, sys.argv[1:])))
    except KeyboardInterrupt:
        error_console.print(Text("interrupted", style="bold red"))
        sys.exit(130)


def _fail(error: AvobuildError) -> None:
    if state["debug"]:
        error_console.print_exception()
    print_error(str(error), error.exit_code, is_json(sys.argv[1:]))
    sys.exit(error.exit_code)


def _describe(error: OSError, argv: list[str]) -> str:
    """`PATH: reason` (`PATH -> PATH2: reason` for a rename or link), as `ls` would say it.

    A failed write (a full disk) carries no file name: it is one of the command's outputs.
    """
    reason = error.strerror or str(error)
    if error.filename is None:
        outputs = output_paths(argv)
        return f"{', '.join(outputs)}: {reason}" if outputs else reason
    path = os.fsdecode(error.filename)
    if error.filename2 is not None:
        path += f" -> {os.fsdecode(error.filename2)}"
    return f"{path}: {reason}"


__all__ = ["app", "main"]
