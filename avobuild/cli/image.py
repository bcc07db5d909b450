"""`avobuild image`: factory disk images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from avobuild.cli.common import (
    JsonOption,
    WorkdirOption,
    app,
    check_output_directory,
    console,
    emit,
    out,
    step,
    work_directory,
)
from avobuild.errors import BuildError


@app.command()
def image(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output directory.")],
    recovery: Annotated[
        Path | None,
        typer.Option(help="Recovery partition image (avobuild recovery build) to include."),
    ] = None,
    workdir: WorkdirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Build the factory disk image (GPT, A/B slots, data, recovery) and its .bmap."""
    from avobuild.image.factory import build_factory_image
    from avobuild.model.recipe import load_recipe

    loaded = load_recipe(recipe)
    check_output_directory(output, BuildError)
    with work_directory(workdir) as work:
        result = build_factory_image(loaded, output, work, step, recovery_image=recovery)
    if as_json:
        document = {
            "path": str(result.path),
            "bmap": str(result.bmap),
            "size": result.plan.disk_size,
            "table": result.plan.layout.table.value,
            "partitions": [
                {
                    "number": part.number,
                    "label": part.spec.label,
                    "role": part.spec.role.value,
                    "offset": part.offset,
                    "size": part.size,
                }
                for part in result.plan.partitions
            ],
        }
        emit(True, document)
        return
    out.print(f"{result.path}")
    out.print(f"{result.bmap}")
    for part in result.plan.partitions:
        console.print(
            f"  {part.number}: {part.spec.label:<12} {part.spec.role.value:<10} "
            f"offset {part.offset:>12}  size {part.size:>12}"
        )
