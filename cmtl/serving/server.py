"""HTTP service over an :class:`~cmtl.serving.engine.InferenceEngine` (FastAPI + uvicorn).

Requests queue into a micro-batcher: it collects rows from concurrent requests until
``max_batch_size`` rows or ``max_wait_ms`` have passed, runs them as one mixed-task batch
in a worker thread, and hands each request its rows back. A background task polls the
registry and swaps in a new snapshot when it changes (update, rollback, merge). Each
request is answered from the one snapshot that was current when it arrived (a task
removed meanwhile still answers that request); the next request sees the new one.

Endpoints: ``POST /v1/predict``, ``POST /v1/predict/all``, ``GET /v1/tasks``, ``GET /healthz``,
``GET /metrics`` (Prometheus text), and FastAPI's ``/docs`` and ``/openapi.json``.

Limits and errors (every error body is JSON with a ``detail``, and every status is declared in
``/openapi.json``, which the tests check the responses against):

- a body over ``max_body_bytes`` → 413, from the ``Content-Length`` header before any of the
  body is read, or, for a chunked body, as soon as the bytes received pass the limit; the
  connection is then closed rather than drained;
- more than ``max_texts`` texts or a text longer than ``max_chars`` characters → 413 (both
  limits are also in the schema, as ``maxItems`` and ``maxLength``);
- an unknown task or merge → 404 listing what exists;
- a body that is not JSON (or not UTF-8) → 422 or 400; one that lacks fields, has the wrong
  types, or holds a text that is not valid Unicode (a lone surrogate such as ``"\\ud800"``)
  → 422 with ``detail`` a list of ``{loc, msg, type}``;
- anything unexpected → 500 with the error, and the server keeps running.

Hot swap when the registry is broken: if the poller cannot load a changed registry (a
manifest naming a version that does not exist, a missing file, any error), it logs the
error, keeps serving the last snapshot it loaded and tries again at every poll, so a fixed
registry is picked up without a restart. Meanwhile ``GET /healthz`` says so:
``{"status": "degraded", "stale": true, "generation": <served>, "generation_on_disk": <on disk>,
"error": "...", "stale_seconds": ...}``, still with HTTP 200 because every request is still
answered (from the last good snapshot); a 503 would make a load balancer drop every replica
that reads the same registry at once. Alert on ``status != "ok"`` or on the
``cmtl_registry_stale`` gauge.

``/metrics`` labels requests by route template (``/v1/predict``), with one ``unmatched``
label for every path the app does not serve, so random URLs cannot grow it.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations at runtime,
# and the request models are classes local to create_app (they carry its limits).
import asyncio
import contextlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cmtl.data import as_texts
from cmtl.errors import DataError, TaskNotFoundError
from cmtl.registry import store
from cmtl.serving.engine import InferenceEngine, Snapshot

logger = logging.getLogger(__name__)


@dataclass(kw_only=True, frozen=True)
class ServeConfig:
    """Limits and batching of the HTTP service.

    Args:
        max_texts: Texts per request; more → HTTP 413.
        max_chars: Characters per text; longer → HTTP 413 (the tokenizer would cut the
            text at the backbone's ``max_length`` tokens anyway; the limit bounds work).
        max_body_bytes: Bytes of a request body; more → HTTP 413 before the body is read
            (``Content-Length``) or as soon as a chunked body passes it. The default, 16 MiB,
            holds ``max_texts`` × ``max_chars`` characters of 3-byte UTF-8 (CJK) at the
            default limits.
        max_batch_size: Rows per batch, at most.
        max_batch_tokens: Padded tokens (rows × longest row) per backbone forward, at most.
        max_wait_ms: How long the batcher waits for more rows before running a batch.
        poll_seconds: How often the registry is checked for changes (hot swap), and how
            often a registry that failed to load is tried again.
    """

    max_texts: int = 256
    max_chars: int = 20_000
    max_body_bytes: int = 16 * 1024 * 1024
    max_batch_size: int = 64
    max_batch_tokens: int = 4096
    max_wait_ms: float = 5.0
    poll_seconds: float = 1.0

    def __post_init__(self) -> None:
        for key in ("max_texts", "max_chars", "max_body_bytes", "max_batch_size", "max_batch_tokens"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ServeConfig.{key} must be a positive integer. Got {value!r}.")
        for key in ("max_wait_ms", "poll_seconds"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"ServeConfig.{key} must be >= 0. Got {getattr(self, key)!r}.")


# --- request and response bodies (what /openapi.json declares) ----------------------------


def _request_models(config: ServeConfig, tasks: list[str]) -> tuple[type[BaseModel], type[BaseModel]]:
    """The two request bodies, with this app's limits (and, as examples, the tasks served at start) in
    their schema.

    ``maxItems``/``maxLength`` are declared, not validated by pydantic: going over them is a
    413 with the limit named (see ``check_limits`` in :func:`create_app`), not a 422. An
    unknown field is a 422 naming it (``additionalProperties: false``): a typo such as
    ``"merg"`` would otherwise be answered through another route.
    """
    limits = {"maxItems": config.max_texts, "items": {"type": "string", "maxLength": config.max_chars}}

    def valid_unicode(texts: list[str]) -> list[str]:
        return as_texts(texts)  # DataError (a ValueError) → 422: a lone surrogate cannot be tokenized

    class PredictRequest(BaseModel):
        """Body of ``POST /v1/predict``."""

        model_config = ConfigDict(extra="forbid")

        task: str = Field(description="Task name, see GET /v1/tasks.", examples=tasks[:3] or None)
        texts: list[str] = Field(min_length=1, json_schema_extra=limits,
                                 description=f"Texts to classify (at most {config.max_texts}, each at most "
                                             f"{config.max_chars} characters).")
        merge: str | None = Field(default=None, description="Serve the task through this merged entry.")
        _unicode = field_validator("texts")(valid_unicode)

    class PredictAllRequest(BaseModel):
        """Body of ``POST /v1/predict/all``."""

        model_config = ConfigDict(extra="forbid")

        texts: list[str] = Field(min_length=1, json_schema_extra=limits,
                                 description=f"Texts to classify with every task (at most {config.max_texts}, "
                                             f"each at most {config.max_chars} characters).")
        _unicode = field_validator("texts")(valid_unicode)

    return PredictRequest, PredictAllRequest


class Health(BaseModel):
    """Body of ``GET /healthz``."""

    status: Literal["ok", "degraded"] = Field(
        description="'degraded' while the registry's newest state cannot be loaded (see error).")
    generation: int | None = Field(description="The registry generation being served.")
    tasks: int = Field(description="Tasks served.")
    stale: bool = Field(description="Whether the registry on disk changed but could not be loaded.")
    generation_on_disk: Any = Field(default=None, description="When stale: the generation in registry.json.")
    error: str | None = Field(default=None, description="When stale: why the newest state could not be loaded.")
    stale_seconds: float | None = Field(default=None, description="When stale: seconds since the first failure.")


class ErrorResponse(BaseModel):
    """An error: what was wrong and how to fix it."""

    detail: str


class TaskNotFoundResponse(BaseModel):
    """An unknown task or merged entry, with what the registry serves."""

    detail: str
    tasks: list[str]
    merges: dict[str, list[str]]


class ValidationIssue(BaseModel):
    """One reason a request body was refused: where (``["body", "texts", 3]``), what, and its kind."""

    loc: list[str | int]
    msg: str
    type: str
    ctx: dict[str, Any] | None = None


class ValidationErrorResponse(BaseModel):
    """A request body that does not fit the schema."""

    detail: list[ValidationIssue]


_BAD_BODY = {
    400: {"model": ErrorResponse, "description": "The body could not be read as JSON text."},
    413: {"model": ErrorResponse, "description": "Body, number of texts or a text over the limits."},
    422: {"model": ValidationErrorResponse, "description": "A body that does not fit the schema."},
}


# --- metrics ------------------------------------------------------------------------------


class _Metrics:
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


class _Observe:
    """ASGI middleware: count and time each request under its route template (``/v1/predict``), not
    its raw path, so that the number of series is bounded by the app's routes."""

    def __init__(self, app, *, metrics: _Metrics, routes) -> None:
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


class _BodyLimit:
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
        body = _json_bytes({"detail": f"{what}; the limit is {self.limit} bytes. Send fewer or shorter texts "
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


def _json_bytes(content: Any) -> bytes:
    """JSON in ASCII: a lone surrogate anywhere in a body is written as a ``\\ud800`` escape instead of
    failing to encode as UTF-8 (which would turn any answer into a 500)."""
    return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def _json_response_class():
    from fastapi.responses import JSONResponse

    class JSON(JSONResponse):
        def render(self, content: Any) -> bytes:
            return _json_bytes(content)

    return JSON


# --- batching -----------------------------------------------------------------------------


@dataclass
class _Job:
    snapshot: Snapshot  # the registry state the request is answered from, taken when it arrived
    tasks: list[str]
    texts: list[str]
    merges: list[str | None]
    future: asyncio.Future


class _Batcher:
    """Collects rows of concurrent requests into batches and runs them one at a time in a thread."""

    def __init__(self, engine: InferenceEngine, config: ServeConfig, metrics: _Metrics):
        self.engine, self.config, self.metrics = engine, config, metrics
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()

    async def submit(self, snapshot: Snapshot, tasks: list[str], texts: list[str], merges: list[str | None]
                     ) -> list[dict[str, Any]]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Job(snapshot, tasks, texts, merges, future))
        return await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            rows = len(jobs[0].texts)
            deadline = loop.time() + self.config.max_wait_ms / 1000
            while rows < self.config.max_batch_size:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self.queue.get(), timeout)
                except asyncio.TimeoutError:
                    break
                jobs.append(job)
                rows += len(job.texts)
            await loop.run_in_executor(None, self._run, jobs)

    def _run(self, jobs: list[_Job]) -> None:
        """One mixed batch per snapshot (jobs that arrived across a hot swap form two)."""
        by_snapshot: dict[int, list[_Job]] = {}
        for job in jobs:
            by_snapshot.setdefault(id(job.snapshot), []).append(job)
        for group in by_snapshot.values():
            self._run_group(group)

    def _run_group(self, jobs: list[_Job]) -> None:
        """One mixed batch for jobs on one snapshot; if it fails, each job alone (isolates a bad one)."""
        snapshot = jobs[0].snapshot
        try:
            flat = self.engine.predict([t for j in jobs for t in j.tasks], [x for j in jobs for x in j.texts],
                                       merges=[m for j in jobs for m in j.merges], snapshot=snapshot)
            self.metrics.batch_rows.observe(len(flat))
            start = 0
            for job in jobs:
                self._resolve(job, flat[start:start + len(job.texts)])
                start += len(job.texts)
        except Exception:  # noqa: BLE001 - isolate the failing request; the others must not fail with it
            for job in jobs:
                try:
                    out = self.engine.predict(job.tasks, job.texts, merges=job.merges, snapshot=snapshot)
                    self.metrics.batch_rows.observe(len(out))
                    self._resolve(job, out)
                except Exception as exc:  # noqa: BLE001
                    job.future.get_loop().call_soon_threadsafe(_set_exception, job.future, exc)

    @staticmethod
    def _resolve(job: _Job, result: list[dict[str, Any]]) -> None:
        job.future.get_loop().call_soon_threadsafe(_set_result, job.future, result)


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(_future_safe(exc))


def _future_safe(exc: BaseException) -> BaseException:
    """``exc``, or a RuntimeError wrapping it if asyncio refuses it (StopIteration cannot be set on a Future)."""
    if isinstance(exc, (StopIteration, StopAsyncIteration)):
        wrapped = RuntimeError(f"{type(exc).__name__}: {exc}")
        wrapped.__cause__ = exc
        return wrapped
    return exc


# --- hot swap -----------------------------------------------------------------------------


@dataclass
class _Stale:
    """Why the served snapshot is older than the registry on disk."""

    error: str
    generation_on_disk: Any
    since: float  # time.monotonic() of the first failure in a row


class _Poller:
    """Reloads the registry when it changes; on any error keeps the last good snapshot and retries."""

    def __init__(self, engine: InferenceEngine, config: ServeConfig, metrics: _Metrics):
        self.engine, self.config, self.metrics = engine, config, metrics
        self.stale: _Stale | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.config.poll_seconds)
            # The outcome comes back as a value, never raised: an exception such as StopIteration
            # cannot be set on an asyncio Future, and the await would then never return.
            outcome = await loop.run_in_executor(None, self._refresh)
            self._record(outcome)

    def _refresh(self) -> bool | Exception:
        try:
            return self.engine.refresh()
        except Exception as exc:  # noqa: BLE001 - any bad registry state: keep serving, retry next poll
            return exc

    def _record(self, outcome: bool | Exception) -> None:
        if not isinstance(outcome, Exception):
            if self.stale is not None:
                logger.info("The registry loads again: serving generation %s.", self.engine.snapshot.generation)
            self.stale = None
            self.metrics.stale.set(0)
            if outcome:
                self.metrics.swaps.inc()
            return
        error = _public_error(outcome, self.engine.root)
        on_disk = _disk_generation(self.engine.root)
        self.metrics.refresh_errors.inc()
        self.metrics.stale.set(1)
        if self.stale is None or self.stale.error != error:
            logger.error("Could not load registry %s (generation on disk %r): %s. Still serving generation %s; "
                         "trying again every %.3g s.", self.engine.root, on_disk, error,
                         self.engine.snapshot.generation, self.config.poll_seconds, exc_info=outcome)
            since = self.stale.since if self.stale is not None else time.monotonic()
        else:
            logger.debug("Registry still fails to load: %s", error)
            since = self.stale.since
        self.stale = _Stale(error, on_disk, since)

    def health(self) -> dict[str, Any]:
        snapshot = self.engine.snapshot
        out = {"status": "ok", "generation": snapshot.generation, "tasks": len(snapshot.tasks), "stale": False}
        if self.stale is not None:
            out.update(status="degraded", stale=True, generation_on_disk=self.stale.generation_on_disk,
                       error=self.stale.error, stale_seconds=round(time.monotonic() - self.stale.since, 3))
        return out


