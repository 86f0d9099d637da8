"""pss: diagnose and repair singular weight spectra in neural-network checkpoints.

The library API (docs/API.md): `scan`, `smooth`, `check`, `trend` (pss_cli.api) and the
in-training `Guard` / `GuardConfig` (pss_cli.guard).

Importing this package must stay cheap: it never imports torch (``pss --help`` relies on it).
The API names are resolved on first use (module `__getattr__`), and torch is imported only when
a function runs.
"""

from __future__ import annotations

import sys
from importlib import import_module
from types import ModuleType
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_LAZY = {
    "scan": "pss_cli.api",
    "smooth": "pss_cli.api",
    "check": "pss_cli.api",
    "trend": "pss_cli.api",
    "Guard": "pss_cli.guard",
    "GuardConfig": "pss_cli.guard",
}

__all__ = ["Guard", "GuardConfig", "__version__", "check", "scan", "smooth", "trend"]

if TYPE_CHECKING:
    from pss_cli.api import check, scan, smooth, trend
    from pss_cli.guard import Guard, GuardConfig


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pss_cli' has no attribute '{name}'")
    value = getattr(import_module(module), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


class _Package(ModuleType):
    """`pss_cli.trend` is the API function although a subpackage pss_cli/trend/ exists: importing
    a submodule binds it on its parent, which must not shadow the function (the subpackage stays
    reachable as `sys.modules["pss_cli.trend"]` and through `from pss_cli.trend import ...`)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
