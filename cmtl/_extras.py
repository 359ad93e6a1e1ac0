"""Optional dependencies: the extra of cmtl that brings each, and the error when one is missing.

The core install (``pip install cmtl``) trains, stores, merges, predicts and monitors. Serving, the
benchmarks' heat maps and the Avalanche bridge need more (``pyproject.toml`` lists the extras);
their entry points call :func:`require` first, so a missing package is named with the command that
installs it, before any work starts.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from cmtl.errors import MissingExtraError

#: Extra of cmtl that installs each optional top-level module.
EXTRAS = {
    "fastapi": "serve",
    "fastapi_offline": "serve",
    "uvicorn": "serve",
    "prometheus_client": "serve",
    "pydantic": "serve",
    "matplotlib": "bench",
    "avalanche": "avalanche",
    "torchvision": "avalanche",
}


def require(*modules: str, purpose: str) -> list[ModuleType]:
    """Import ``modules`` (top-level names of :data:`EXTRAS`) for ``purpose``, or raise
    :class:`~cmtl.errors.MissingExtraError` naming the extra to install."""
    out = []
    for name in modules:
        try:
            out.append(importlib.import_module(name))
        except ImportError as error:
            extra = EXTRAS[name]
            raise MissingExtraError(f"{purpose} needs the package {name!r}, which cmtl's core install leaves out. "
                                    f"Install the extra: pip install 'cmtl[{extra}]'.") from error
    return out
