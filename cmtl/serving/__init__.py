"""Serving: the mixed-task inference engine and the HTTP server around it.

The engine needs only the core install; the server (``ServeConfig``, ``create_app``, ``serve``) needs
the ``serve`` extra and is imported when first asked for.
"""

from typing import Any

from cmtl.serving.engine import InferenceEngine, Snapshot

__all__ = ["InferenceEngine", "ServeConfig", "Snapshot", "create_app", "serve"]

_SERVER = ("ServeConfig", "create_app", "serve")


def __getattr__(name: str) -> Any:
    if name in _SERVER:
        from cmtl._extras import require

        require("fastapi", "fastapi_offline", "pydantic", "prometheus_client", "uvicorn", purpose="Serving")
        from cmtl.serving import server

        return getattr(server, name)
    raise AttributeError(f"module 'cmtl.serving' has no attribute {name!r}")
