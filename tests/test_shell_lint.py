"""Shell is code: every shell file and every rendered shell program passes `shellcheck -s sh`
and `busybox sh -n`; every value in a shell template goes through the `sh` quoting filter;
the power-loss test hook is only in test builds.

SC2015 ("A && B || C is not if-then-else") is excluded everywhere: `check && check || refuse`
is how these programs state a condition and its refusal, and C running when B fails is the
point. Static fragments (linked into one program with others) are also checked without
SC2034/SC2154, since their variables are set and used across files; the linked programs are
checked with every other rule.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import jinja2
import pytest
from conftest import REPO, Product

from avobuild.applier.render import SCRIPT_PATH, render_applier
from avobuild.applier.scripts import SHELL_DIR, applier_templates, library_parts
from avobuild.media.recovery import TEMPLATES, recovery_program, render_recovery_conf
from avobuild.model.recipe import load_recipe

SHELLCHECK = ["shellcheck", "--shell=sh", "--exclude=SC2015", "--format=gcc"]
STATIC_SHELL = sorted([*SHELL_DIR.glob("*.sh"), *TEMPLATES.glob("*.sh")])
SHELL_TEMPLATES = sorted(
    [
        *(REPO / "avobuild/applier/templates").glob("*.sh.j2"),
        *TEMPLATES.glob("*.sh.j2"),
        TEMPLATES / "recovery.conf.j2",
    ]
)


def lint(path: Path, *, fragment: bool = False) -> None:
    excluded = ["--exclude=SC2034,SC2154"] if fragment else []
    checked = subprocess.run([*SHELLCHECK, *excluded, str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    parsed = subprocess.run(["busybox", "sh", "-n", str(path)], capture_output=True, text=True)
    assert parsed.returncode == 0, parsed.stderr


# Programs installed as they are; every other static file is linked with others.
STANDALONE = {"S45avocado-update.sh", "init.sh", "udhcpc.sh"}


@pytest.mark.parametrize("path", STATIC_SHELL, ids=lambda path: path.name)
def test_static_shell_files_pass_shellcheck(path: Path) -> None:
    lint(path, fragment=path.name not in STANDALONE)


def test_shellcheck_finds_what_it_should(tmp_path: Path) -> None:
    """The oracle can fail: an unquoted expansion and a bash-only construct are reported."""
    bad = tmp_path / "bad.sh"
    bad.write_text('#!/bin/sh\nrm $1\n[[ -n "$2" ]] && echo yes\n')
    result = subprocess.run([*SHELLCHECK, str(bad)], capture_output=True, text=True)
    assert result.returncode != 0
    assert "SC2086" in result.stdout and "SC3010" in result.stdout


APPLIER_VARIANTS = {
    "grub-busybox": "",
    "grub-systemd": '\n[applier]\ninit = "systemd"\n'
    'target-tools = ["busybox", "openssl", "zstd", "systemctl"]\n',
    "uboot-busybox": '\n[applier]\nbootloader = "u-boot"\n'
    'target-tools = ["busybox", "openssl", "zstd", "fw_printenv", "fw_setenv"]\n'
    'disk = "/dev/mmcblk0"\n',
}


@pytest.mark.parametrize("variant", sorted(APPLIER_VARIANTS))
@pytest.mark.parametrize("test_hooks", [False, True], ids=["production", "test-build"])
def test_rendered_applier_passes_shellcheck(
    product: Product, tmp_path: Path, variant: str, test_hooks: bool
) -> None:
    recipe = product.recipe.with_name("variant.toml")
    recipe.write_text(product.recipe.read_text() + APPLIER_VARIANTS[variant])
    rendered = render_applier(load_recipe(recipe), tmp_path / "out", test_hooks=test_hooks)
    scripts = [path for path in rendered.files if path.read_bytes().startswith(b"#!/bin/sh")]
    assert tmp_path / "out" / SCRIPT_PATH in scripts
    for script in scripts:
        lint(script)
    applier = (tmp_path / "out" / SCRIPT_PATH).read_text()
    # The power-loss hook (a kill -9 of the process group) only in a test build.
    assert ("AVO_TEST_KILL_AFTER" in applier) is test_hooks
    assert ("kill -9" in applier) is test_hooks


def test_rendered_recovery_programs_pass_shellcheck(product: Product, tmp_path: Path) -> None:
    from avobuild.media.recovery import Mode

    conf = tmp_path / "recovery.conf"
    conf.write_text(render_recovery_conf(load_recipe(product.recipe), Mode.USB))
    lint(conf, fragment=True)  # sourced by init and avocado-recovery
    program = tmp_path / "avocado-recovery"
    program.write_text(recovery_program())
    lint(program)
    # the library it shares with the applier is linked in, once
    for part in library_parts():
        assert program.read_text().count(part) == 1


_VALUE = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)


@pytest.mark.parametrize("path", SHELL_TEMPLATES, ids=lambda path: path.name)
def test_every_value_in_a_shell_template_is_quoted(path: Path) -> None:
    values = _VALUE.findall(path.read_text())
    assert values, f"{path.name} renders no value: it should be a static .sh file"
    unquoted = [value.strip() for value in values if not re.search(r"\|\s*sh\s*$", value)]
    assert not unquoted, f"{path.name}: values without the sh filter: {unquoted}"


def test_template_environment_refuses_undefined_values_and_unsafe_text() -> None:
    env = applier_templates()
    with pytest.raises(jinja2.UndefinedError):
        env.from_string("X={{ missing | sh }}").render()
    assert env.from_string("X={{ value | sh }}").render(value="a-b") == "X='a-b'"
    with pytest.raises(Exception, match="unsafe"):
        env.from_string("X={{ value | sh }}").render(value="a'; reboot; '")
