"""`avobuild bundle …`: create, verify and inspect .avb bundles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from avobuild.cli.common import (
    WorkdirOption,
    app,
    byte_progress,
    console,
    out,
    step,
    work_directory,
)
from avobuild.errors import RecipeError

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
    key: Annotated[
        Path | None, typer.Option(help="Private signing key (PEM); default: the recipe's.")
    ] = None,
    chunk_size: Annotated[str, typer.Option(help="Chunk size, e.g. 1M.")] = "1M",
    level: Annotated[int, typer.Option(help="zstd compression level (1-19).")] = 10,
    workdir: WorkdirOption = None,
) -> None:
    """Create a signed full bundle from a recipe or from prebuilt images."""
    from avobuild.bundle.format import ImageSource, write_bundle
    from avobuild.bundle.keys import load_private_key
    from avobuild.disk.image import build_slot_images
    from avobuild.recipe import NAME_PATTERN, load_recipe
    from avobuild.run import source_date_epoch
    from avobuild.tomlcheck import parse_size

    try:
        chunk_bytes = parse_size(chunk_size)
    except ValueError:
        raise RecipeError(f"--chunk-size: expected a size like 1M, got {chunk_size!r}") from None
    with work_directory(workdir) as work:
        if recipe is not None:
            if image:
                raise RecipeError("give either a RECIPE or --image options, not both")
            loaded = load_recipe(recipe)
            images = list(build_slot_images(loaded, work, step).items())
            name, version, compatible = loaded.name, loaded.version, loaded.compatible
            key = key or loaded.signing_key
            if key is None:
                raise RecipeError(f"{recipe}: [signing] key: missing, and no --key was given")
        else:
            if not image:
                raise RecipeError(
                    "give a RECIPE, or --image NAME=PATH with --name, --version, "
                    "--compatible and --key"
                )
            images = _parse_images(image)
            for option, value in (
                ("--name", name),
                ("--version", version),
                ("--compatible", compatible),
            ):
                if value is None or not NAME_PATTERN.fullmatch(value):
                    raise RecipeError(
                        f"{option}: expected letters, digits and ._+~:@-, got {value!r}"
                    )
            if key is None:
                raise RecipeError("--key: required with --image")
        assert name is not None and version is not None and compatible is not None
        private_key = load_private_key(key)
        sources = [ImageSource(image_name, path) for image_name, path in images]
        with byte_progress("compressing") as update:
            manifest = write_bundle(
                output,
                sources,
                name=name,
                version=version,
                compatible=compatible,
                build_date=source_date_epoch(),
                private_key=private_key,
                chunk_size=chunk_bytes,
                level=level,
                progress=update,
            )
    size = output.stat().st_size
    console.print(
        f"{output}: {manifest.name} {manifest.version} for {manifest.compatible}, "
        f"{len(manifest.images)} image(s), {size} bytes"
    )
    out.print(str(output))


@bundle_app.command("verify")
def bundle_verify(
    bundle: Annotated[Path, typer.Argument(help="The .avb bundle.")],
    keyring: Annotated[Path, typer.Option(help="Trusted public keys (PEM file or directory).")],
) -> None:
    """Check the signature, then every chunk and image hash, writing nothing."""
    from avobuild.bundle.format import BundleReader
    from avobuild.bundle.keys import load_keyring

    trusted = load_keyring(keyring)
    with BundleReader.open(bundle) as reader:
        signer = reader.verify_signature(trusted)
        reader.verify_payload()
        manifest = reader.manifest
    out.print(
        f"{bundle}: OK: {manifest.name} {manifest.version} for {manifest.compatible}, "
        f"signed by {signer.key_id}"
    )


@bundle_app.command("info")
def bundle_info_command(
    bundle: Annotated[Path, typer.Argument(help="The .avb bundle.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    keyring: Annotated[
        Path | None, typer.Option(help="Verify the signature with these keys first.")
    ] = None,
) -> None:
    """Describe a bundle: product, version, images, chunks, signatures."""
    from avobuild.bundle.format import BundleReader, bundle_info
    from avobuild.bundle.keys import load_keyring

    with BundleReader.open(bundle) as reader:
        if keyring is not None:
            reader.verify_signature(load_keyring(keyring))
        info = bundle_info(reader)
    if as_json:
        out.print(json.dumps(info, indent=2, sort_keys=True))
        return
    _print_info(info)


def _print_info(info: dict[str, Any]) -> None:
    verified = "verified" if info.get("signature_verified") else "NOT verified (use --keyring)"
    out.print(f"name:        {info['name']}")
    out.print(f"version:     {info['version']}")
    out.print(f"compatible:  {info['compatible']}")
    out.print(f"type:        {info.get('type', 'full')}")
    out.print(f"build date:  {info['build_date']}")
    out.print(f"chunk size:  {info['chunk_size']}")
    out.print(f"compression: {info['compression']}")
    out.print(f"signature:   {verified}")
    for signature in info.get("signatures", []):
        out.print(f"  {signature['algorithm']} key {signature['key_id']}")
    for item in info.get("images", []):
        out.print(
            f"image {item['name']}: {item['size']} bytes, sha256 {item['sha256']}, "
            f"{item['chunks']} chunks, {item['stored_size']} bytes stored"
        )
