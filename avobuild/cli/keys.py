"""`avobuild keys …`: signing keys."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from avobuild.cli.common import JsonOption, app, emit, out

keys_app = typer.Typer(help="Manage bundle signing keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("generate")
def keys_generate(
    output: Annotated[Path, typer.Option("-o", "--output", help="Directory for the key pair.")],
    name: Annotated[str, typer.Option(help="File name stem.")] = "bundle-signing",
    key_type: Annotated[
        str,
        typer.Option("--type", help="ed25519, ecdsa-p256, ecdsa-p384 or rsa."),
    ] = "ed25519",
    rsa_bits: Annotated[int, typer.Option(help="RSA key size (3072 to 8192).")] = 3072,
    as_json: JsonOption = False,
) -> None:
    """Generate a signing key pair (private key mode 0600)."""
    from avobuild.bundle.keys import KeyAlgorithm, generate_keypair
    from avobuild.errors import KeyError_

    if key_type not in {member.value for member in KeyAlgorithm}:
        known = ", ".join(member.value for member in KeyAlgorithm)
        raise KeyError_(f"--type: expected one of {known}, got {key_type!r}")
    private, public = generate_keypair(output, name, KeyAlgorithm(key_type), rsa_bits)
    if as_json:
        emit(True, {"private_key": str(private), "public_key": str(public), "type": key_type})
        return
    out.print(str(private))
    out.print(str(public))


@keys_app.command("id")
def keys_id(
    key: Annotated[Path, typer.Argument(help="Public or private key, or certificate (PEM).")],
    as_json: JsonOption = False,
) -> None:
    """Print the key-id (sha256 of the DER public key) and the signature algorithm."""
    from avobuild.bundle.keys import PublicKey, key_id, load_private_key, load_signer_identity
    from avobuild.bundle.sign import signature_algorithm

    data = key.read_bytes() if key.is_file() else b""
    public_key: PublicKey
    if b"PRIVATE KEY-----" in data:
        public_key = load_private_key(key).public_key()
    else:
        public_key, _ = load_signer_identity(key)
    identifier, algorithm = key_id(public_key), signature_algorithm(public_key).value
    if as_json:
        emit(True, {"path": str(key), "key_id": identifier, "algorithm": algorithm})
        return
    out.print(f"{identifier} {algorithm}")
