"""Exception families. Each carries the exit code `avobuild` ends with when it escapes.

Library code raises these; only `cli.main()` catches them, prints the message and exits.
Messages are written for the user: they name the file, key, tool or byte offset at fault.
"""

from __future__ import annotations


class AvobuildError(Exception):
    """Base of every error avobuild reports to the user."""

    exit_code = 1


class RecipeError(AvobuildError):
    """A recipe or layout file is malformed or inconsistent (also: a bad command-line value).

    Not 2: that is typer's exit code for a command line it cannot parse."""

    exit_code = 11


class ToolMissing(AvobuildError):
    """A host tool avobuild needs is not installed."""

    exit_code = 3

    def __init__(self, tool: str, purpose: str, package: str) -> None:
        super().__init__(
            f"{tool}: not found; it is needed to {purpose}. "
            f"Install the Debian package '{package}' (apt-get install {package})."
        )
        self.tool = tool
        self.package = package


class ToolFailed(AvobuildError):
    """An external tool exited non-zero. The message carries a command line to rerun."""

    exit_code = 4

    def __init__(self, command: str, returncode: int, stderr: str) -> None:
        detail = stderr.strip()
        message = f"command failed with exit code {returncode}: {command}"
        if detail:
            message += "\n" + detail
        super().__init__(message)
        self.command = command
        self.returncode = returncode
        self.stderr = stderr


class BuildError(AvobuildError):
    """Building an image failed for a reason other than a tool failing (e.g. it does not fit)."""

    exit_code = 5


class BundleError(AvobuildError):
    """A bundle is malformed, truncated or its contents do not match their hashes."""

    exit_code = 6


class SignatureError(BundleError):
    """A bundle's signature is missing, invalid or made by a key that is not trusted."""

    exit_code = 7


class CompatibilityError(BundleError):
    """A valid bundle that is not meant for this device (compatible string, layout, version)."""

    exit_code = 8


class KeyError_(AvobuildError):
    """A key file cannot be read or is of an unsupported type."""

    exit_code = 9


class InstallError(AvobuildError):
    """The target disk or device cannot take the bundle (layout, sizes, boot state)."""

    exit_code = 10


# Untrusted text (from a bundle, a certificate, a delta stream) reaches messages only through
# `shown`: quoted, every character outside printable ASCII escaped, and cut to a bounded
# length, so a hostile value can neither drive a terminal, forge a log line nor make a message
# (or the JSON it ends up in) huge.
SHOWN_LIMIT = 80


def shown(value: str | bytes, limit: int = SHOWN_LIMIT, *, quoted: bool = True) -> str:
    """`value` as a quoted (or not), escaped, length-bounded string for an error message."""
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    escaped = "".join(_escape(character) for character in text[:limit])
    more = len(text) - limit
    return (f"'{escaped}'" if quoted else escaped) + (
        f" (and {more} more characters)" if more > 0 else ""
    )


def _escape(character: str) -> str:
    if character in "'\\":
        return "\\" + character
    if " " <= character <= "~":
        return character
    code = ord(character)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
