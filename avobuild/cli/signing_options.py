"""The signing options `bundle create`, `bundle resign` and `delta create` share.

Every command that signs takes the same options and turns them into one
`avobuild.bundle.signing.SigningPlan`; this is also the only place that reads the PKCS#11
module and PIN from the environment (AVOBUILD_PKCS11_MODULE, AVOBUILD_PKCS11_PIN), so the
library receives them as values.
"""

from __future__ import annotations

import os
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from avobuild.errors import RecipeError

if TYPE_CHECKING:
    from avobuild.bundle.manifest import Policy
    from avobuild.bundle.signing import SigningPlan
    from avobuild.model.recipe import SigningConfig

MODULE_VARIABLE = "AVOBUILD_PKCS11_MODULE"
PIN_VARIABLE = "AVOBUILD_PKCS11_PIN"

KeyOption = Annotated[
    list[Path] | None,
    typer.Option("--key", help="Private signing key, PEM (repeatable: one signature each)."),
]
Pkcs11Option = Annotated[
    list[str] | None,
    typer.Option("--pkcs11", help="Sign with a token key: a pkcs11: URI (repeatable)."),
]
Pkcs11ModuleOption = Annotated[
    Path | None,
    typer.Option(
        help=f"PKCS#11 module (.so), unless the URI has module-path= (default: ${MODULE_VARIABLE})."
    ),
]
CertificateOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--certificate", help="Signer certificate and intermediates (PEM) to carry (repeatable)."
    ),
]
EncryptForOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--encrypt-for",
        help="Encrypt the payload for this recipient: RSA/EC public key or certificate "
        "(repeatable).",
    ),
]
EncryptionKeyOption = Annotated[
    Path | None,
    typer.Option(help="Encrypt the payload with this key file (32 bytes, raw or hex)."),
]
SecurityVersionOption = Annotated[
    int | None, typer.Option(help="Anti-rollback security version (devices refuse lower).")
]
MinApplierVersionOption = Annotated[
    str | None, typer.Option(help="Oldest applier version allowed to install, e.g. 1.2.")
]
ExpiresOption = Annotated[
    str | None,
    typer.Option(help="Refuse installation after this time: seconds or ISO 8601 (UTC)."),
]


def signing_plan(
    *,
    keys: list[Path] | None,
    pkcs11: list[str] | None,
    pkcs11_module: Path | None,
    certificates: list[Path] | None,
    encrypt_for: list[Path] | None = None,
    encryption_key: Path | None = None,
    unsigned: bool = False,
    recipe: tuple[Path, SigningConfig] | None = None,
) -> SigningPlan:
    """The plan of the command-line options; without --key, --pkcs11 and --unsigned, that of
    the recipe's [signing] table (`recipe`: its path and table), whose module and
    certificates the options override."""
    from avobuild.bundle.signing import SigningPlan

    module = pkcs11_module
    if module is None and os.environ.get(MODULE_VARIABLE):
        module = Path(os.environ[MODULE_VARIABLE])
    pin = os.environ.get(PIN_VARIABLE) or None
    if recipe is not None and not keys and not pkcs11 and not unsigned:
        path, table = recipe
        if not table.keys and not table.pkcs11:
            raise RecipeError(
                f"{path}: [signing] key: missing, and no --key, --pkcs11 or --unsigned was given"
            )
        from_recipe = SigningPlan.from_recipe(table)
        return replace(
            from_recipe,
            pkcs11_module=pkcs11_module or from_recipe.pkcs11_module or module,
            pkcs11_pin=pin,
            certificates=tuple(certificates or from_recipe.certificates),
            recipients=tuple(encrypt_for or ()),
            encryption_key=encryption_key,
        )
    return SigningPlan(
        keys=tuple(keys or ()),
        pkcs11=tuple(pkcs11 or ()),
        pkcs11_module=module,
        pkcs11_pin=pin,
        certificates=tuple(certificates or ()),
        recipients=tuple(encrypt_for or ()),
        encryption_key=encryption_key,
        unsigned=unsigned,
    )


def policy_options(
    security_version: int | None, min_applier_version: str | None, expires: str | None
) -> Policy:
    from avobuild.bundle.manifest import Policy

    return Policy(security_version, min_applier_version, parse_time(expires))


def parse_time(text: str | None) -> int | None:
    """Seconds since 1970, or an ISO 8601 time (UTC unless it names a zone)."""
    if text is None:
        return None
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise RecipeError(
            f"--expires: expected seconds since 1970 or an ISO 8601 time, got {text!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())
