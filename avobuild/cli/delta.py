"""`avobuild delta …`: create, apply and measure delta bundles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from avobuild.cli.common import (
    JsonOption,
    WorkdirOption,
    app,
    console,
    emit,
    out,
    step_progress,
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

delta_app = typer.Typer(help="Create, apply and measure delta bundles.", no_args_is_help=True)
app.add_typer(delta_app, name="delta")

FromOption = Annotated[Path, typer.Option("--from", help="The full bundle devices run now.")]
ToOption = Annotated[Path, typer.Option("--to", help="The full bundle to update them to.")]


def human_size(size: int) -> str:
    """Decimal units as in "Full size: 500MB": whole MB from 10 MB on, one decimal below."""
    if size >= 10_000_000:
        return f"{round(size / 1_000_000)}MB"
    if size >= 1_000_000:
        return f"{size / 1_000_000:.1f}MB"
    if size >= 1_000:
        return f"{round(size / 1_000)}KB"
    return f"{size}B"


def stats_line(full_size: int, delta_size: int, reduction: float) -> str:
    return (
        f"Full size: {human_size(full_size)}, Delta size: {human_size(delta_size)} "
        f"({int(reduction)}% reduction)"
    )


@delta_app.command("create")
def delta_create(
    old: FromOption,
    new: ToOption,
    output: Annotated[Path, typer.Option("-o", "--output", help="The delta .avb to write.")],
    key: KeyOption = None,
    pkcs11: Pkcs11Option = None,
    pkcs11_module: Pkcs11ModuleOption = None,
    certificate: CertificateOption = None,
    unsigned: Annotated[
        bool, typer.Option("--unsigned", help="Leave the delta unsigned, for offline signing.")
    ] = False,
    security_version: SecurityVersionOption = None,
    min_applier_version: MinApplierVersionOption = None,
    expires: ExpiresOption = None,
    encrypt_for: EncryptForOption = None,
    encryption_key: EncryptionKeyOption = None,
    keyring: Annotated[
        Path | None,
        typer.Option(help="Keys to verify --from and --to with (default: the signing keys)."),
    ] = None,
    decryption_key: Annotated[
        Path | None,
        typer.Option(help="Opens encrypted --from and --to bundles (recipient key or key file)."),
    ] = None,
    full_if_larger: Annotated[
        bool,
        typer.Option(
            "--full-if-larger", help="Write the full --to bundle when the delta is not smaller."
        ),
    ] = False,
    level: Annotated[int, typer.Option(help="zstd level of the delta operations.")] = 9,
    stream_version: Annotated[
        int,
        typer.Option(
            min=1,
            max=2,
            help="Delta stream version: 2 (file-aware bsdiff; the device needs bspatch and "
            "xz) or 1 (zstd only, for appliers that read version 1).",
        ),
    ] = 2,
    workdir: WorkdirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a signed delta bundle that turns the images of --from into those of --to.

    It takes the name, version, compatible string, build date and policy of --to; the
    policy options replace single policy lines.
    """
    from avobuild.bundle.crypt import load_decryption_key
    from avobuild.bundle.keys import load_keyring, public_key_pem
    from avobuild.delta.bundles import create_delta_bundle

    if not key and not pkcs11 and not unsigned:
        raise RecipeError("--key, --pkcs11 or --unsigned: required")
    if unsigned and keyring is None:
        raise RecipeError("--keyring: required with --unsigned (to verify --from and --to)")
    plan = signing_plan(
        keys=key,
        pkcs11=pkcs11,
        pkcs11_module=pkcs11_module,
        certificates=certificate,
        encrypt_for=encrypt_for,
        encryption_key=encryption_key,
        unsigned=unsigned,
    )
    policy = policy_options(security_version, min_applier_version, expires)
    decryption = load_decryption_key(decryption_key) if decryption_key is not None else None
    with (
        work_directory(workdir) as work,
        plan.open_material() as material,
        step_progress() as update,
    ):
        if keyring is None:
            keyring = work / "signing-keys.pub.pem"
            keyring.write_bytes(
                b"".join(public_key_pem(signer.public_key) for signer in material.signers)
            )
        result = create_delta_bundle(
            old,
            new,
            output,
            work,
            signing=material,
            keyring=load_keyring(keyring),
            policy=policy,
            decryption=decryption,
            full_if_larger=full_if_larger,
            level=level,
            progress=update,
            stream_version=stream_version,
        )
    if as_json:
        document = {
            "path": str(output),
            "full_size": result.full_size,
            "delta_size": result.delta_size,
            "reduction": round(result.reduction, 2),
            "wrote_full": result.wrote_full,
        }
        emit(True, document)
        return
    console.print(stats_line(result.full_size, result.delta_size, result.reduction))
    if result.delta_size >= result.full_size:
        if result.wrote_full:
            console.print(
                f"the delta ({result.delta_size} bytes) is not smaller than the full bundle "
                f"({result.full_size} bytes): wrote the full bundle {new} to {output} instead"
            )
        else:
            console.print(
                f"warning: the delta ({result.delta_size} bytes) is not smaller than the full "
                f"bundle ({result.full_size} bytes); --full-if-larger writes the full one instead"
            )
    out.print(str(output))


@delta_app.command("apply")
def delta_apply(
    bundle: Annotated[Path, typer.Argument(help="The delta .avb bundle.")],
    keyring: Annotated[Path, typer.Option(help="Trusted public keys (PEM file or directory).")],
    source: Annotated[
        list[str], typer.Option("--source", help="NAME=PATH of the image the delta starts from.")
    ],
    output: Annotated[list[str], typer.Option("--output", help="NAME=PATH of the image to write.")],
    decryption_key: Annotated[
        Path | None,
        typer.Option(help="For an encrypted payload: a recipient's private key, or the key file."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Rebuild target images from their source images and verify them (host side)."""
    from avobuild.bundle.crypt import load_decryption_key
    from avobuild.bundle.keys import load_keyring
    from avobuild.delta.bundle_apply import apply_delta_bundle, apply_options

    trusted = load_keyring(keyring)
    decryption = load_decryption_key(decryption_key) if decryption_key is not None else None
    with step_progress() as update:
        built = apply_delta_bundle(
            bundle,
            trusted,
            apply_options(source, "--source"),
            apply_options(output, "--output"),
            decryption=decryption,
            progress=update,
        )
    if as_json:
        images = [{"name": name, "size": ref.size, "sha256": ref.sha256, "ok": True}
                  for name, ref in built.items()]  # fmt: skip
        emit(True, {"path": str(bundle), "images": images})
        return
    for name, ref in built.items():
        out.print(f"{name}: {ref.size} bytes, sha256 {ref.sha256}: OK")


@delta_app.command("stats")
def delta_stats(
    old: FromOption,
    new: ToOption,
    as_json: JsonOption = False,
    keyring: Annotated[
        Path | None, typer.Option(help="Verify both bundles' signatures with these keys.")
    ] = None,
    level: Annotated[int, typer.Option(help="zstd level of the delta operations.")] = 9,
    workdir: WorkdirOption = None,
) -> None:
    """Build the delta in a work directory and compare its size with the full --to bundle."""
    from avobuild.bundle.keys import load_keyring
    from avobuild.delta.bundles import measure_delta

    trusted = load_keyring(keyring) if keyring is not None else None
    with work_directory(workdir) as work, step_progress() as update:
        result = measure_delta(old, new, work, keyring=trusted, level=level, progress=update)
    if as_json:
        report = {
            "full_size": result.full_size,
            "delta_size": result.delta_size,
            "reduction": round(result.reduction, 2),
            "images": {
                summary_name: {
                    "source": {"size": summary.source.size, "sha256": summary.source.sha256},
                    "target": {"size": summary.target.size, "sha256": summary.target.sha256},
                    "stream_size": summary.stream_size,
                    "operations": summary.op_counts,
                    "operation_bytes": summary.op_bytes,
                }
                for summary_name, summary in result.deltas
            },
        }
        out.print(json.dumps(report, indent=2, sort_keys=True))
        return
    out.print(stats_line(result.full_size, result.delta_size, result.reduction))
