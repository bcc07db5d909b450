"""Shell programs: one template environment, one quoting filter, one shared library.

The on-target applier and the recovery system are POSIX sh programs for busybox ash. Their
code is kept as `.sh` files (`avobuild/applier/shell/`, `avobuild/media/templates/*.sh`);
only what carries a product's values is a Jinja2 template, rendered by the environment
`template_environment` makes: StrictUndefined, no autoescaping, and the `sh` filter, through
which every value in a shell template goes (tests/test_shell_lint.py checks each `{{ }}`).

A program is linked from its rendered head (shebang, comments, configuration) and static
parts with `link_program`. `library_parts` is what the applier and the recovery system
share: the name grammars rendered from `avobuild.model.names`, then `shell/lib.sh` (number
parsing, untrusted text, atomic writes, the GRUB environment block, partition lookup).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jinja2

from avobuild.errors import RecipeError
from avobuild.model.names import SHELL_GRAMMARS, NameGrammar

SHELL_DIR = Path(__file__).parent / "shell"
# Characters a value may hold: none of them is special inside single quotes or needs to be
# (no quote, backslash, dollar, backtick, whitespace or line break).
_SH_SAFE = re.compile(r"[A-Za-z0-9._+~:@/,{}?=&%!*\[\]^-]*")


def sh_quote(value: object) -> str:
    """A single-quoted shell word; refuses characters that would need more than quotes."""
    text = "" if value is None else str(value)
    if not _SH_SAFE.fullmatch(text):
        raise RecipeError(f"applier: value {text!r} contains characters unsafe for the script")
    return f"'{text}'"


def template_environment(loader: jinja2.BaseLoader) -> jinja2.Environment:
    """The one Jinja2 environment for shell programs and boot configuration."""
    env = jinja2.Environment(
        loader=loader,
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # shell scripts and boot configuration, not HTML
        keep_trailing_newline=True,
    )
    env.filters["sh"] = sh_quote
    return env


def applier_templates() -> jinja2.Environment:
    return template_environment(jinja2.PackageLoader("avobuild.applier", "templates"))


def shell_source(name: str) -> str:
    """A static shell file of `avobuild/applier/shell/`."""
    return (SHELL_DIR / name).read_text()


@dataclass(frozen=True)
class ShellGrammar:
    """A name grammar as the shell checks it: patterns of the characters it refuses."""

    name: str
    what: str
    text: str
    bad_first: str
    bad_rest: str
    max_length: int


def shell_grammar(name: str, grammar: NameGrammar) -> ShellGrammar:
    # `?` matches any character: a grammar of one character refuses every second one.
    bad_rest = f"[!{grammar.rest}]" if grammar.rest else "?"
    return ShellGrammar(
        name, grammar.what, grammar.text, f"[!{grammar.first}]", bad_rest, grammar.max_length
    )


def render_name_grammars() -> str:
    grammars = [shell_grammar(name, grammar) for name, grammar in SHELL_GRAMMARS.items()]
    return applier_templates().get_template("names.sh.j2").render(grammars=grammars)


def library_parts() -> tuple[str, ...]:
    """The shell code the applier and the recovery system share, in order."""
    return (render_name_grammars(), shell_source("lib.sh"))


def link_program(head: str, parts: Sequence[str]) -> str:
    """One shell program: `head` (shebang, comments, configuration), then each part."""
    pieces = [head.rstrip("\n") + "\n"]
    pieces.extend("\n" + part.rstrip("\n") + "\n" for part in parts)
    return "".join(pieces)
