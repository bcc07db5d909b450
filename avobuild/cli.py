"""The `avobuild` command line: the only module that prints, shows progress and exits.

Library functions raise `AvobuildError` subclasses; `main()` catches them once, prints the
message (a traceback only with --debug) and exits with the family's code.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from avobuild import __version__
from avobuild.errors import AvobuildError, RecipeError

app = typer.Typer(
    help="Build A/B factory images, signed update bundles and on-target appliers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
bundle_app = typer.Typer(
    help="Create, verify and inspect .avb update bundles.", no_args_is_help=True
)
keys_app = typer.Typer(help="Manage bundle signing keys.", no_args_is_help=True)
app.add_typer(bundle_app, name="bundle")
app.add_typer(keys_app, name="keys")

console = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)
out = Console(highlight=False, soft_wrap=True, markup=False)
_state = {"debug": False}


def _version_callback(value: bool) -> None:
    if value:
        out.print(f"avobuild {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    debug: Annotated[
        bool, typer.Option("--debug", help="Log every tool command; show tracebacks.")
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True)
    ] = False,
) -> None:
    _state["debug"] = debug
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(message)s",
        stream=sys.stderr,
    )


def _step(message: str) -> None:
    console.print(Text("• ", style="bold") + Text(message))


@contextmanager
def _byte_progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar fed with (bytes done, bytes total)."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update


@contextmanager
def _workdir(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
    else:
        with tempfile.TemporaryDirectory(prefix="avobuild-") as tmp:
            yield Path(tmp)


WorkdirOption = Annotated[
    Path | None,
    typer.Option("--workdir", help="Keep intermediate files here instead of a temp directory."),
]


@app.command()
def image(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output directory.")],
    workdir: WorkdirOption = None,
) -> None:
    """Build the factory disk image (GPT, A/B slots, data, recovery) and its .bmap."""
    from avobuild.disk.image import build_factory_image
    from avobuild.recipe import load_recipe

    loaded = load_recipe(recipe)
    with _workdir(workdir) as work:
        result = build_factory_image(loaded, output, work, _step)
    out.print(f"{result.path}")
    out.print(f"{result.bmap}")
    for part in result.plan.partitions:
        console.print(
            f"  {part.number}: {part.spec.label:<12} {part.spec.role.value:<10} "
            f"offset {part.offset:>12}  size {part.size:>12}"
        )


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
    with _workdir(workdir) as work:
        if recipe is not None:
            if image:
                raise RecipeError("give either a RECIPE or --image options, not both")
            loaded = load_recipe(recipe)
            images = list(build_slot_images(loaded, work, _step).items())
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
        with _byte_progress("compressing") as update:
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


@app.command()
def install(
    bundle: Annotated[Path, typer.Argument(help="The .avb bundle.")],
    disk: Annotated[Path, typer.Option(help="Factory disk image to install into.")],
    keyring: Annotated[Path, typer.Option(help="Trusted public keys (PEM file or directory).")],
    layout: Annotated[
        Path | None, typer.Option(help="Layout TOML, when partition labels are not the roles.")
    ] = None,
    confirm: Annotated[
        bool, typer.Option("--confirm", help="Mark the new slot good at once (preloading).")
    ] = False,
) -> None:
    """Verify a bundle fully, write it to the inactive slot and make that slot boot next."""
    from avobuild.bundle.install import install_bundle
    from avobuild.layout import load_layout

    loaded_layout = load_layout(layout) if layout is not None else None
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True))
    with Progress(*columns, console=console, transient=True) as progress:
        tasks: dict[str, Any] = {}

        def update(step: str, done: int, total: int) -> None:
            if step not in tasks:
                tasks[step] = progress.add_task(step, total=total)
            progress.update(tasks[step], completed=done, total=total)

        result = install_bundle(
            bundle, disk, keyring, layout=loaded_layout, confirm=confirm, progress=update
        )
    state = "confirmed" if confirm else "pending trial boot"
    out.print(
        f"installed {result.version} into slot {result.slot.value} "
        f"(previous: {result.previous.value}), {state}"
    )


@app.command()
def status(
    disk: Annotated[Path, typer.Option(help="Disk image to read the boot state from.")],
    layout: Annotated[Path | None, typer.Option(help="Layout TOML (custom labels).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show which slot boots next, what each slot holds and whether it is confirmed."""
    from avobuild.bundle.install import read_boot_state
    from avobuild.layout import load_layout

    state = read_boot_state(disk, load_layout(layout) if layout is not None else None)
    report = {
        "primary": state.primary.value,
        "compatible": state.compatible,
        "slots": {
            slot.value: {"ok": s.ok, "tries": s.tries, "version": s.version}
            for slot, s in state.slots.items()
        },
    }
    if as_json:
        out.print(json.dumps(report, indent=2, sort_keys=True))
        return
    out.print(f"compatible: {state.compatible}")
    for slot, slot_state in state.slots.items():
        marker = "*" if slot is state.primary else " "
        condition = "confirmed" if slot_state.ok else f"unconfirmed, {slot_state.tries} tries left"
        out.print(f"{marker} slot {slot.value}: {slot_state.version or '(empty)'} ({condition})")


@app.command()
def doctor() -> None:
    """List the host tools avobuild uses and whether each is installed."""
    from avobuild.errors import ToolMissing
    from avobuild.run import TOOLS, which

    missing = 0
    for tool in TOOLS.values():
        try:
            location = which(tool.name)
        except ToolMissing:
            missing += 1
            out.print(
                f"MISSING {tool.name:<12} needed to {tool.purpose} (apt-get install {tool.package})"
            )
        else:
            out.print(f"ok      {tool.name:<12} {location}")
    if missing:
        raise typer.Exit(3)


def main() -> None:
    """Entry point: run the app, turn avobuild errors into messages and exit codes.

    typer handles usage errors itself (exit code 2); our errors propagate out of it.
    """
    try:
        app()
    except AvobuildError as error:
        if _state["debug"]:
            console.print_exception()
        console.print(Text("error: ", style="bold red") + Text(str(error)))
        sys.exit(error.exit_code)
    except BrokenPipeError:
        os._exit(0)


if __name__ == "__main__":
    main()
