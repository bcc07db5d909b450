"""The name grammar: product names, versions, compatible strings, image names, slot names.

These strings travel from a recipe into the signed manifest and into the on-target applier,
so they are restricted to ASCII characters that need no quoting anywhere (shell words, GRUB
scripts, file names). Each grammar is defined once, here: the recipe loader and the manifest
parser use `NameGrammar.pattern`, and the shell applier's validators are rendered from the
same fields (`avobuild/applier/shell.py`); tests/test_shell_names.py runs both on the same
generated strings.

A grammar is a first character from `first`, then up to `max_length - 1` characters from
`rest`. Both are bodies of a bracket expression that mean the same in a Python regular
expression and in a POSIX shell pattern: single ASCII characters and ranges of letters or
digits, with `-`, if present, last.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property


@dataclass(frozen=True)
class NameGrammar:
    """1 to `max_length` characters: one of `first`, then any of `rest`."""

    what: str
    first: str
    rest: str
    max_length: int

    @cached_property
    def pattern(self) -> re.Pattern[str]:
        return re.compile(self.text, re.ASCII)

    @property
    def text(self) -> str:
        """The grammar as a regular expression, as messages and docs spell it."""
        if self.max_length == 1:
            return f"[{self.first}]"
        return f"[{self.first}][{self.rest}]{{0,{self.max_length - 1}}}"

    def matches(self, value: str) -> bool:
        return self.pattern.fullmatch(value) is not None

    def describe(self) -> str:
        """'1-128 characters matching [...]' for error messages."""
        count = "1 character" if self.max_length == 1 else f"1-{self.max_length} characters"
        return f"{count} matching {self.text}"


# Product names, versions and (exact) compatible strings share one grammar.
IDENTIFIER = NameGrammar("identifier", "A-Za-z0-9", "A-Za-z0-9._+~:@-", 128)
PRODUCT_NAME = IDENTIFIER
VERSION = IDENTIFIER
COMPATIBLE = IDENTIFIER
# Manifest version 2: a compatible glob, `*` any run of characters, `?` one character.
COMPATIBLE_GLOB = NameGrammar("compatible pattern", "A-Za-z0-9*?", "A-Za-z0-9._+~:@*?-", 128)
IMAGE_NAME = NameGrammar("image name", "a-z0-9", "a-z0-9_-", 32)
SLOT_NAME = NameGrammar("slot name", "AB", "", 1)

# The grammars the on-target applier validates untrusted text with, by shell function name.
SHELL_GRAMMARS: dict[str, NameGrammar] = {
    "identifier": IDENTIFIER,
    "compatible_glob": COMPATIBLE_GLOB,
    "image_name": IMAGE_NAME,
    "slot_name": SLOT_NAME,
}
