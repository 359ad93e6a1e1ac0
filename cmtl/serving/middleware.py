"""ASGI middlewares of the service (request metrics by route, body-size limit), the Prometheus
metrics they and the batcher record, and the JSON encoding of every answer."""

import json
import time
from typing import Any


class Metrics:
    """Prometheus metrics of one app, in their own registry (several apps may share a process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("cmtl_requests", "HTTP requests by route template and status code",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("cmtl_request_seconds", "Request latency in seconds by route template",
                                 ["endpoint"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                                 registry=self.registry)
        self.batch_rows = Histogram("cmtl_batch_rows", "Rows per backbone batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.texts = Counter("cmtl_task_texts", "Texts predicted per task", ["task"], registry=self.registry)
        self.swaps = Counter("cmtl_registry_swaps", "Registry snapshots swapped in", registry=self.registry)
        self.refresh_errors = Counter("cmtl_registry_refresh_errors", "Polls that failed to load the registry",
                                      registry=self.registry)
        self.stale = Gauge("cmtl_registry_stale", "1 while the registry on disk cannot be loaded (serving the "
                           "last good snapshot), else 0", registry=self.registry)


UNMATCHED = "unmatched"  # the metrics label of every path the app does not serve


class Observe:
    """ASGI middleware: count and time each request under its route template (``/v1/predict``), not
    its raw path, so that the number of series is bounded by the app's routes."""

    def __init__(self, app, *, metrics: Metrics, routes) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    def template(self, scope) -> str:
        from starlette.routing import Match

        partial = None
        for route in self.routes():
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return route.path
            if match is Match.PARTIAL and partial is None:  # right path, other method: a 405
                partial = route.path
        return partial or UNMATCHED

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), "499"  # no response at all: the client went away (nginx's 499)

        async def observed_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        except Exception:
            status = "500"  # ServerErrorMiddleware, outside this one, answers it
            raise
        finally:
            endpoint = self.template(scope)
            self.metrics.requests.labels(endpoint, status).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)


class BodyLimit:
    """ASGI middleware: refuse a request body over ``limit`` bytes with 413 before the app sees it.

    A ``Content-Length`` over the limit is refused before any of the body is read. Otherwise
    (chunked bodies included) the body is read while counting, and refused as soon as the
    count passes the limit; at most ``limit`` bytes are ever held. A refusal closes the
    connection (``Connection: close``), so the server does not drain the rest.
    """

    def __init__(self, app, *, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            await self.refuse(send, f"The request body is {declared} bytes (Content-Length)")
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: nobody to answer
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self.refuse(send, f"The request body passed {self.limit} bytes while being read")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    async def refuse(self, send, what: str) -> None:
        body = json_bytes({"detail": f"{what}; the limit is {self.limit} bytes. Send fewer or shorter texts "
                                      "per request (or raise ServeConfig.max_body_bytes)."})
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def json_bytes(content: Any) -> bytes:
    """JSON in ASCII: a lone surrogate anywhere in a body is written as a ``\\ud800`` escape instead of
    failing to encode as UTF-8 (which would turn any answer into a 500)."""
    return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def json_response_class():
    from fastapi.responses import JSONResponse

    class JSON(JSONResponse):
        def render(self, content: Any) -> bytes:
            return json_bytes(content)

    return JSON
