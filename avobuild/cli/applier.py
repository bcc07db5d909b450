"""`avobuild applier render`: the on-target applier for one product."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from avobuild.cli.common import JsonOption, app, check_output_directory, emit, out
from avobuild.errors import BuildError

applier_app = typer.Typer(help="Render the on-target update applier.", no_args_is_help=True)
app.add_typer(applier_app, name="applier")


@applier_app.command("render")
def applier_render(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Directory to render into.")],
    as_json: JsonOption = False,
) -> None:
    """Render avocado-update, rollback.yaml, keys, units and boot scripts into a directory."""
    from avobuild.applier.render import render_applier
    from avobuild.model.recipe import load_recipe

    loaded = load_recipe(recipe)
    check_output_directory(output, BuildError)
    rendered = render_applier(loaded, output)
    if as_json:
        files = [str(path.relative_to(rendered.root)) for path in rendered.files]
        emit(True, {"path": str(rendered.root), "files": files})
        return
    for path in rendered.files:
        out.print(str(path.relative_to(rendered.root)))
