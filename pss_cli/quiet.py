"""Silencing third-party warnings for a moment without racing other threads.

`warnings.catch_warnings()` and transformers' verbosity are process-wide. Two threads that each
save, change and restore them interleave: one restores the other's change (a filter left
behind for good, transformers stuck at ERROR). `contextlib.redirect_stderr` is worse: it
swallowed other threads' output and sometimes left sys.stderr a StringIO. Every pss section
that quiets a library goes through this one lock, and none redirects the standard streams.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator
from typing import Any

_LOCK = threading.RLock()


def quiet_lock() -> threading.RLock:
    """The lock itself, for a section that sets its own filters inside `catch_warnings`."""
    return _LOCK


@contextlib.contextmanager
def quiet_warnings(*messages: str) -> Iterator[None]:
    """Ignore warnings whose text starts with one of `messages` (all warnings when none)."""
    with _LOCK, warnings.catch_warnings():
        if messages:
            for message in messages:
                warnings.filterwarnings("ignore", message=message)
        else:
            warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def quiet_transformers(transformers: Any) -> Iterator[None]:
    """transformers' own logger at ERROR (its handler writes to the stderr it was created with,
    so only its verbosity silences it), and its warnings ignored, restored on exit."""
    with _LOCK, quiet_warnings():
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            yield
        finally:
            transformers.logging.set_verbosity(verbosity)
