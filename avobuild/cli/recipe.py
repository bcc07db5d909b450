"""`avobuild recipe show`: the recipe and layout exactly as the build sees them;
`avobuild recipe init`: a starter product to edit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from avobuild.cli.common import JsonOption, app, console, emit, out

recipe_app = typer.Typer(help="Start and inspect recipes.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")


@recipe_app.command("show")
def recipe_show(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Accepted for uniformity: the output is JSON anyway.")
    ] = False,
) -> None:
    """Print the validated recipe, its layout and the planned partition offsets as JSON."""
    from avobuild.disk.plan import plan_layout
    from avobuild.model.recipe import load_recipe
    from avobuild.model.serialize import to_jsonable

    loaded = load_recipe(recipe)
    plan = plan_layout(loaded.layout)
    report = {
        "recipe": to_jsonable(loaded),
        "disk_size": plan.disk_size,
        "partitions": [
            {
                "number": part.number,
                "label": part.spec.label,
                "role": part.spec.role.value,
                "first_lba": part.first_lba,
                "last_lba": part.last_lba,
                "offset": part.offset,
                "size": part.size,
            }
            for part in plan.partitions
        ],
    }
    out.print(json.dumps(report, indent=2))


@recipe_app.command("init")
def recipe_init(
    directory: Annotated[Path, typer.Argument(help="New (or empty) directory to write into.")],
    kernel: Annotated[Path, typer.Option(help="The x86_64 kernel (bzImage) the product boots.")],
    name: Annotated[str, typer.Option(help="Product name.")] = "my-product",
    as_json: JsonOption = False,
) -> None:
    """Write a starter recipe, layout, rootfs tree and development key that build and boot."""
    from avobuild.image.starter import write_starter

    starter = write_starter(directory, name, kernel)
    document = {
        "recipe": str(starter.recipe_path),
        "layout": str(starter.layout_path),
        "name": starter.recipe.name,
        "version": starter.recipe.version,
    }

    def text() -> None:
        out.print(str(starter.recipe_path))
        out.print(str(starter.layout_path))
        console.print(f"  build it: avobuild image {starter.recipe_path} -o out")

    emit(as_json, document, text)
