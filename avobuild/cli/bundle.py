"""`avobuild bundle …`: create, verify and inspect .avb bundles."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from avobuild.cli.common import (
    JsonOption,
    WorkdirOption,
    app,
    byte_progress,
    console,
    emit,
    out,
    output_file,
    step,
    work_directory,
)
from avobuild.cli.signing_options import (
    CertificateOption,
    EncryptForOption,
    EncryptionKeyOption,
    ExpiresOption,
    KeyOption,
    MinApplierVersionOption,
    Pkcs11ModuleOption,
    Pkcs11Option,
    SecurityVersionOption,
    policy_options,
    signing_plan,
)
from avobuild.errors import RecipeError

if TYPE_CHECKING:
    from avobuild.bundle.info import BundleInfo
    from avobuild.bundle.manifest import Manifest

DecryptionKeyOption = Annotated[
    Path | None,
    typer.Option(help="For an encrypted payload: a recipient's private key, or the key file."),
]
KeyringOption = Annotated[
    Path,
    typer.Option(help="Keyring: PEM keys/certificates, a directory of them, or a .toml file."),
]

bundle_app = typer.Typer(
    help="Create, verify and inspect .avb update bundles.", no_args_is_help=True
)
app.add_typer(bundle_app, name="bundle")


def _parse_images(values: list[str]) -> list[tuple[str, Path]]:
    images = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise RecipeError(f"--image {value!r}: expected NAME=PATH, e.g. rootfs=rootfs.ext4")
        if not Path(path).is_file():
            raise RecipeError(f"--image {value!r}: {path}: no such file")
        images.append((name, Path(path)))
    return images


@bundle_app.command("create")
def bundle_create(
    output: Annotated[Path, typer.Option("-o", "--output", help="The .avb file to write.")],
    recipe: Annotated[
        Path | None, typer.Argument(help="Recipe TOML file (omit when using --image).")
    ] = None,
    image: Annotated[
        list[str] | None,
        typer.Option("--image", help="NAME=PATH of a prebuilt image (repeatable)."),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Product name (with --image).")] = None,
    version: Annotated[str | None, typer.Option(help="Version (with --image).")] = None,
    compatible: Annotated[
        str | None, typer.Option(help="Compatible string (with --image).")
    ] = None,
    key: KeyOption = None,
    pkcs11: Pkcs11Option = None,
    pkcs11_module: Pkcs11ModuleOption = None,
    certificate: CertificateOption = None,
    unsigned: Annotated[
        bool, typer.Option("--unsigned", help="Leave the bundle unsigned, for offline signing.")
    ] = False,
    security_version: SecurityVersionOption = None,
    min_applier_version: MinApplierVersionOption = None,
    expires: ExpiresOption = None,
    encrypt_for: EncryptForOption = None,
    encryption_key: EncryptionKeyOption = None,
    chunk_size: Annotated[str, typer.Option(help="Chunk size, e.g. 1M.")] = "1M",
    level: Annotated[int, typer.Option(help="zstd compression level (1-19).")] = 10,
    compression: Annotated[
        str,
        typer.Option(
            help="zstd-stream (manifest version 3: compresses across chunks), zstd (one frame "
            "per chunk, readable by every avobuild applier) or none."
        ),
    ] = "zstd-stream",
    workdir: WorkdirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a signed full bundle from a recipe or from prebuilt images."""
    from avobuild.bundle.manifest import COMPATIBLE_PATTERN, Compression
    from avobuild.bundle.writer import ImageSource, write_bundle
    from avobuild.image.rootfs import build_slot_images
    from avobuild.model.recipe import NAME_PATTERN, load_recipe
    from avobuild.model.tomlcheck import parse_size
    from avobuild.run import source_date_epoch

    try:
        chunk_bytes = parse_size(chunk_size)
    except ValueError:
        raise RecipeError(f"--chunk-size: expected a size like 1M, got {chunk_size!r}") from None
    if compression not in {member.value for member in Compression}:
        raise RecipeError(f"--compression: expected zstd-stream, zstd or none, got {compression!r}")
    loaded = None
    prebuilt: list[tuple[str, Path]] = []
    if recipe is not None:
        if image:
            raise RecipeError("give either a RECIPE or --image options, not both")
        loaded = load_recipe(recipe)
        name, version, compatible = loaded.name, loaded.version, loaded.compatible
    else:
        if not image:
            raise RecipeError(
                "give a RECIPE, or --image NAME=PATH with --name, --version, --compatible and --key"
            )
        prebuilt = _parse_images(image)
        for option, value in (("--name", name), ("--version", version)):
            if value is None or not NAME_PATTERN.fullmatch(value):
                raise RecipeError(f"{option}: expected letters, digits and ._+~:@-, got {value!r}")
        if compatible is None or not COMPATIBLE_PATTERN.fullmatch(compatible):
            raise RecipeError(
                f"--compatible: expected letters, digits and ._+~:@-, with * and ? as "
                f"wildcards, got {compatible!r}"
            )
        if not key and not pkcs11 and not unsigned:
            raise RecipeError("--key, --pkcs11 or --unsigned: required with --image")
    assert name is not None and version is not None and compatible is not None
    plan = signing_plan(
        keys=key,
        pkcs11=pkcs11,
        pkcs11_module=pkcs11_module,
        certificates=certificate,
        encrypt_for=encrypt_for,
        encryption_key=encryption_key,
        unsigned=unsigned,
        recipe=(recipe, loaded.signing) if recipe is not None and loaded is not None else None,
    )
    policy = policy_options(security_version, min_applier_version, expires)
    with work_directory(workdir) as work:
        images = list(build_slot_images(loaded, work, step).items()) if loaded else prebuilt
        sources = [ImageSource(image_name, path) for image_name, path in images]
        with byte_progress("compressing") as update, plan.open_material() as material:
            manifest = write_bundle(
                output,
                sources,
                name=name,
                version=version,
                compatible=compatible,
                build_date=source_date_epoch(),
                signers=material.signers,
                certificates=material.certificates,
                unsigned=material.unsigned,
                policy=policy,
                encryption_key=material.content_key,
                recipients=material.recipients,
                chunk_size=chunk_bytes,
                level=level,
                compression=Compression(compression),
                progress=update,
            )
    size = output.stat().st_size
    if as_json:
        emit(True, _bundle_json(output, manifest, size))
        return
    console.print(
        f"{output}: {manifest.name} {manifest.version} for {manifest.compatible}, "
        f"{len(manifest.images)} image(s), {size} bytes"
    )
    out.print(str(output))


