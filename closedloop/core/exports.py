"""A package's public names, imported on first use (PEP 562).

Each package ``__init__`` lists its public names and the module that defines each; the module is
imported when the name is first used, so ``import closedloop`` (and the CLI) stays free of torch
until something needs it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

__all__ = ["make_lazy_exports"]


def make_lazy_exports(package: str, exports: dict[str, str], namespace: dict) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package`` whose public ``exports`` map name → defining module.

    ``namespace``: the package's ``globals()``, where each name is cached after its first use.
    """

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
