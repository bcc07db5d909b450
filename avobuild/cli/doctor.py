"""`avobuild doctor`: which host tools are installed."""

from __future__ import annotations

import typer

from avobuild.cli.common import app, out


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