def _bundle_json(path: Path, manifest: Manifest, size: int) -> dict[str, object]:
    """The object `bundle create --json` and `delta create --json` print (docs/json.md)."""
    return {
        "path": str(path),
        "name": manifest.name,
        "version": manifest.version,
        "compatible": manifest.compatible,
        "type": manifest.type.value,
        "images": [image.name for image in manifest.images],
        "size": size,
    }


@bundle_app.command("verify")
def bundle_verify(
    bundle: Annotated[Path, typer.Argument(help="The .avb bundle, or - for standard input.")],
    keyring: KeyringOption,
    decryption_key: DecryptionKeyOption = None,
    security_floor: Annotated[
        int | None,
        typer.Option(help="Refuse a security-version below this (a device's anti-rollback floor)."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Check the signatures, then every chunk and image hash, writing nothing; then the policy
    lines that need no device (expires against the clock, security-version against
    --security-floor), saying which lines it did not check.

    The bundle is read once, sequentially, so it may come from a pipe.
    """
    from avobuild.bundle.crypt import load_decryption_key
    from avobuild.bundle.keys import load_keyring
    from avobuild.bundle.reader import BundleReader
    from avobuild.update.policy import evaluate_policy

    trusted = load_keyring(keyring)
    if str(bundle) == "-":
        reader = BundleReader.from_stream(sys.stdin.buffer, "<stdin>")
    else:
        reader = BundleReader.open(bundle)
    with reader:
        reader.verify_signature(trusted)
        if decryption_key is not None:
            reader.unlock(load_decryption_key(decryption_key))
        verdicts = evaluate_policy(reader.manifest, security_floor=security_floor)
        reader.verify_payload()
        manifest = reader.manifest
        key_ids = [signer.key_id for signer in reader.signers]
    if as_json:
        document = {
            "path": reader.name,
            "ok": True,
            "name": manifest.name,
            "version": manifest.version,
            "compatible": manifest.compatible,
            "signers": key_ids,
            "policy": [
                {"line": verdict.line, "checked": verdict.checked, "why": verdict.why}
                for verdict in verdicts
            ],
        }
        emit(True, document)
        return
    out.print(
        f"{reader.name}: OK: {manifest.name} {manifest.version} for {manifest.compatible}, "
        f"signed by {', '.join(key_ids)}"
    )
    for verdict in verdicts:
        state = "checked" if verdict.checked else "NOT checked"
        out.print(f"  policy {verdict.line}: {state} ({verdict.why})")


@bundle_app.command("digest")
def bundle_digest(
    bundle: Annotated[Path, typer.Argument(help="The .avb bundle.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="File for the bytes to sign.")],
    as_json: JsonOption = False,
) -> None:
    """Write exactly the bytes a signer signs (the manifest), for offline or HSM signing."""
    from avobuild.bundle.resign import signing_input

    data = signing_input(bundle)
    with output_file(output):
        output.write_bytes(data)
    if as_json:
        emit(True, {"path": str(output), "size": len(data)})
        return
    console.print(f"{output}: {len(data)} bytes to sign")


@bundle_app.command("attach-signature")
def bundle_attach_signature(
    bundle: Annotated[Path, typer.Argument(help="The .avb bundle.")],
    signature: Annotated[Path, typer.Option(help="The signature, made over the digest file.")],
    key: Annotated[
        Path, typer.Option(help="The signer's public key, or its certificate (and chain), PEM.")
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="The signed bundle to write.")],
    as_json: JsonOption = False,
) -> None:
    """Add a signature made elsewhere (openssl, an offline HSM); it must verify."""
    from avobuild.bundle.resign import attach_signature

    entry = attach_signature(bundle, output, _read_file(signature), key)
    if as_json:
        emit(True, {"path": str(output), "algorithm": entry.algorithm, "key_id": entry.key_id})
        return
    out.print(f"{output}: added {entry.algorithm} signature by key {entry.key_id}")


@bundle_app.command("resign")
def bundle_resign(
    bundle: Annotated[Path, typer.Argument(help="The .avb bundle.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The bundle to write.")],
    key: KeyOption = None,
    pkcs11: Pkcs11Option = None,
    pkcs11_module: Pkcs11ModuleOption = None,
    certificate: CertificateOption = None,
    replace: Annotated[
        bool, typer.Option("--replace", help="Drop all existing signatures first.")
    ] = False,
    remove: Annotated[
        list[str] | None, typer.Option("--remove", help="Drop the signature of this key-id.")
    ] = None,
    keyring: Annotated[
        Path | None,
        typer.Option(help="Require the existing signatures to verify with this keyring first."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Add or replace signatures; the manifest and payload bytes stay identical."""
    from avobuild.bundle.keys import load_keyring
    from avobuild.bundle.resign import resign_bundle

    trusted = load_keyring(keyring) if keyring is not None else None
    plan = signing_plan(
        keys=key, pkcs11=pkcs11, pkcs11_module=pkcs11_module, certificates=certificate
    )
    with plan.signers() as signers:
        block = resign_bundle(
            bundle,
            output,
            signers,
            replace=replace,
            remove=remove or [],
            certificates=plan.certificate_entries(),
            keyring=trusted,
        )
    if as_json:
        signatures = [
            {"algorithm": entry.algorithm, "key_id": entry.key_id} for entry in block.signatures
        ]
        emit(True, {"path": str(output), "signatures": signatures})
        return
    for entry in block.signatures:
        out.print(f"{output}: {entry.algorithm} signature by key {entry.key_id}")


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise RecipeError(f"{path}: cannot read: {error.strerror or error}") from None


@bundle_app.command("info")
def bundle_info_command(
    bundle: Annotated[Path, typer.Argument(help="The .avb bundle.")],
    as_json: JsonOption = False,
    keyring: Annotated[
        Path | None, typer.Option(help="Verify the signatures with this keyring first.")
    ] = None,
) -> None:
    """Describe a bundle: product, version, images, chunks, signatures."""
    from avobuild.bundle.info import bundle_info
    from avobuild.bundle.keys import load_keyring
    from avobuild.bundle.reader import BundleReader

    with BundleReader.open(bundle) as reader:
        if keyring is not None:
            reader.verify_signature(load_keyring(keyring))
        info = bundle_info(reader)
    if as_json:
        out.print(json.dumps(info_json(info), indent=2, sort_keys=True))
        return
    _print_info(info)


def info_json(info: BundleInfo) -> dict[str, object]:
    """The `bundle info --json` object (its keys and values are an interface: keep them)."""
    return {
        "file": info.file,
        "format": info.format,
        "type": info.type.value,
        "name": info.name,
        "version": info.version,
        "compatible": info.compatible,
        "build_date": info.build_date,
        "manifest_version": info.manifest_version,
        "security_version": info.security_version,
        "min_applier_version": info.min_applier_version,
        "expires": info.expires,
        "encryption": info.encryption,
        "chunk_size": info.chunk_size,
        "compression": info.compression.value,
        "images": [
            {
                "name": image.name,
                "size": image.size,
                "sha256": image.sha256,
                "chunks": image.chunks,
                "stored_size": image.stored_size,
                **(
                    {
                        "source": {"size": image.source.size, "sha256": image.source.sha256},
                        "target": {"size": image.target.size, "sha256": image.target.sha256},
                    }
                    if image.source is not None and image.target is not None
                    else {}
                ),
            }
            for image in info.images
        ],
        "signatures": [
            {"algorithm": entry.algorithm, "key_id": entry.key_id, "supported": entry.supported}
            for entry in info.signatures
        ],
        "certificates": list(info.certificates),
        "signature_verified": info.signature_verified,
        "signer": info.signer,
        "signers": list(info.signers),
        "manifest_size": info.manifest_size,
        "signature_block_size": info.signature_block_size,
        "payload_offset": info.payload_offset,
        "payload_size": info.payload_size,
        "total_size": info.total_size,
    }


def _print_info(info: BundleInfo) -> None:
    verified = "verified" if info.signature_verified else "NOT verified (use --keyring)"
    out.print(f"name:        {info.name}")
    out.print(f"version:     {info.version}")
    out.print(f"compatible:  {info.compatible}")
    out.print(f"type:        {info.type.value}")
    out.print(f"build date:  {info.build_date}")
    out.print(f"chunk size:  {info.chunk_size}")
    out.print(f"compression: {info.compression.value}")
    for value, label in (
        (info.security_version, "security version"),
        (info.min_applier_version, "min applier"),
        (info.expires, "expires"),
        (info.encryption, "encryption"),
    ):
        if value is not None:
            out.print(f"{label + ':':<12} {value}")
    out.print(f"signature:   {verified}")
    for signature in info.signatures:
        out.print(f"  {signature.algorithm} key {signature.key_id}")
    for identifier in info.certificates:
        out.print(f"  certificate for key {identifier}")
    for image in info.images:
        out.print(
            f"image {image.name}: {image.size} bytes, sha256 {image.sha256}, "
            f"{image.chunks} chunks, {image.stored_size} bytes stored"
        )
