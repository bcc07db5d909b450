"""--json on every reporting command: one JSON object on standard output and nothing else,
the schema docs/json.md documents; progress on standard error (plain lines off a terminal,
at a bounded rate) and --quiet."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import typer
from conftest import REPO, Product, avobuild_cli, write_product

from avobuild.cli import app
from avobuild.cli.output import PlainProgress


def _json(*args: str | Path) -> dict[str, object]:
    result = avobuild_cli(*args, "--json")
    document = json.loads(result.stdout)  # the whole of standard output is one document
    assert isinstance(document, dict), args
    return document


def _commands() -> dict[str, typer.main.TyperCommand | object]:
    """Every command path ("bundle create") and its click command."""
    root = typer.main.get_command(app)
    found: dict[str, object] = {}

    def walk(command: object, prefix: str) -> None:
        children = getattr(command, "commands", None)
        if children is None:
            found[prefix] = command
            return
        for name, child in children.items():
            walk(child, f"{prefix} {name}".strip())

    walk(root, "")
    return found


def test_every_reporting_command_has_json_and_docs_json_documents_it() -> None:
    doc = (REPO / "docs" / "json.md").read_text()
    documented = set(re.findall(r"^## `avobuild ([a-z -]+)`", doc, re.MULTILINE))
    without_json = {"serve"}  # a server, not a report: it logs to standard error
    for path, command in _commands().items():
        options = {opt for param in command.params for opt in getattr(param, "opts", [])}  # type: ignore[attr-defined]
        if path in without_json:
            continue
        assert "--json" in options, f"avobuild {path}: no --json"
        assert path in documented, f"avobuild {path}: not in docs/json.md"
    assert documented <= set(_commands()), documented - set(_commands())


def test_json_outputs_match_what_they_describe(product: Product, tmp_path: Path) -> None:
    keys = _json("keys", "generate", "-o", tmp_path / "keys")
    assert Path(str(keys["private_key"])).is_file() and keys["type"] == "ed25519"
    identity = _json("keys", "id", product.public_key)
    assert re.fullmatch(r"[0-9a-f]{64}", str(identity["key_id"]))

    image = _json("image", product.recipe, "-o", tmp_path / "out")
    disk = Path(str(image["path"]))
    assert disk.stat().st_size == image["size"]
    assert [p["role"] for p in image["partitions"]][:3] == ["boot", "system-a", "system-b"]  # type: ignore[index]

    bundle = tmp_path / "v2.avb"
    v2 = write_product(product.root, version="2.0.0")
    created = _json("bundle", "create", v2.recipe, "-o", bundle)
    assert created["size"] == bundle.stat().st_size and created["version"] == "2.0.0"
    verified = _json("bundle", "verify", bundle, "--keyring", product.public_key)
    assert verified["ok"] is True and verified["version"] == "2.0.0"
    digest = _json("bundle", "digest", bundle, "-o", tmp_path / "digest")
    assert digest["size"] == (tmp_path / "digest").stat().st_size

    installed = _json("install", bundle, "--disk", disk, "--keyring", product.public_key)
    assert (installed["slot"], installed["previous"], installed["version"]) == ("B", "A", "2.0.0")
    info = _json("bundle", "info", bundle)
    rootfs = next(i for i in info["images"] if i["name"] == "rootfs")  # type: ignore[attr-defined]
    assert installed["written"] == {"rootfs": rootfs["size"]}
    status = _json("status", "--disk", disk)
    assert status["primary"] == "B"

    rendered = _json("applier", "render", product.recipe, "-o", tmp_path / "applier")
    for name in rendered["files"]:  # type: ignore[attr-defined]
        assert (tmp_path / "applier" / name).is_file()
    doctor = _json("doctor")
    tools = {tool["name"]: tool for tool in doctor["tools"]}  # type: ignore[attr-defined]
    assert tools["mke2fs"]["path"] and doctor["ok"] is True
    shown = _json("recipe", "show", product.recipe)
    assert shown["recipe"]["name"] == "testprod"  # type: ignore[index]

    repository = tmp_path / "repo"
    init = _json(
        "repo", "init", repository, "--name", "acme", "--bundle-keyring", product.public_key,
        "--key", product.private_key,
    )  # fmt: skip
    assert init["index"]["serial"] == 1  # type: ignore[index]
    added = _json("repo", "add", repository, bundle, "--key", product.private_key)
    (entry,) = added["added"]  # type: ignore[misc]
    sha256 = hashlib.sha256(bundle.read_bytes()).hexdigest()
    assert entry["path"] == f"bundles/{sha256}.avb" and entry["new"] is True
    assert added["index"]["serial"] == 2  # type: ignore[index]


def test_json_errors_and_quiet(product: Product, tmp_path: Path) -> None:
    missing = tmp_path / "missing.avb"
    failed = avobuild_cli(
        "bundle", "verify", missing, "--keyring", product.public_key, "--json", check=False
    )
    assert failed.returncode == 6
    error = json.loads(failed.stdout)["error"]
    assert error["exit_code"] == 6 and str(missing) in error["message"]
    assert str(missing) in failed.stderr

    loud = avobuild_cli("image", product.recipe, "-o", tmp_path / "a")
    assert "• building rootfs" in loud.stderr
    quiet = avobuild_cli("--quiet", "image", product.recipe, "-o", tmp_path / "b")
    assert quiet.stderr == "" and quiet.stdout.splitlines()[0].endswith(".img")
    # Off a terminal, progress is plain lines: the last one of each task says 100%.
    bundle = tmp_path / "v2.avb"
    avobuild_cli("bundle", "create", write_product(product.root, version="2").recipe, "-o", bundle)
    disk = tmp_path / "a" / "testprod-1.0.0.img"
    installed = avobuild_cli("install", bundle, "--disk", disk, "--keyring", product.public_key)
    assert "\x1b[" not in installed.stderr  # no terminal control sequences in a log
    assert re.search(r"^writing: [0-9.]+ MiB of [0-9.]+ MiB \(100%\)", installed.stderr, re.M)
    assert re.search(r"^verifying: .*\(100%\)", installed.stderr, re.M)
    quiet_install = avobuild_cli(
        "-q", "install", bundle, "--disk", tmp_path / "b" / "testprod-1.0.0.img",
        "--keyring", product.public_key,
    )  # fmt: skip
    assert quiet_install.stderr == "" and "installed 2 into slot B" in quiet_install.stdout


def test_plain_progress_is_bounded_and_ends_with_the_total() -> None:
    now = [0.0]
    progress = PlainProgress(interval=5.0, clock=lambda: now[0])
    lines = []
    total = 100 << 20
    for step in range(1001):  # 1001 updates over 20 simulated seconds
        now[0] = step * 0.02
        line = progress.update("writing", step * total // 1000, total)
        if line is not None:
            lines.append(line)
    assert 3 <= len(lines) <= 6, lines  # one per 5 s, plus the last
    assert lines[-1].startswith("writing: 100.0 MiB of 100.0 MiB (100%), 5.0 MiB/s")
    assert "ETA" in lines[1] and "ETA" not in lines[-1]
    assert progress.update("writing", total, total) is None  # a finished task stays quiet


@pytest.mark.skipif(shutil.which("script") is None, reason="needs script(1) from util-linux")
def test_terminal_progress_has_bars_with_rate_and_time(product: Product, tmp_path: Path) -> None:
    """On a terminal (script(1) gives the command a pseudo-terminal): bars, a rate, a time left."""
    avobuild_cli("image", product.recipe, "-o", tmp_path / "out")
    bundle = tmp_path / "v2.avb"
    avobuild_cli("bundle", "create", write_product(product.root, version="2").recipe, "-o", bundle)
    exe = shutil.which("avobuild") or str(REPO / ".venv" / "bin" / "avobuild")
    command = shlex.join(
        [exe, "install", str(bundle), "--disk", str(tmp_path / "out" / "testprod-1.0.0.img"),
         "--keyring", str(product.public_key)]
    )  # fmt: skip
    result = subprocess.run(
        ["script", "-qec", command, "/dev/null"],
        capture_output=True, text=True, check=True,
        env={**os.environ, "TERM": "xterm", "COLUMNS": "120"},
    )  # fmt: skip
    assert "━" in result.stdout  # a bar
    assert re.search(r"verifying.*24\.0/24\.0 MiB", result.stdout)
    assert re.search(r"[0-9.]+ [kMG]?B/s", result.stdout)  # the rate
    assert re.search(r"\d:\d\d:\d\d", result.stdout)  # the time left
    assert "installed 2 into slot B" in result.stdout
