"""Serving: the mixed-task inference engine and the HTTP server around it."""

from cmtl.serving.engine import InferenceEngine, Snapshot
from cmtl.serving.server import ServeConfig, create_app, serve

__all__ = ["InferenceEngine", "ServeConfig", "Snapshot", "create_app", "serve"]