def _public_error(exc: Exception, root: Path) -> str:
    """``exc`` as one line for /healthz, without the registry's location on this machine."""
    text = f"{type(exc).__name__}: {exc}"
    for where in {str(root.resolve()), str(root)}:
        text = text.replace(where, "<registry>")
    return text[:1000]


def _disk_generation(root: Path) -> Any:
    """The manifest's generation as written, read without validating anything else (None if unreadable)."""
    try:
        manifest = json.loads((root / store.MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest.get("generation") if isinstance(manifest, dict) else None


# --- the app ------------------------------------------------------------------------------


def create_app(registry: str | Path | InferenceEngine, config: ServeConfig | None = None, *, device: str = "auto"):
    """The FastAPI app serving ``registry`` (a folder, or an engine already built on one)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import PlainTextResponse

    config = config or ServeConfig()
    engine = registry if isinstance(registry, InferenceEngine) else InferenceEngine(
        registry, device=device, max_batch_size=config.max_batch_size, max_batch_tokens=config.max_batch_tokens)
    metrics = _Metrics()
    poller = _Poller(engine, config, metrics)
    state: dict[str, Any] = {}
    PredictRequest, PredictAllRequest = _request_models(config, engine.snapshot.tasks)
    JSON = _json_response_class()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher = _Batcher(engine, config, metrics)
        state["batcher"] = batcher
        tasks = [asyncio.create_task(batcher.run()), asyncio.create_task(poller.run())]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()

    app = FastAPI(title="cmtl", description="Multi-task text classification from a cmtl registry.",
                  lifespan=lifespan, default_response_class=JSON,
                  responses={500: {"model": ErrorResponse, "description": "An unexpected error (logged)."}})
    app.add_middleware(_BodyLimit, limit=config.max_body_bytes)
    app.add_middleware(_Observe, metrics=metrics, routes=lambda: app.router.routes)

    def check_limits(texts: list[str]) -> None:
        if len(texts) > config.max_texts:
            raise _TooLarge(f"{len(texts)} texts in one request; the limit is {config.max_texts}. "
                            "Split the request.")
        long = [i for i, t in enumerate(texts) if len(t) > config.max_chars]
        if long:
            raise _TooLarge(f"Texts {long[:10]} are longer than {config.max_chars} characters. Shorten them.")

    @app.exception_handler(_TooLarge)
    async def too_large(request: Request, exc: _TooLarge):
        return JSON(status_code=413, content={"detail": str(exc)})

    @app.exception_handler(TaskNotFoundError)
    async def not_found(request: Request, exc: TaskNotFoundError):
        snapshot = getattr(request.state, "snapshot", None) or engine.snapshot  # the one the request used
        return JSON(status_code=404, content={"detail": str(exc), "tasks": snapshot.tasks, "merges": snapshot.merges})

    @app.exception_handler(DataError)
    async def bad_data(request: Request, exc: DataError):
        return JSON(status_code=422, content={"detail": [{"loc": ["body"], "msg": str(exc), "type": "data_error"}]})

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return JSON(status_code=422, content={"detail": [_issue(e) for e in exc.errors()]})

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        logger.exception("Unexpected error on %s", request.url.path)
        return JSON(status_code=500, content={"detail": f"{type(exc).__name__}: {exc}"})

    @app.post("/v1/predict", responses={404: {"model": TaskNotFoundResponse, "description": "Unknown task or merge."},
                                        **_BAD_BODY})
    async def predict(body: PredictRequest, request: Request) -> dict[str, Any]:
        """Labels and probabilities of one task for each text."""
        check_limits(body.texts)
        snapshot = request.state.snapshot = engine.snapshot  # one snapshot answers the whole request
        snapshot.route(body.task, body.merge)  # 404 before queueing
        n = len(body.texts)
        rows = await state["batcher"].submit(snapshot, [body.task] * n, body.texts, [body.merge] * n)
        metrics.texts.labels(body.task).inc(n)
        return {"task": body.task, "merge": body.merge, "version": rows[0].get("version"), "predictions": rows}

    @app.post("/v1/predict/all", responses=_BAD_BODY)
    async def predict_all(body: PredictAllRequest, request: Request) -> dict[str, Any]:
        """Every task's prediction for each text (tasks on single texts)."""
        check_limits(body.texts)
        snapshot = request.state.snapshot = engine.snapshot  # one snapshot answers the whole request
        tasks = [t for t in snapshot.tasks if snapshot.route(t).spec.text_pair_column is None]
        n = len(body.texts)
        rows = await state["batcher"].submit(snapshot, [t for t in tasks for _ in body.texts],
                                             body.texts * len(tasks), [None] * (n * len(tasks)))
        for task in tasks:
            metrics.texts.labels(task).inc(n)
        return {"results": {t: rows[i * n:(i + 1) * n] for i, t in enumerate(tasks)}}

    @app.get("/v1/tasks")
    async def tasks() -> dict[str, Any]:
        """Served tasks (labels, current version) and merged entries."""
        snapshot = engine.snapshot
        return {
            "generation": snapshot.generation,
            "tasks": [{"name": t, "labels": list(snapshot.route(t).spec.labels),
                       "problem_type": snapshot.route(t).spec.problem_type, "version": snapshot.route(t).version}
                      for t in snapshot.tasks],
            "merges": snapshot.merges,
        }

    @app.get("/healthz", response_model=Health)
    async def healthz() -> dict[str, Any]:
        """Whether the newest registry state is served; 'degraded' (still HTTP 200, still answering from the
        last good snapshot) while a changed registry cannot be loaded."""
        return poller.health()

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.state.engine, app.state.config = engine, config
    return app


class _TooLarge(Exception):
    pass


def _issue(error: dict[str, Any]) -> dict[str, Any]:
    """One pydantic error as the schema's ValidationIssue: ``loc`` a list, ``ctx`` JSON values; the
    rejected ``input`` is not echoed (it may be large, or not encodable)."""
    out = {"loc": [p if isinstance(p, (str, int)) else str(p) for p in error.get("loc", ())],
           "msg": str(error.get("msg", "")), "type": str(error.get("type", ""))}
    if isinstance(error.get("ctx"), dict):
        out["ctx"] = {str(k): v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
                      for k, v in error["ctx"].items()}
    return out


def serve(registry: str | Path, *, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None,
          device: str = "auto") -> None:
    """Run the service until interrupted (``port=0``: any free port).

    Raises:
        ValueError: a port outside 0..65535 (before the registry is loaded).
    """
    import uvicorn

    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an integer in 0..65535 (0 picks a free port). Got {port!r}.")
    app = create_app(registry, config, device=device)
    logger.info("Serving %s on http://%s:%d with %s", registry, host, port, asdict(config or ServeConfig()))
    uvicorn.run(app, host=host, port=port, log_level="info")
