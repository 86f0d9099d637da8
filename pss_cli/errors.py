"""Typed errors. Each carries a one-line message naming the file or tensor, a hint, and the exit
code; they become ``Error: ...`` text in exactly one place (``pss_cli.app``)."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Documented in the README ("Exit codes"); tests keep the two in sync."""

    OK = 0
    FINDINGS = 1  # pss check: findings at or above --fail-on
    USAGE = 2  # bad command line or configuration
    INPUT = 3  # unreadable, missing or corrupt input, or a runtime failure
    BROKEN_PIPE = 141  # stdout's reader went away (`pss ... | head`): 128 + SIGPIPE, as cat's


class PssError(Exception):
    """Base class: ``message`` says what went wrong and where, ``hint`` what to do next."""

    exit_code: ExitCode = ExitCode.INPUT

    def __init__(self, message: str, hint: str | None = None) -> None:
        message = printable(message)
        super().__init__(message)
        self.message = message
        self.hint = None if hint is None else printable(hint)


def printable(text: str) -> str:
    """``text`` with control characters (newlines, ANSI escapes) and lone surrogates escaped.

    Messages quote names taken from the files (tensor names, paths): a hostile header must not
    be able to split an error into several lines, forge an ``Error:`` line or a CI annotation,
    or send escape sequences to the terminal.
    """
    if text.isprintable():
        return text
    return "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape", "backslashreplace").decode("ascii")
        for ch in text
    )


class UsageError(PssError):
    """The command line or configuration is wrong (exit 2)."""

    exit_code = ExitCode.USAGE


class CheckpointError(PssError):
    """The checkpoint cannot be found, read or trusted (exit 3)."""

    exit_code = ExitCode.INPUT


class CheckpointNotFoundError(CheckpointError):
    """The path does not exist or holds no checkpoint."""


class CorruptCheckpointError(CheckpointError):
    """A safetensors file or index is malformed, truncated or inconsistent."""


class ComputeError(PssError):
    """The numerics failed in a way the user cannot fix by changing the input (exit 3)."""

    exit_code = ExitCode.INPUT


def count(n: int, singular: str, plural: str | None = None) -> str:
    """``1 matrix``, ``2 matrices``, ``0 errors``: a number with its noun agreed."""
    return f"{n} {singular if n == 1 else plural or singular + 's'}"


class GuardConfigError(UsageError):
    """`pss_cli.guard.Guard` cannot watch this model/optimizer (raised at construction, exit 2)."""


class GuardTriggered(PssError):
    """A guard rule whose action is `raise` fired: training should stop (and roll back).

    ``layers`` names the parameters involved; ``step`` is the guard step that fired.
    """

    exit_code = ExitCode.INPUT

    def __init__(
        self, message: str, hint: str | None = None, *, step: int = -1, layers: tuple[str, ...] = ()
    ) -> None:
        super().__init__(message, hint)
        self.step = step
        self.layers = layers
