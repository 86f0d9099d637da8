"""One registry of output formats per command: `--format X` picks the command's renderer for X,
and a format the command does not render is a UsageError naming the ones it does (never a
silent fallback to another format)."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import TypeVar

from pss_cli.errors import UsageError

F = TypeVar("F", bound=StrEnum)
R = TypeVar("R")


def renderer_for(command: str, registry: Mapping[F, R], output_format: F) -> R:
    """The renderer `command` registers for `output_format`."""
    try:
        return registry[output_format]
    except KeyError:
        offered = ", ".join(str(key) for key in registry)
        raise UsageError(
            f"`pss {command}` has no output format '{output_format}'",
            f"use --format with one of: {offered}",
        ) from None
