"""`avobuild layout check`: a layout validated and placed on its own, without a recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from avobuild.cli.common import JsonOption, app, emit, out
from avobuild.model.tomlcheck import format_size

layout_app = typer.Typer(help="Check partition layouts.", no_args_is_help=True)
app.add_typer(layout_app, name="layout")


@layout_app.command("check")
def layout_check(
    layout: Annotated[Path, typer.Argument(help="Layout TOML file.")],
    as_json: JsonOption = False,
) -> None:
    """Read a layout strictly and place it (every key and overlap check); print the plan."""
    from avobuild.disk.plan import plan_layout
    from avobuild.model.layout import load_layout

    plan = plan_layout(load_layout(layout))
    partitions = [
        {
            "number": part.number,
            "label": part.spec.label,
            "role": part.spec.role.value,
            "offset": part.offset,
            "size": part.size,
        }
        for part in plan.partitions
    ]
    document = {
        "path": str(layout),
        "table": plan.layout.table.value,
        "disk_size": plan.disk_size,
        "partitions": partitions,
        "raw_regions": [
            {"name": region.name, "offset": region.offset, "size": region.size}
            for region in plan.layout.raw_regions
        ],
    }

    def text() -> None:
        out.print(
            f"{layout}: OK, {plan.layout.table.value.upper()}, "
            f"{format_size(plan.disk_size)} ({plan.disk_size} bytes)"
        )
        for part in partitions:
            out.print(
                f"  {part['number']}: {part['label']:<12} {part['role']:<10} "
                f"offset {part['offset']:>12}  size {part['size']:>12}"
            )

    emit(as_json, document, text)
