"""Generic JSON conversion of the frozen model (recipes, layouts, plans).

`to_jsonable` and `from_jsonable` walk dataclass fields by their type hints, so a field added
to `Recipe` or `Layout` is covered without touching this module; the round-trip test
(`from_jsonable(Recipe, to_jsonable(recipe)) == recipe`) proves the model holds everything a
build uses and that nothing in it is a loose dict.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
import uuid
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

T = TypeVar("T")


def to_jsonable(value: object) -> Any:
    """Dataclasses become dicts, enums their values, paths and UUIDs strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            field.name: to_jsonable(getattr(value, field.name))
            for field in dataclasses.fields(value)
        }
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path | uuid.UUID):
        return str(value)
    if isinstance(value, tuple | list):
        return [to_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(to_jsonable(key)): to_jsonable(item) for key, item in value.items()}
    return value


def from_jsonable(cls: type[T], data: Any) -> T:
    """Rebuild an instance of the dataclass `cls` from `to_jsonable` output."""
    return typing.cast(T, _convert(cls, data))


def _convert(hint: Any, data: Any) -> Any:
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in get_args(hint) if arg is not type(None)]
        if data is None:
            return None
        if len(options) != 1:
            raise TypeError(f"cannot rebuild a value of type {hint}")
        return _convert(options[0], data)
    if origin is tuple:
        args = get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], item) for item in data)
        return tuple(_convert(arg, item) for arg, item in zip(args, data, strict=True))
    if origin is list:
        return [_convert(get_args(hint)[0], item) for item in data]
    if origin is dict:
        key_type, value_type = get_args(hint)
        return {_convert(key_type, key): _convert(value_type, item) for key, item in data.items()}
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        hints = get_type_hints(hint)
        fields = {f.name: _convert(hints[f.name], data[f.name]) for f in dataclasses.fields(hint)}
        return hint(**fields)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return hint(data)
    if hint is Path:
        return Path(data)
    if hint is uuid.UUID:
        return uuid.UUID(data)
    if hint in (int, str, bool, float):
        if not isinstance(data, hint):
            raise TypeError(f"expected {hint.__name__}, got {data!r}")
        return data
    raise TypeError(f"cannot rebuild a value of type {hint}")
