"""HTTP service over an :class:`~cmtl.engine.InferenceEngine` (FastAPI + uvicorn).

Requests queue into a micro-batcher: it collects rows from concurrent requests until
``max_batch_size`` rows or ``max_wait_ms`` have passed, runs them as one mixed-task batch
in a worker thread, and hands each request its rows back. A background task polls the
registry and swaps in a new snapshot when it changes (update, rollback, merge): requests
already in a batch finish on the old one, later ones get the new version.

Endpoints: ``POST /v1/predict``, ``POST /v1/predict/all``, ``GET /v1/tasks``, ``GET /healthz``,
``GET /metrics`` (Prometheus text), and FastAPI's ``/docs`` and ``/openapi.json``.

Limits and errors: more than ``max_texts`` texts or a text longer than ``max_chars``
characters → 413; an unknown task or merge → 404 listing what exists; a body that is not
valid JSON or lacks fields → 422. Anything unexpected → 500 with the error, and the server
keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from cmtl.engine import InferenceEngine
from cmtl.errors import DataError, TaskNotFoundError

logger = logging.getLogger(__name__)


class PredictRequest(BaseModel):
    """Body of ``POST /v1/predict``."""

    task: str = Field(description="Task name, see GET /v1/tasks.")
    texts: list[str] = Field(min_length=1, description="Texts to classify (at most ServeConfig.max_texts).")
    merge: str | None = Field(default=None, description="Serve the task through this merged entry.")


class PredictAllRequest(BaseModel):
    """Body of ``POST /v1/predict/all``."""

    texts: list[str] = Field(min_length=1, description="Texts to classify with every task.")


@dataclass(kw_only=True, frozen=True)
class ServeConfig:
    """Limits and batching of the HTTP service.

    Args:
        max_texts: Texts per request; more → HTTP 413.
        max_chars: Characters per text; longer → HTTP 413 (the tokenizer would cut the
            text at the backbone's ``max_length`` tokens anyway; the limit bounds work).
        max_batch_size: Rows per batch, at most.
        max_batch_tokens: Padded tokens (rows × longest row) per backbone forward, at most.
        max_wait_ms: How long the batcher waits for more rows before running a batch.
        poll_seconds: How often the registry is checked for changes (hot swap).
    """

    max_texts: int = 256
    max_chars: int = 20_000
    max_batch_size: int = 64
    max_batch_tokens: int = 4096
    max_wait_ms: float = 5.0
    poll_seconds: float = 1.0

    def __post_init__(self) -> None:
        for key in ("max_texts", "max_chars", "max_batch_size", "max_batch_tokens"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ServeConfig.{key} must be a positive integer. Got {value!r}.")
        for key in ("max_wait_ms", "poll_seconds"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"ServeConfig.{key} must be >= 0. Got {getattr(self, key)!r}.")


class _Metrics:
    """Prometheus metrics of one app, in their own registry (several apps may share a process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("cmtl_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("cmtl_request_seconds", "Request latency in seconds", ["endpoint"],
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                                 registry=self.registry)
        self.batch_rows = Histogram("cmtl_batch_rows", "Rows per backbone batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.texts = Counter("cmtl_task_texts", "Texts predicted per task", ["task"], registry=self.registry)
        self.swaps = Counter("cmtl_registry_swaps", "Registry snapshots swapped in", registry=self.registry)


@dataclass
class _Job:
    tasks: list[str]
    texts: list[str]
    merges: list[str | None]
    future: asyncio.Future


class _Batcher:
    """Collects rows of concurrent requests into batches and runs them one at a time in a thread."""

    def __init__(self, engine: InferenceEngine, config: ServeConfig, metrics: _Metrics):
        self.engine, self.config, self.metrics = engine, config, metrics
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()

    async def submit(self, tasks: list[str], texts: list[str], merges: list[str | None]) -> list[dict[str, Any]]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Job(tasks, texts, merges, future))
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
        """One mixed batch for all jobs; if it fails (say a task vanished in a swap), each job alone."""
        try:
            flat = self.engine.predict([t for j in jobs for t in j.tasks], [x for j in jobs for x in j.texts],
                                       merges=[m for j in jobs for m in j.merges])
            self.metrics.batch_rows.observe(len(flat))
            start = 0
            for job in jobs:
                self._resolve(job, flat[start:start + len(job.texts)])
                start += len(job.texts)
        except Exception:  # noqa: BLE001 - isolate the failing request; the others must not fail with it
            for job in jobs:
                try:
                    out = self.engine.predict(job.tasks, job.texts, merges=job.merges)
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
        future.set_exception(exc)


def create_app(registry: str | Path | InferenceEngine, config: ServeConfig | None = None, *, device: str = "auto"):
    """The FastAPI app serving ``registry`` (a folder, or an engine already built on one)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse

    config = config or ServeConfig()
    engine = registry if isinstance(registry, InferenceEngine) else InferenceEngine(
        registry, device=device, max_batch_size=config.max_batch_size, max_batch_tokens=config.max_batch_tokens)
    metrics = _Metrics()
    state: dict[str, Any] = {}

    async def poll() -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(config.poll_seconds)
            try:
                if await loop.run_in_executor(None, engine.refresh):
                    metrics.swaps.inc()
            except Exception:  # noqa: BLE001 - a half-written change: keep serving, retry next poll
                logger.exception("Could not load the registry's new state; still serving the old one.")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher = _Batcher(engine, config, metrics)
        state["batcher"] = batcher
        tasks = [asyncio.create_task(batcher.run()), asyncio.create_task(poll())]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()

    app = FastAPI(title="cmtl", description="Multi-task text classification from a cmtl registry.",
                  lifespan=lifespan)

    def check_limits(texts: list[str]) -> None:
        if len(texts) > config.max_texts:
            raise _TooLarge(f"{len(texts)} texts in one request; the limit is {config.max_texts}. "
                            "Split the request.")
        long = [i for i, t in enumerate(texts) if len(t) > config.max_chars]
        if long:
            raise _TooLarge(f"Texts {long[:10]} are longer than {config.max_chars} characters. Shorten them.")

    @app.middleware("http")
    async def observe(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        endpoint = request.url.path
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    @app.exception_handler(_TooLarge)
    async def too_large(request: Request, exc: _TooLarge):
        return JSONResponse(status_code=413, content={"detail": str(exc)})

    @app.exception_handler(TaskNotFoundError)
    async def not_found(request: Request, exc: TaskNotFoundError):
        snapshot = engine.snapshot
        return JSONResponse(status_code=404, content={"detail": str(exc), "tasks": snapshot.tasks,
                                                      "merges": snapshot.merges})

    @app.exception_handler(DataError)
    async def bad_data(request: Request, exc: DataError):
        return JSONResponse(status_code=422, content={"detail": str(exc)})

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return JSONResponse(status_code=422, content={"detail": _jsonable(exc.errors())})

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        logger.exception("Unexpected error on %s", request.url.path)
        return JSONResponse(status_code=500, content={"detail": f"{type(exc).__name__}: {exc}"})

    @app.post("/v1/predict")
    async def predict(body: PredictRequest) -> dict[str, Any]:
        """Labels and probabilities of one task for each text."""
        check_limits(body.texts)
        engine.snapshot.route(body.task, body.merge)  # 404 before queueing
        n = len(body.texts)
        rows = await state["batcher"].submit([body.task] * n, body.texts, [body.merge] * n)
        metrics.texts.labels(body.task).inc(n)
        return {"task": body.task, "merge": body.merge, "version": rows[0].get("version"), "predictions": rows}

    @app.post("/v1/predict/all")
    async def predict_all(body: PredictAllRequest) -> dict[str, Any]:
        """Every task's prediction for each text (tasks on single texts)."""
        check_limits(body.texts)
        snapshot = engine.snapshot
        tasks = [t for t in snapshot.tasks if snapshot.route(t).spec.text_pair_column is None]
        n = len(body.texts)
        rows = await state["batcher"].submit([t for t in tasks for _ in body.texts], body.texts * len(tasks),
                                             [None] * (n * len(tasks)))
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

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        snapshot = engine.snapshot
        return {"status": "ok", "generation": snapshot.generation, "tasks": len(snapshot.tasks)}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.state.engine, app.state.config = engine, config
    return app


class _TooLarge(Exception):
    pass


def _jsonable(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: (v if isinstance(v, (str, int, float, list, type(None))) else str(v)) for k, v in e.items()}
            for e in errors]


def serve(registry: str | Path, *, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None,
          device: str = "auto") -> None:
    """Run the service until interrupted."""
    import uvicorn

    app = create_app(registry, config, device=device)
    logger.info("Serving %s on http://%s:%d with %s", registry, host, port, asdict(config or ServeConfig()))
    uvicorn.run(app, host=host, port=port, log_level="info")
