"""The name grammar exists once (avobuild/model/names.py); the shell applier's validators are
rendered from it. Both validators judge the same seeded strings and must agree."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest

from avobuild.applier.scripts import library_parts, link_program
from avobuild.model.names import SHELL_GRAMMARS, NameGrammar

# Characters outside every grammar (the shell reads one string per line, so no LF or NUL);
# "\udcff" is the raw byte 0xff (written with surrogateescape).
HOSTILE = [*" !\"#$%&'()*,/;<=>?[\\]^`{|}\t\r\x01\x7f", "é", "\udcff", "☃"]


def _alphabet(characters: str) -> list[str]:
    """The characters of a bracket-expression body (ranges expanded)."""
    found: list[str] = []
    index = 0
    while index < len(characters):
        if index + 2 < len(characters) and characters[index + 1] == "-":
            start, end = characters[index], characters[index + 2]
            found += [chr(code) for code in range(ord(start), ord(end) + 1)]
            index += 3
        else:
            found.append(characters[index])
            index += 1
    return found


def candidates(grammar: NameGrammar, rng: random.Random, count: int = 400) -> list[str]:
    """Seeded strings around the grammar: valid ones, edge lengths, one bad character."""
    first, rest = _alphabet(grammar.first), _alphabet(grammar.rest) or _alphabet(grammar.first)
    strings = ["", *first, *(first[0] + char for char in rest)]
    for _ in range(count):
        length = rng.choice(
            [
                1,
                2,
                3,
                grammar.max_length - 1,
                grammar.max_length,
                grammar.max_length + 1,
                rng.randrange(1, grammar.max_length + 2),
            ]
        )
        length = max(1, length)
        text = [rng.choice(first)] + [rng.choice(rest) for _ in range(length - 1)]
        if rng.random() < 0.5:
            text[rng.randrange(length)] = rng.choice(HOSTILE + rest + first)
        strings.append("".join(text))
    return strings


def shell_verdicts(cases: list[tuple[str, str]], tmp_path: Path) -> list[bool]:
    program = tmp_path / "names.sh"
    program.write_text(
        link_program(
            "#!/bin/sh\nset -u\n",
            (
                *library_parts(),
                "while IFS= read -r grammar && IFS= read -r text; do\n"
                '    if is_name "$grammar" "$text"; then echo 1; else echo 0; fi\n'
                "done\n",
            ),
        )
    )
    data = "".join(f"{grammar}\n{text}\n" for grammar, text in cases).encode(
        "utf-8", "surrogateescape"
    )
    result = subprocess.run(
        ["busybox", "sh", str(program)], input=data, capture_output=True, check=True
    )
    return [line == b"1" for line in result.stdout.splitlines()]


@pytest.mark.parametrize("name", sorted(SHELL_GRAMMARS))
def test_shell_and_python_agree_on_names(name: str, tmp_path: Path) -> None:
    grammar = SHELL_GRAMMARS[name]
    strings = candidates(grammar, random.Random(f"names-{name}"))
    verdicts = shell_verdicts([(name, text) for text in strings], tmp_path)
    assert len(verdicts) == len(strings)
    expected = [grammar.matches(text) for text in strings]
    disagreements = [
        (text, python, shell)
        for text, python, shell in zip(strings, expected, verdicts, strict=True)
        if python != shell
    ]
    assert not disagreements, disagreements[:10]
    # the generated strings exercise both answers
    assert any(expected) and not all(expected)


def test_unknown_grammar_is_refused(tmp_path: Path) -> None:
    assert shell_verdicts([("no-such-grammar", "abc")], tmp_path) == [False]


def test_grammar_texts_are_the_documented_ones() -> None:
    assert SHELL_GRAMMARS["identifier"].text == "[A-Za-z0-9][A-Za-z0-9._+~:@-]{0,127}"
    assert SHELL_GRAMMARS["compatible_glob"].text == "[A-Za-z0-9*?][A-Za-z0-9._+~:@*?-]{0,127}"
    assert SHELL_GRAMMARS["image_name"].text == "[a-z0-9][a-z0-9_-]{0,31}"
    assert SHELL_GRAMMARS["slot_name"].text == "[AB]"
