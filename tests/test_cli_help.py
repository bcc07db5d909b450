"""Help like git's: -h everywhere, metavars that say what to type, no markup eating text,
shell completion that bash really loads and that completes commands and options."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
from conftest import REPO, avobuild_cli
from test_cli_json import _commands

EXE = shutil.which("avobuild") or str(REPO / ".venv" / "bin" / "avobuild")


def test_dash_h_is_help_everywhere_and_metavars_say_what_to_type() -> None:
    assert avobuild_cli("-h").stdout == avobuild_cli("--help").stdout
    python_types = re.compile(r"<(path|bool|str|int|list\[[A-Za-z]+\])>|\{[a-z_]+\}")
    for path in _commands():
        argv = path.split()
        short = avobuild_cli(*argv, "-h").stdout
        assert short == avobuild_cli(*argv, "--help").stdout, path
        assert short.startswith(f"Usage: avobuild {path} "), short[:80]
        assert not python_types.search(short), f"avobuild {path}: {python_types.search(short)}"
    create = avobuild_cli("bundle", "create", "-h").stdout
    for shown in ("--image NAME=PATH", "-o, --output PATH", "--key KEY", "--level N"):
        assert shown in create
    assert (
        "Usage: avobuild repo add [OPTIONS] DIR BUNDLE..."
        in avobuild_cli("repo", "add", "-h").stdout
    )
    assert "--tools SET,SET" in avobuild_cli("recovery", "build", "-h").stdout


@pytest.mark.parametrize(
    "argv", [("recovery", "build"), ("media", "usb"), ("media", "pxe")], ids=" ".join
)
def test_help_keeps_square_brackets(argv: tuple[str, ...]) -> None:
    text = " ".join(avobuild_cli(*argv, "-h").stdout.split())
    expected = {"build": "[recovery] tools", "usb": "[recovery] firmware", "pxe": "[Network]"}
    assert expected[argv[-1]] in text


def _complete(words: str) -> list[str]:
    env = {
        **os.environ,
        "_AVOBUILD_COMPLETE": "complete_bash",
        "COMP_WORDS": words,
        "COMP_CWORD": str(len(words.split()) - 1),
    }
    result = subprocess.run([EXE], capture_output=True, text=True, env=env, check=True)
    return result.stdout.split()


def test_shell_completion() -> None:
    """typer below 0.29 prints the script of the shell `--show-completion` runs in (it finds
    it among its parent processes), so the script is asked for from bash (`; true` keeps
    bash from exec-ing the command in its place)."""
    script = subprocess.run(
        ["bash", "-c", f"{EXE} --show-completion; true"], capture_output=True, text=True, check=True
    ).stdout
    assert "_AVOBUILD_COMPLETE=complete_bash" in script, script[:200]
    loaded = subprocess.run(
        ["bash", "-c", f"source <({EXE} --show-completion) && complete -p avobuild"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "-F _avobuild_completion avobuild" in loaded
    assert _complete("avobuild bun") == ["bundle"]
    assert _complete("avobuild bundle cr") == ["create"]
    assert _complete("avobuild install --key") == ["--keyring"]


def test_a_command_run_loads_no_pydantic(tmp_path: os.PathLike[str]) -> None:
    """typer 0.29 coerces every parameter through pydantic: 13 MiB more in every `avobuild`
    process, which put the host `delta apply` over its 64 MB budget; pyproject.toml keeps
    typer below 0.29 for that. The command runs past its option parsing and fails on the
    missing keyring; the modules it loaded are listed at exit."""
    script = (
        "import atexit, sys\n"
        "atexit.register(lambda: print(sorted(m for m in sys.modules if 'pydantic' in m)))\n"
        "from avobuild.cli import main\n"
        "main()\n"
    )
    missing = f"{tmp_path}/missing"
    result = subprocess.run(
        [str(REPO / ".venv" / "bin" / "python"), "-c", script, "delta", "apply", missing,
         "--keyring", missing, "--source", f"rootfs={missing}", "--output", f"rootfs={missing}"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert "missing" in result.stderr, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout
