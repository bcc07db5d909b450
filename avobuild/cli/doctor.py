"""`avobuild doctor`: which host tools are installed, build tools apart from test-only ones."""

from __future__ import annotations

import typer

from avobuild.cli.common import app, out


@app.command()
def doctor() -> None:
    """List the host tools avobuild uses and whether each is installed.

    Exits with the missing-tool code only when a tool avobuild itself runs is missing; tools
    only the test suite needs are listed apart.
    """
    from avobuild.errors import ToolMissing
    from avobuild.run import TOOLS, ToolUse, which

    missing_build_tools = 0
    for use, heading in (
        (ToolUse.BUILD, "build host tools (avobuild runs them):"),
        (ToolUse.TEST, "test-only tools (make test needs them):"),
    ):
        out.print(heading)
        for tool in TOOLS.values():
            if tool.use is not use:
                continue
            try:
                location = which(tool.name)
            except ToolMissing:
                missing_build_tools += use is ToolUse.BUILD
                out.print(
                    f"MISSING {tool.name:<12} needed to {tool.purpose} "
                    f"(apt-get install {tool.package})"
                )
            else:
                out.print(f"ok      {tool.name:<12} {location}")
    if missing_build_tools:
        raise typer.Exit(ToolMissing.exit_code)
