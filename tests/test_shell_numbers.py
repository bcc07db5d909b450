"""Numbers are parsed once, canonically (shell library: is_number): `0` or `[1-9][0-9]*`, at
most 2^63-1 or a given bound. The shell's verdicts on seeded strings equal the grammar's."""

from __future__ import annotations

import random
import re
import subprocess
from pathlib import Path

from avobuild.applier.scripts import library_parts, link_program

LARGEST = (1 << 63) - 1
CANONICAL = re.compile(r"0|[1-9][0-9]*")


def expected(text: str, bound: int = LARGEST) -> bool:
    return CANONICAL.fullmatch(text) is not None and int(text) <= min(bound, LARGEST)


def candidates(rng: random.Random) -> list[str]:
    edges = [
        "", "0", "00", "01", "010000", "1", "-1", "+1", " 1", "1 ", "1\t", "0x10", "1e3",
        "١", "9223372036854775806", "9223372036854775807", "9223372036854775808",
        "9223372036854775810", "9300000000000000000", "9223372037000000000",
        "9223372036854775799", "18446744073709551616", "99999999999999999999", "1" * 19,
        "9" * 19, "1" + "0" * 18, "-0", "1.5", "½",
    ]  # fmt: skip
    strings = list(edges)
    for _ in range(600):
        length = rng.choice([1, 2, 5, 18, 19, 19, 19, 20])
        digits = "".join(rng.choice("0123456789") for _ in range(length))
        if rng.random() < 0.2:
            position = rng.randrange(length)
            digits = digits[:position] + rng.choice("-+ x.\xff") + digits[position + 1 :]
        strings.append(digits)
    return strings


def shell_verdicts(cases: list[tuple[str, str]], tmp_path: Path) -> list[bool]:
    program = tmp_path / "numbers.sh"
    loop = (
        "while IFS= read -r bound && IFS= read -r text; do\n"
        '    if [ -z "$bound" ]; then is_number "$text"; else is_number "$text" "$bound"; fi\n'
        "    echo $?\n"
        "done\n"
    )
    program.write_text(link_program("#!/bin/sh\nset -u\n", (*library_parts(), loop)))
    data = "".join(f"{bound}\n{text}\n" for bound, text in cases).encode("utf-8", "surrogateescape")
    result = subprocess.run(
        ["busybox", "sh", str(program)], input=data, capture_output=True, check=True
    )
    return [line == b"0" for line in result.stdout.splitlines()]


def test_shell_and_python_agree_on_numbers(tmp_path: Path) -> None:
    strings = candidates(random.Random(20261202))
    bounds = ["", "16777216", "100", "0"]
    cases = [(bound, text) for text in strings for bound in bounds]
    verdicts = shell_verdicts(cases, tmp_path)
    assert len(verdicts) == len(cases)
    wrong = [
        (bound, text, shell)
        for (bound, text), shell in zip(cases, verdicts, strict=True)
        if shell != expected(text, int(bound) if bound else LARGEST)
    ]
    assert not wrong, wrong[:10]
    assert any(verdicts) and not all(verdicts)


def test_arithmetic_on_a_number_is_decimal(tmp_path: Path) -> None:
    """Why the helper exists: after it, `$(( ))` and `[ ]` agree (no octal, no wrap)."""
    program = tmp_path / "arith.sh"
    program.write_text(
        link_program(
            "#!/bin/sh\n",
            (
                *library_parts(),
                "for n in 10000 010000 -4096 9223372036854775807; do\n"
                '    if is_number "$n"; then echo "$n $((n + 0))"; else echo "$n refused"; fi\n'
                "done\n",
            ),
        )
    )
    result = subprocess.run(
        ["busybox", "sh", str(program)], capture_output=True, text=True, check=True
    )
    assert result.stdout.splitlines() == [
        "10000 10000",
        "010000 refused",
        "-4096 refused",
        "9223372036854775807 9223372036854775807",
    ]
