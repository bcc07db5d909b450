"""`avobuild doctor`: which host tools are installed, build tools apart from test-only ones."""

from __future__ import annotations

import typer

from avobuild.cli.common import JsonOption, app, emit, out


@app.command()
def doctor(as_json: JsonOption = False) -> None:
    """List the host tools avobuild uses and whether each is installed.

    Exits with the missing-tool code only when a tool avobuild itself runs is missing; tools
    only the test suite needs are listed apart.
    """
    from avobuild.errors import ToolMissing
    from avobuild.run import TOOLS, ToolUse, which

    missing_build_tools = 0
    tools: list[dict[str, object]] = []
    for use, heading in (
        (ToolUse.BUILD, "build host tools (avobuild runs them):"),
        (ToolUse.TEST, "test-only tools (make test needs them):"),
    ):
        if not as_json:
            out.print(heading)
        for tool in TOOLS.values():
            if tool.use is not use:
                continue
            entry: dict[str, object] = {
                "name": tool.name,
                "use": use.value,
                "purpose": tool.purpose,
                "package": tool.package,
                "path": None,
            }
            tools.append(entry)
            try:
                location = which(tool.name)
            except ToolMissing:
                missing_build_tools += use is ToolUse.BUILD
                if not as_json:
                    out.print(
                        f"MISSING {tool.name:<12} needed to {tool.purpose} "
                        f"(apt-get install {tool.package})"
                    )
            else:
                entry["path"] = str(location)
                if not as_json:
                    out.print(f"ok      {tool.name:<12} {location}")
    if as_json:
        emit(True, {"ok": missing_build_tools == 0, "tools": tools})
    if missing_build_tools:
        raise typer.Exit(ToolMissing.exit_code)
