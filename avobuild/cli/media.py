"""`avobuild media …`: USB recovery media and PXE network recovery trees."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from avobuild.cli.common import (
    JsonOption,
    WorkdirOption,
    app,
    byte_progress,
    check_output_directory,
    console,
    emit,
    out,
    output_file,
    step,
    work_directory,
)
from avobuild.cli.recovery import ApplierOption, ToolsOption, parse_tools
from avobuild.errors import BuildError, InstallError, RecipeError

media_app = typer.Typer(
    help="Build USB recovery media and PXE network recovery trees.", no_args_is_help=True
)
app.add_typer(media_app, name="media")


@media_app.command("usb")
def usb(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Hybrid ISO image to write.")],
    factory_image: Annotated[
        Path | None,
        typer.Option(help="Prebuilt factory image to carry (default: build it from the recipe)."),
    ] = None,
    bundle: Annotated[Path | None, typer.Option(help="An .avb bundle to carry as well.")] = None,
    include_tools: Annotated[
        bool,
        typer.Option(
            "--include-tools", help="Carry every tool set: network, storage, diagnostics."
        ),
    ] = False,
    include_firmware: Annotated[
        bool, typer.Option("--include-firmware", help="Carry the recipe's [recovery] firmware.")
    ] = False,
    applier: ApplierOption = None,
    device: Annotated[
        Path | None,
        typer.Option(help="Also write the image to this USB stick (whole disk, e.g. /dev/sdb)."),
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Write --device without asking.")] = False,
    workdir: WorkdirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Build a hybrid ISO (BIOS + UEFI, CD or USB stick) with the recovery system, the factory
    image and the menu; optionally write it to a stick."""
    from avobuild.media.usb import build_usb_media, check_target_device, write_to_device
    from avobuild.model.recipe import load_recipe

    loaded = load_recipe(recipe)
    if as_json and device is not None and not yes:
        raise RecipeError("--json with --device: give --yes too (no question on standard output)")
    # Refuse a wrong --device before spending minutes on the build.
    target = check_target_device(device) if device is not None else None
    with output_file(output), work_directory(workdir) as work:
        medium = build_usb_media(
            loaded,
            output,
            work,
            factory_image=factory_image,
            bundle=bundle,
            include_tools=include_tools,
            include_firmware=include_firmware,
            applier=applier,
            progress=step,
        )
    document: dict[str, object] = {"path": str(medium.path), "size": medium.size, "device": None}
    if not as_json:
        out.print(str(medium.path))
        console.print(f"  {medium.size} bytes; boots on BIOS (ISOLINUX) and UEFI (GRUB)")
    if target is None:
        emit(as_json, document, lambda: None)
        return
    size_text = f"{target.size // (1 << 20)} MiB" if target.size else "unknown size"
    if not yes and not typer.confirm(
        f"Write {output} to {target.path} ({size_text})? Everything on it is lost."
    ):
        raise InstallError(f"{target.path}: not written (answered no)")
    with byte_progress(f"writing {target.path}") as update:
        write_to_device(output, target, update)
    document["device"] = str(target.path)
    emit(as_json, document, lambda: out.print(f"wrote {output} to {target.path} and verified it"))


@media_app.command("pxe")
def pxe(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file.")],
    server: Annotated[str, typer.Option(help="IP address of the TFTP/recovery server.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Directory for the TFTP tree.")],
    url: Annotated[
        str | None,
        typer.Option(help="[Server] URL (default: https://SERVER/recovery/PRODUCT)."),
    ] = None,
    interface: Annotated[str, typer.Option(help="[Network] Interface.")] = "eth0",
    timeout: Annotated[int, typer.Option(help="[Network] Timeout, seconds.", min=1)] = 30,
    no_dhcp: Annotated[bool, typer.Option("--no-dhcp", help="[Network] DHCP = no.")] = False,
    ca_certificate: Annotated[
        Path | None, typer.Option(help="CA certificate of the server to carry in the initrd.")
    ] = None,
    mac: Annotated[
        list[str] | None,
        typer.Option(
            "--mac",
            help="Per-device entry: MAC[=menu|restore|repair|diagnose] (repeatable).",
        ),
    ] = None,
    factory_image: Annotated[
        Path | None, typer.Option(help="Factory image to publish (written to DIR/http/).")
    ] = None,
    tools: ToolsOption = None,
    applier: ApplierOption = None,
    as_json: JsonOption = False,
) -> None:
    """Write a TFTP tree (PXELINUX, GRUB EFI, iPXE) booting the recovery system over the
    network, with network-recovery.conf."""
    from dataclasses import replace

    from avobuild.media.pxe import build_pxe_tree, default_settings, parse_device, parse_server
    from avobuild.model.recipe import ToolSet, load_recipe

    address = parse_server(server)
    devices = [parse_device(value) for value in mac or []]
    loaded = load_recipe(recipe)
    check_output_directory(output, BuildError)
    settings = default_settings(loaded, address)
    settings = replace(
        settings,
        url=url or settings.url,
        interface=interface,
        timeout=timeout,
        dhcp=not no_dhcp,
    )
    names = parse_tools(tools)
    tree = build_pxe_tree(
        loaded,
        output,
        settings,
        devices=devices,
        tools=[ToolSet(name) for name in names] if names is not None else None,
        ca_certificate=ca_certificate,
        factory_image=factory_image,
        applier=applier,
        progress=step,
    )
    if as_json:
        emit(True, {"path": str(tree.root), "files": [str(name) for name in tree.files]})
        return
    for name in tree.files:
        console.print(f"  {name}")
    out.print(str(tree.root))
