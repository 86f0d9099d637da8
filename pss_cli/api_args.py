"""Argument checks of the library API (pss_cli/api.py, pss_cli/api_check.py): a wrong value is a
UsageError that names the parameter, as on the command line, never a bare ValueError/TypeError.

Torch-free, like the API's module level.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from enum import StrEnum
from typing import TypeVar

from pss_cli.errors import UsageError

E = TypeVar("E", bound=StrEnum)


def option(kind: type[E], value: E | str, name: str) -> E:
    """An enum option from its member or its string (`precision="bf16"`)."""
    if isinstance(value, kind):
        return value
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(member.value for member in kind)
        raise UsageError(f"{name}: {value!r} is not one of {allowed}") from None


def names(value: Iterable[str] | str, name: str) -> tuple[str, ...]:
    """A list-of-strings option (globs, rule ids). A single string is one item: iterating it
    turned `exclude="*wte*"` into five one-character globs that excluded everything."""
    if isinstance(value, str):
        return (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise UsageError(f"{name}: {value!r} is not a list of strings") from None
    bad = [item for item in items if not isinstance(item, str)]
    if bad:
        raise UsageError(f"{name}: {bad[0]!r} is not a string")
    return items


def whole(value: object, name: str) -> int:
    """An integer option (a bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UsageError(f"{name}: {value!r} ({type(value).__name__}) is not an integer")
    return int(value)
