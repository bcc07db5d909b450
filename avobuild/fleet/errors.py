"""The fleet side's error families; like those of `avobuild/errors.py`, each has an exit code.

A refused index is a `SignatureError` (exit code 7), since a device must treat it exactly like
a refused bundle signature: nothing in it may be believed.
"""

from __future__ import annotations

from avobuild.errors import AvobuildError, SignatureError


class RepositoryError(AvobuildError):
    """The repository's settings, catalog or public tree is wrong, or a command cannot apply."""

    exit_code = 12


class IndexRefused(SignatureError):
    """An index that must not be believed: malformed, badly signed, rolled back or expired
    (exit code 7, a SignatureError's)."""


class FleetStoreError(AvobuildError):
    """The telemetry database cannot be opened, read or written (full disk, bad URL)."""

    exit_code = 13
