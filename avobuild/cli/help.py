"""Help like git's: `-h` and `--help`, plain text (no markup that could swallow `[recovery]`),
metavars that say what to type (`PATH`, `NAME=PATH`, `DIR`, `N`), shell completion.

typer builds the click command tree from the annotated functions; `build_command` takes that
tree and sets these on every command and parameter once, so no command module repeats them.
"""

from __future__ import annotations

from typing import Any

import typer

HELP_OPTIONS = ["-h", "--help"]

# Parameters whose value is a directory, and metavars the name alone cannot give.
_DIRECTORIES = {"root", "workdir", "repository"}
_METAVARS = {
    "disk": "IMAGE",
    "keyring": "KEYRING",
    "key": "KEY",
    "decryption_key": "KEY",
    "delta_key": "KEY",
    "encryption_key": "KEY",
    "bundle_keyring": "KEYRING",
    "index_keyring": "KEYRING",
    "certificate": "CERT",
    "encrypt_for": "CERT",
    "client_ca": "CERT",
    "ca_certificate": "CERT",
    "pkcs11": "URI",
    "database": "URL|FILE",
    "server": "IP",
    "start": "DATE",
    "end": "DATE",
    "pair": "FROM:TO",
    "tools": "SET,SET",
    "mac": "MAC[=MODE]",
    "key_type": "TYPE",
    "percent": "PERCENT",
    "min_applier_version": "VERSION",
    "security_version": "N",
    "security_floor": "N",
    "expires": "TIME",
    "chunk_size": "SIZE",
    "validity": "DURATION",
    "remove": "KEY-ID",
    "rsa_bits": "BITS",
}
# click's type names (typer <= 0.28) as the annotation `_annotation` reports.
_CLICK_TYPES = {"int": "int", "integer": "int", "integer range": "int", "path": "Path"}


def metavar_for(param: Any) -> str | None:
    """What to type for `param` (None: a flag, which takes no value)."""
    if getattr(param, "is_flag", False) or getattr(param, "count", False):
        return None
    name = param.name or ""
    help_text = getattr(param, "help", None) or ""
    if "NAME=PATH" in help_text:
        value = "NAME=PATH"
    elif name in _METAVARS:
        value = _METAVARS[name]
    elif name in _DIRECTORIES or "directory" in help_text.lower().split(".")[0]:
        value = "DIR"
    elif _annotation(param) == "int":
        value = "N"
    elif "Path" in _annotation(param):
        value = "PATH"
    else:
        value = name.upper().replace("_", "-")
    return value


def _configure_argument(param: Any) -> None:
    """git's style: `avobuild repo add DIR BUNDLE...`, no braces, no Python type column."""
    name = "DIR" if param.name in _DIRECTORIES else param.name.upper().replace("_", "-")
    if name.endswith("S") and param.nargs != 1:
        name = name[:-1]
    more = "..." if param.nargs != 1 else ""
    usage = name + more if param.required else f"[{name}]{more}"
    param.metavar = name + more
    param.display_type_rich = lambda ctx: None
    param._usage_display_name = lambda: usage  # typer 0.29
    param.get_usage_pieces = lambda ctx: [usage]  # typer <= 0.28


def _annotation(param: Any) -> str:
    """The parameter's type, as text ("int", "Path", "str").

    typer up to 0.28 gives the click type of the parameter (`int`, `path`); 0.29 keeps the
    annotation itself in `type_descriptor`.
    """
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is not None:
        annotation = descriptor.annotation
        return getattr(annotation, "__name__", str(annotation)).replace("pathlib.", "")
    return _CLICK_TYPES.get(getattr(param.type, "name", ""), "")


def _configure(command: Any) -> None:
    command.rich_markup_mode = None
    command.context_settings = {**command.context_settings, "help_option_names": HELP_OPTIONS}
    for param in command.params:
        if getattr(param, "param_type_name", "") == "argument":
            _configure_argument(param)
        elif param.metavar is None:
            metavar = metavar_for(param)
            if metavar is not None:
                param.metavar = metavar
    for child in getattr(command, "commands", {}).values():
        _configure(child)


def build_command(app: typer.Typer) -> Any:
    """The click command of `app`, configured for help and completion."""
    command = typer.main.get_command(app)
    _configure(command)
    return command
