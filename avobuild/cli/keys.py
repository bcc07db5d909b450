"""`avobuild keys …`: signing keys."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from avobuild.cli.common import app, out

keys_app = typer.Typer(help="Manage bundle signing keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("generate")
def keys_generate(
    output: Annotated[Path, typer.Option("-o", "--output", help="Directory for the key pair.")],
    name: Annotated[str, typer.Option(help="File name stem.")] = "bundle-signing",
) -> None:
    """Generate an Ed25519 signing key pair (private key mode 0600)."""
    from avobuild.bundle.keys import generate_keypair

    private, public = generate_keypair(output, name)
    out.print(str(private))
    out.print(str(public))
