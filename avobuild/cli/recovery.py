"""`avobuild recovery …`: build the recovery system image and install it into a disk image."""

from __future__ import annotations

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
    output_file,
    step,
    work_directory,
)
from avobuild.errors import RecipeError

recovery_app = typer.Typer(
    help="Build the recovery system and install it into a recovery partition.",
    no_args_is_help=True,
)
app.add_typer(recovery_app, name="recovery")

ToolsOption = Annotated[
    str | None,
    typer.Option(
        "--tools",
        help="Tool sets besides busybox, comma separated: network, storage, diagnostics "
        "(default: the recipe's [recovery] tools).",
    ),
]
ApplierOption = Annotated[
    Path | None,
    typer.Option(help="The rendered avocado-update script to carry (used by restore/status)."),
]


def parse_tools(value: str | None) -> list[str] | None:
    """ "network,storage" -> ["network", "storage"]; None keeps the recipe's choice."""
    if value is None:
        return None
    from avobuild.model.recipe import ToolSet

    names = [name.strip() for name in value.split(",") if name.strip()]
    known = [tool.value for tool in ToolSet]
    for name in names:
        if name not in known:
            raise RecipeError(f"--tools: unknown tool set {name!r} (known: {', '.join(known)})")
    return names


@recovery_app.command("build")
def build(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="recovery.img to write.")],
    tools: ToolsOption = None,
    applier: ApplierOption = None,
    include_firmware: Annotated[
        bool, typer.Option("--include-firmware", help="Carry the recipe's [recovery] firmware.")
    ] = False,
    workdir: WorkdirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Build recovery.img: kernel + initramfs (busybox, tool sets, menu) on ext4, sized to
    the layout's recovery partition."""
    from avobuild.media.recovery import build_recovery_image
    from avobuild.model.recipe import ToolSet, load_recipe

    loaded = load_recipe(recipe)
    names = parse_tools(tools)
    chosen = [ToolSet(name) for name in names] if names is not None else None
    with output_file(output), work_directory(workdir) as work:
        result = build_recovery_image(
            loaded,
            output,
            work,
            tools=chosen,
            applier=applier,
            include_firmware=include_firmware,
            progress=step,
        )
        initrd_size = result.system.initrd.stat().st_size
    system = result.system
    if as_json:
        document = {
            "path": str(result.path),
            "kernel": str(system.kernel),
            "initramfs_size": initrd_size,
            "modules": system.modules,
            "tools": [tool.value for tool in system.tools],
            "cmdline": system.cmdline,
        }
        emit(True, document)
        return
    tool_names = ", ".join(tool.value for tool in system.tools) or "busybox only"
    console.print(
        f"  kernel {system.kernel}, initramfs {initrd_size} bytes, "
        f"{system.modules} kernel modules, tools: {tool_names}"
    )
    console.print(f"  kernel command line: {system.cmdline}")
    out.print(str(result.path))


@recovery_app.command("install")
def install(
    image: Annotated[Path, typer.Argument(help="recovery.img built by `recovery build`.")],
    disk: Annotated[Path, typer.Option(help="Factory disk image to write it into.")],
    layout: Annotated[
        Path | None,
        typer.Option(help="Layout TOML, for a disk avobuild did not make (else its record)."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Write recovery.img into the recovery partition of a disk image and verify it."""
    from avobuild.media.recovery import install_recovery
    from avobuild.model.layout import load_layout

    loaded = load_layout(layout) if layout is not None else None
    result = install_recovery(image, disk, layout=loaded)
    if as_json:
        document = {
            "image": str(image),
            "image_size": result.image_size,
            "disk": str(disk),
            "partition": result.partition,
            "offset": result.offset,
            "size": result.size,
        }
        emit(True, document)
        return
    out.print(
        f"installed {image} ({result.image_size} bytes) into partition {result.partition} "
        f"of {disk} at offset {result.offset} ({result.size} bytes)"
    )
