"""HTTP service over an :class:`~cmtl.serving.engine.InferenceEngine` (FastAPI + uvicorn).

Requests queue into a micro-batcher: it collects rows from concurrent requests until
``max_batch_size`` rows or ``max_wait_ms`` have passed, runs them as one mixed-task batch
in a worker thread, and hands each request its rows back. A background task polls the
registry and swaps in a new snapshot when it changes (update, rollback, merge). Each
request is answered from the one snapshot that was current when it arrived (a task
removed meanwhile still answers that request); the next request sees the new one.

Endpoints: ``POST /v1/predict``, ``POST /v1/predict/all``, ``GET /v1/tasks``, ``GET /healthz``,
``GET /metrics`` (Prometheus text), and FastAPI's ``/openapi.json``, ``/docs`` and ``/redoc`` (their
scripts and styles served by the app itself, from the ``fastapi-offline`` package: no CDN).

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
# and the request models are built per app (they carry its limits; schemas.request_models).
# The bodies and error models live in schemas.py, the ASGI middlewares and metrics in middleware.py.
import asyncio
import contextlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from cmtl._config import plain_numbers
from cmtl._extras import require
from cmtl.errors import DataError, InvalidParameterError, TaskNotFoundError, bad_param
from cmtl.registry import store
from cmtl.serving.engine import InferenceEngine, Snapshot
from cmtl.serving.middleware import BodyLimit, Metrics, Observe, json_response_class
from cmtl.serving.schemas import (
    BAD_BODY,
    ErrorResponse,
    Health,
    TaskNotFoundResponse,
    TooLarge,
    request_models,
    validation_issue,
)

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
        plain_numbers(self)
        for key in ("max_texts", "max_chars", "max_body_bytes", "max_batch_size", "max_batch_tokens"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidParameterError(bad_param(key, "ServeConfig", "be a positive integer", value))
        for key in ("max_wait_ms", "poll_seconds"):  # inf would hold a short batch (or the hot swap) forever
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise InvalidParameterError(bad_param(key, "ServeConfig", "be a finite number >= 0", value))


# --- batching -----------------------------------------------------------------------------


@dataclass
class _Job:
    snapshot: Snapshot  # the registry state the request is answered from, taken when it arrived
    tasks: list[str]
    texts: list[str]
    merges: list[str | None]
    pairs: list[str | None]  # a row's second text, for tasks on text pairs
    future: asyncio.Future


class _Batcher:
    """Collects rows of concurrent requests into batches and runs them one at a time in a thread."""

    def __init__(self, engine: InferenceEngine, config: ServeConfig, metrics: Metrics):
        self.engine, self.config, self.metrics = engine, config, metrics
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()

    async def submit(self, snapshot: Snapshot, tasks: list[str], texts: list[str], merges: list[str | None],
                     pairs: list[str | None] | None = None) -> list[dict[str, Any]]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Job(snapshot, tasks, texts, merges, pairs or [None] * len(texts), future))
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
                                       merges=[m for j in jobs for m in j.merges],
                                       pairs=[p for j in jobs for p in j.pairs], snapshot=snapshot)
            self.metrics.batch_rows.observe(len(flat))
            start = 0
            for job in jobs:
                self._resolve(job, flat[start:start + len(job.texts)])
                start += len(job.texts)
        except Exception:  # noqa: BLE001 - isolate the failing request; the others must not fail with it
            for job in jobs:
                try:
                    out = self.engine.predict(job.tasks, job.texts, merges=job.merges, pairs=job.pairs,
                                              snapshot=snapshot)
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

    def __init__(self, engine: InferenceEngine, config: ServeConfig, metrics: Metrics):
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


def _same_device(asked: str, held: torch.device) -> bool:
    """Whether ``asked`` names ``held`` ("cuda" names any CUDA device, "cuda:N" the N-th)."""
    try:
        want = torch.device(asked)
    except (RuntimeError, TypeError):
        return False
    return want.type == held.type and (want.index is None or held.index is None or want.index == held.index)


def create_app(registry: str | Path | InferenceEngine, config: ServeConfig | None = None, *, device: str = "auto"):
    """The FastAPI app serving ``registry`` (a folder, or an engine already built on one: the app then batches
    by the engine's ``max_batch_size`` and ``max_batch_tokens``, and ``config`` may leave them out or repeat
    them; ``device`` is the engine's, so it may only be ``"auto"`` or name that device)."""
    require("fastapi", "fastapi_offline", "prometheus_client", purpose="Serving")
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import PlainTextResponse
    from fastapi_offline import FastAPIOffline

    config = config or ServeConfig()
    if isinstance(registry, InferenceEngine):  # it chunks every forward by its own limits: the app's are its
        engine, limits = registry, ("max_batch_size", "max_batch_tokens")
        for key in limits:
            asked, own = getattr(config, key), getattr(engine, key)
            if asked != own and asked != getattr(ServeConfig, key):  # set to another value than the engine's
                raise InvalidParameterError(bad_param(
                    key, "ServeConfig", f"be left out or be the InferenceEngine's own ({own}) when create_app is "
                    "given an engine, which batches by its limits", asked,
                    f"Build the engine with {key}={asked}, or pass the registry folder instead."))
        config = replace(config, **{key: getattr(engine, key) for key in limits})
        held = engine.backbone.device
        if device != "auto" and not _same_device(device, held):  # the backbone cannot move under the engine
            raise InvalidParameterError(bad_param(
                "device", "create_app", f"be 'auto' or the engine's own ({str(held)!r}) when create_app is given "
                "an engine, which holds the backbone on its device", device,
                f"Build the engine with device={device!r}, or pass the registry folder instead."))
    else:
        engine = InferenceEngine(registry, device=device, max_batch_size=config.max_batch_size,
                                 max_batch_tokens=config.max_batch_tokens)
    metrics = Metrics()
    poller = _Poller(engine, config, metrics)
    state: dict[str, Any] = {}
    PredictRequest, PredictAllRequest = request_models(config, engine.snapshot.tasks)
    JSON = json_response_class()

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

    # /docs and /redoc with their scripts and styles served by the app (static/), not from a CDN:
    # a server without network access still shows its documentation.
    app = FastAPIOffline(title="cmtl", description="Multi-task text classification from a cmtl registry.",
                         lifespan=lifespan, default_response_class=JSON,
                         responses={500: {"model": ErrorResponse, "description": "An unexpected error (logged)."}})
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    app.add_middleware(Observe, metrics=metrics, routes=lambda: app.router.routes)

    def check_limits(texts: list[str]) -> None:
        if len(texts) > config.max_texts:
            raise TooLarge(f"{len(texts)} texts in one request; the limit is {config.max_texts}. "
                            "Split the request.")
        long = [i for i, t in enumerate(texts) if len(t) > config.max_chars]
        if long:
            raise TooLarge(f"Texts {long[:10]} are longer than {config.max_chars} characters. Shorten them.")

    @app.exception_handler(TooLarge)
    async def too_large(request: Request, exc: TooLarge):
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
        return JSON(status_code=422, content={"detail": [validation_issue(e) for e in exc.errors()]})

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        logger.exception("Unexpected error on %s", request.url.path)
        return JSON(status_code=500, content={"detail": f"{type(exc).__name__}: {exc}"})

    @app.post("/v1/predict", responses={404: {"model": TaskNotFoundResponse, "description": "Unknown task or merge."},
                                        **BAD_BODY})
    async def predict(body: PredictRequest, request: Request) -> dict[str, Any]:
        """Labels and probabilities of one task for each text (or text pair)."""
        check_limits(body.texts)
        check_limits(body.text_pairs or [])
        snapshot = request.state.snapshot = engine.snapshot  # one snapshot answers the whole request
        paired = snapshot.route(body.task, body.merge).spec.text_pair_column is not None  # 404 before queueing
        n = len(body.texts)
        if paired != (body.text_pairs is not None) or (paired and len(body.text_pairs) != n):
            raise DataError(f"Task {body.task!r} takes text pairs: send text_pairs, one per text ({n})." if paired
                            else f"Task {body.task!r} takes single texts: leave text_pairs out.")
        rows = await state["batcher"].submit(snapshot, [body.task] * n, body.texts, [body.merge] * n, body.text_pairs)
        metrics.texts.labels(body.task).inc(n)
        return {"task": body.task, "merge": body.merge, "version": rows[0].get("version"), "predictions": rows}

    @app.post("/v1/predict/all", responses=BAD_BODY)
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
        """Served tasks (labels, current version, a multi-label task's threshold) and merged entries."""
        snapshot = engine.snapshot
        specs = {t: snapshot.route(t).spec for t in snapshot.tasks}
        return {
            "generation": snapshot.generation,
            "tasks": [{"name": t, "labels": list(spec.labels), "problem_type": spec.problem_type,
                       "version": snapshot.route(t).version, "text_pair": spec.text_pair_column is not None,
                       "threshold": spec.threshold if spec.problem_type == "multi_label" else None}
                      for t, spec in specs.items()],
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


def serve(registry: str | Path, *, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None,
          device: str = "auto") -> None:
    """Run the service until interrupted (``port=0``: any free port).

    Raises:
        ValueError: a port outside 0..65535 (before the registry is loaded).
    """
    uvicorn, = require("uvicorn", purpose="Serving")

    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an integer in 0..65535 (0 picks a free port). Got {port!r}.")
    app = create_app(registry, config, device=device)
    logger.info("Serving %s on http://%s:%d with %s", registry, host, port, asdict(config or ServeConfig()))
    uvicorn.run(app, host=host, port=port, log_level="info")
