"""The shell library shared by the applier and the recovery system (avobuild/applier/shell/
lib.sh): its GRUB environment block writer gives the bytes of avobuild's own writer (and of
what grub-editenv reads), its reader assigns values without evaluating them, and `clean`
never lets a byte outside printable ASCII through."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest

from avobuild.applier.scripts import library_parts, link_program
from avobuild.boot.grubenv import parse_grubenv, render_grubenv
from avobuild.boot.state import factory_state


def run_library(tmp_path: Path, code: str, **env: str) -> subprocess.CompletedProcess[bytes]:
    program = tmp_path / "program.sh"
    head = f"#!/bin/sh\nset -u\nWORK={tmp_path}\ncheckpoint() {{ :; }}\n"
    program.write_text(link_program(head, (*library_parts(), code)))
    return subprocess.run(
        ["busybox", "sh", str(program)],
        capture_output=True,
        check=True,
        env={"PATH": "/bin:/usr/bin", **env},
    )


@pytest.mark.parametrize("seed", range(4))
def test_grubenv_write_gives_the_python_writers_bytes(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    state = factory_state(f"1.{seed}.0", "testprod-x86_64")
    variables = state.to_variables()
    variables.update(
        {
            "avo_primary": rng.choice("AB"),
            "avo_B_ok": rng.choice("01"),
            "avo_B_tries": str(rng.randrange(10)),
            "avo_B_version": f"2.{rng.randrange(100)}.0",
        }
    )
    if seed % 2:
        variables["avo_security_version"] = str(rng.randrange(1, 1000))
    variables["other_var"] = "kept"  # not the applier's: kept after its own
    env_file = tmp_path / "grubenv"
    env_file.write_bytes(render_grubenv({"other_var": "kept"}))
    assignments = "".join(
        f"{name}='{value}'\n" for name, value in variables.items() if name != "other_var"
    )
    unset = "".join(
        f"{name}=''\n"
        for name in ("avo_A_security_version", "avo_B_security_version", "avo_security_version")
        if name not in variables
    )
    run_library(tmp_path, unset + assignments + f'grubenv_write "{env_file}"\n')
    written = env_file.read_bytes()
    assert len(written) == 1024
    assert written == render_grubenv(variables)
    assert parse_grubenv(written) == variables
    listed = subprocess.run(
        ["grub-editenv", str(env_file), "list"], capture_output=True, text=True, check=True
    )
    assert dict(line.split("=", 1) for line in listed.stdout.splitlines()) == variables


def test_grubenv_read_assigns_without_evaluating(tmp_path: Path) -> None:
    env_file = tmp_path / "grubenv"
    hostile = {
        "avo_primary": "B",
        "avo_A_version": "$(touch pwned)`touch pwned`",
        "avo_compatible": "x'; touch pwned; '",
    }
    env_file.write_bytes(render_grubenv(hostile))
    result = run_library(
        tmp_path,
        f'grubenv_read "{env_file}" || exit 9\n'
        'printf "%s|%s|%s|%s\\n" "$avo_primary" "$avo_A_version" "$avo_compatible" "$avo_B_ok"\n',
    )
    assert result.stdout.decode() == "B|$(touch pwned)`touch pwned`|x'; touch pwned; '|\n"
    assert not (tmp_path / "pwned").exists()
    # A file that is not a 1024-byte block is not read at all.
    short = tmp_path / "short"
    short.write_bytes(b"# GRUB Environment Block\navo_primary=A\n")
    check = run_library(
        tmp_path, f'if grubenv_read "{short}"; then echo read; else echo refused; fi\n'
    )
    assert check.stdout == b"refused\n"


def test_clean_lets_only_printable_ascii_through(tmp_path: Path) -> None:
    text = "ok \x1b[2J\xff\n\ttab " + "x" * 300
    result = run_library(
        tmp_path, 'clean "$HOSTILE" 40; echo; json_string "$HOSTILE" 20; echo\n', HOSTILE=text
    )
    cleaned, as_json = result.stdout.splitlines()
    expected = bytes(byte if 0x20 <= byte < 0x7F else 0x3F for byte in text.encode())
    assert cleaned == expected[:40]
    assert as_json == b'"' + expected[:20] + b'"'
    quoted = run_library(tmp_path, 'json_string "$HOSTILE"; echo\n', HOSTILE='a"b\\c')
    assert quoted.stdout == b'"a\\"b\\\\c"\n'
