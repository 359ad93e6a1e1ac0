"""Lazy package attributes (PEP 562): a package names what it exports and where each lives, and
imports a module only when one of its names is first used. This keeps ``import cmtl`` and the CLI's
manifest-only commands (``ls``, ``versions``, ``rollback``) free of torch, transformers and datasets."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def exports(package: str, where: dict[str, str], namespace: dict[str, Any]) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package``, whose public names ``where`` maps to their modules.

    A name is imported on first access and then stored in ``namespace`` (the package's globals), so
    later lookups do not come back here.
    """

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name]), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(where))

    return __getattr__, __dir__
