"""Strict, typed access to TOML tables, with errors that name the file, the table and the key.

Recipes and layouts are read only through `Table`, so every mistake a user can make is
reported the same way: `recipes/demo.toml: [partition.system-a] size: expected a size like
"512M", got "big"`. Unknown keys are errors too: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import difflib
import enum
import re
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from avobuild.errors import RecipeError

_SIZE_PATTERN = re.compile(r"^(\d+)\s*([KMGT]?)(?:i?B)?$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

E = TypeVar("E", bound=enum.StrEnum)


def describe_choices(choices: Sequence[str]) -> str:
    """How an error names the allowed values: '"a" or "b"', or 'one of a, b, c'."""
    if len(choices) == 2:
        return f'"{choices[0]}" or "{choices[1]}"'
    return "one of " + ", ".join(choices)


def parse_size(text: str) -> int:
    """Parse "512M", "1G", "64KiB" or "4096" into bytes (binary units); raise ValueError."""
    match = _SIZE_PATTERN.match(text.strip())
    if match is None:
        raise ValueError(text)
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]


def format_size(size: int) -> str:
    """The shortest exact binary-unit spelling of a size: 536870912 -> "512M"."""
    for unit in ("T", "G", "M", "K"):
        factor = _SIZE_UNITS[unit]
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def load_toml(path: Path) -> Table:
    """Read a TOML file into a root `Table`, turning syntax errors into `RecipeError`."""
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as error:
        raise RecipeError(f"{path}: not valid TOML: {error}") from None
    except OSError as error:
        raise RecipeError(f"{path}: cannot read: {error.strerror}") from None
    return Table(path, "", data)


class Table:
    """One TOML table of a file. Each accessor marks its key as known."""

    def __init__(self, path: Path, name: str, data: dict[str, Any]) -> None:
        self.path = path
        self.name = name
        self._data = data
        self._seen: set[str] = set()

    def _where(self, key: str) -> str:
        table = f"[{self.name}] " if self.name else ""
        return f"{self.path}: {table}{key}"

    def fail(self, key: str, expected: str, got: object = None) -> NoReturn:
        """Raise a `RecipeError` for `key`: what was expected and, when given, what was found."""
        message = f"{self._where(key)}: expected {expected}"
        if got is not None:
            message += f", got {got!r}"
        raise RecipeError(message)

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def _get(self, key: str, required: bool) -> Any:
        self._seen.add(key)
        if key not in self._data:
            if required:
                message = f"{self._where(key)}: missing (this key is required)"
                others = [name for name in self._data if name not in self._seen]
                typo = similar(key, others)
                if typo is not None:
                    message += f"; the table has {typo!r}: a misspelling of {key!r}?"
                raise RecipeError(message)
            return None
        return self._data[key]

    def untyped(self, key: str) -> Any:
        """The value of an optional key whose type the caller checks (it may take several)."""
        return self._get(key, required=False)

    def string(
        self,
        key: str,
        *,
        default: str | None = None,
        pattern: re.Pattern[str] | None = None,
        what: str = "a string",
    ) -> str:
        value = self._get(key, required=default is None)
        if value is None:
            assert default is not None
            return default
        if not isinstance(value, str) or (pattern is not None and not pattern.fullmatch(value)):
            self.fail(key, what, value)
        return value

    def optional_string(self, key: str, *, what: str = "a string") -> str | None:
        value = self._get(key, required=False)
        if value is not None and not isinstance(value, str):
            self.fail(key, what, value)
        return value

    def enum(
        self,
        key: str,
        kind: type[E],
        *,
        default: E | None = None,
        choices: Sequence[E] | None = None,
    ) -> E:
        """A string naming a member of `kind` (or of `choices`, a subset of it)."""
        text = self.string(key, default=None if default is None else default.value)
        return self._member(key, kind, text, choices)

    def optional_enum(self, key: str, kind: type[E], *, absent: Sequence[str] = ()) -> E | None:
        """Like `enum`, but None when the key is missing or spells one of `absent`."""
        text = self.optional_string(key)
        if text is None or text in absent:
            return None
        return self._member(key, kind, text, None, absent)

    def enum_list(self, key: str, kind: type[E], *, default: Sequence[E], what: str) -> list[E]:
        """A list of members of `kind`; an error names the allowed ones as `what` among them."""
        if key not in self._data:
            self._seen.add(key)
            return list(default)
        members = []
        known = sorted(member.value for member in kind)
        for text in self.string_list(key):
            if text not in known:
                self.fail(key, f"{what} among " + ", ".join(known), text)
            members.append(kind(text))
        return members

    def _member(
        self,
        key: str,
        kind: type[E],
        text: str | None,
        choices: Sequence[E] | None,
        extra: Sequence[str] = (),
    ) -> E:
        allowed = [member.value for member in (choices if choices is not None else kind)]
        if text is None or text not in allowed:
            guess = similar(text, allowed) if isinstance(text, str) else None
            if guess is not None:
                raise RecipeError(
                    f"{self._where(key)}: expected {describe_choices([*allowed, *extra])}, "
                    f"got {text!r} (did you mean {guess!r}?)"
                )
            self.fail(key, describe_choices([*allowed, *extra]), text)
        return kind(text)

    def integer(self, key: str, *, default: int | None = None, minimum: int = 0) -> int:
        value = self._get(key, required=default is None)
        if value is None:
            assert default is not None
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(key, f"an integer ≥ {minimum}", value)
        return value

    def boolean(self, key: str, *, default: bool) -> bool:
        value = self._get(key, required=False)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(key, "true or false", value)
        return value

    def size(self, key: str, *, default: int | None = None) -> int:
        value = self._get(key, required=default is None)
        if value is None:
            assert default is not None
            return default
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        if isinstance(value, str):
            try:
                size = parse_size(value)
            except ValueError:
                pass
            else:
                if size > 0:
                    return size
        self.fail(key, 'a size like "512M" (units K, M, G, T are powers of 1024)', value)

    def optional_size(self, key: str) -> int | None:
        self._seen.add(key)
        return self.size(key) if key in self._data else None

    def path_value(self, key: str, *, required: bool = True) -> Path | None:
        """A path, relative to the directory of the file that names it."""
        value = self._get(key, required=required)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            self.fail(key, "a path", value)
        return (self.path.parent / value).resolve()

    def file_list(self, key: str, what: str) -> list[Path]:
        """A list of existing files, each relative to the directory of this file; an error
        names the entry as key[index]."""
        files = []
        for index, value in enumerate(self.string_list(key)):
            path = (self.path.parent / value).resolve()
            if not value or not path.is_file():
                self.fail(f"{key}[{index}]", what, value)
            files.append(path)
        return files

    def string_list(self, key: str) -> list[str]:
        value = self._get(key, required=False)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            self.fail(key, "a list of strings", value)
        return list(value)

    def table(self, key: str, *, required: bool = False) -> Table | None:
        value = self._get(key, required=required)
        if value is None:
            return None
        if not isinstance(value, dict):
            self.fail(key, "a table", value)
        return Table(self.path, f"{self.name}.{key}" if self.name else key, value)

    def subtables(self, key: str) -> Iterator[tuple[str, Table]]:
        """The tables below `[key.*]`, in file order."""
        parent = self.table(key)
        if parent is None:
            return
        for name in list(parent._data):
            child = parent.table(name, required=True)
            assert child is not None
            yield name, child
        parent.check_unknown()

    def array_of_tables(self, key: str) -> Iterator[Table]:
        """The tables of `[[key]]`, in file order."""
        value = self._get(key, required=False)
        if value is None:
            return
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            self.fail(key, "an array of tables ([[" + key + "]])", value)
        prefix = f"{self.name}.{key}" if self.name else key
        for index, item in enumerate(value):
            yield Table(self.path, f"{prefix}#{index + 1}", item)

    def check_unknown(self) -> None:
        """Refuse keys no accessor asked for: they are typos or unsupported settings."""
        unknown = sorted(set(self._data) - self._seen)
        if unknown:
            known = ", ".join(sorted(self._seen)) or "none"
            guess = similar(unknown[0], sorted(self._seen))
            hint = f"did you mean {guess!r}? " if guess is not None else ""
            raise RecipeError(f"{self._where(unknown[0])}: unknown key ({hint}known keys: {known})")


def similar(name: str, candidates: Sequence[str]) -> str | None:
    """The candidate `name` is most likely a misspelling of, if one is close enough."""
    matches = difflib.get_close_matches(name, candidates, n=1, cutoff=0.75)
    return matches[0] if matches else None
