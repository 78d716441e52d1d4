"""``twotower serve``: the recommendation pipeline behind a FastAPI app, run by uvicorn.

Routes:

* ``POST /recommend`` - a :class:`~twotower.pipeline.RecommendRequest`; answers ids, scores and item
  metadata. Bad JSON, wrong types, unknown fields and an out-of-range ``k`` are 422 with the reason;
  an unknown user id takes the cold-start path (never a 5xx).
* ``GET /healthz`` - liveness plus what is loaded (model, items, ranker, index backend).
* ``GET /metrics`` - Prometheus text format: requests by route and status, a latency histogram,
  model reloads.
* ``POST /admin/reload`` - load a run or export (by default the one being served, e.g. re-exported)
  and swap it in. The new model is loaded while the old one keeps answering; the swap is a single
  reference assignment, and every request reads that reference once, so no request is dropped or
  sees half of each model.

The model loads once, at start-up. Torch and FAISS run ``threads`` threads (default 1): a request is
too small for intra-op parallelism to pay, and spare cores are better spent on more processes
(``workers``). The hot route, ``POST /recommend``, is answered by the outermost middleware (one
pydantic-core call parses and validates the body); FastAPI still declares it, for the OpenAPI spec.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from twotower import __version__
from twotower.export import resolve_export
from twotower.index import IndexConfig
from twotower.pipeline import Pipeline, RecommendRequest, RecommendResponse, RequestError, load_pipeline
from twotower.storage import read_json, write_json

__all__ = ["ModelHolder", "ReloadRequest", "create_app", "load_pipeline", "serve"]

log = logging.getLogger("twotower")
_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class ModelHolder:
    """The pipeline being served and where it came from; ``swap`` replaces both at once."""

    def __init__(self, source: Path, pipeline: Pipeline) -> None:
        self.source, self.pipeline = source, pipeline
        self.generation = 0  # of the control file (multi-worker serving) last followed
        self._reload_lock = threading.Lock()  # one reload at a time; requests never take it

    def swap(
        self,
        source: Path,
        retrieve_n: int | None,
        index: IndexConfig | None,
        light_n: int,
        follow: int | None = None,
        publish: Callable[[], None] | None = None,
    ) -> Pipeline | None:
        """Load ``source`` and serve it (the old pipeline serves meanwhile). ``follow``: the control
        file's generation of another worker's reload; skipped (None) if this worker took a newer one
        while waiting for the lock, and taken even if loading fails (no retry every poll). ``publish``
        (an own reload) takes a generation and tells the others, under the same lock."""
        with self._reload_lock:
            if follow is not None:
                if follow <= self.generation:
                    return None
                self.generation = follow
            fresh = load_pipeline(source, retrieve_n, index, light_n)
            self.source, self.pipeline = source, fresh
            if publish is not None:
                publish()
            return fresh


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(None, description="run or export directory; default: the one being served")


def create_app(
    source: str | Path,
    retrieve_n: int | None = None,
    index: IndexConfig | None = None,
    allow_reload: bool = True,
    pipeline: Pipeline | None = None,
    control: str | Path | None = None,
    light_n: int = 100,
) -> FastAPI:
    """The service for a run or export directory (or an already loaded ``pipeline``).

    ``control``: the directory that worker processes of one server share (see :func:`serve`); a swap
    in any worker is written there and every other worker follows within a second.
    """
    source = Path(source)
    control_file = None if control is None else Path(control) / "model.json"
    generation = 0
    if control_file is not None and control_file.exists():  # a worker (re)started after a swap
        state = read_json(control_file)
        source, generation = Path(state["path"]), state["generation"]
    holder = ModelHolder(source, pipeline or load_pipeline(source, retrieve_n, index, light_n))
    holder.generation = generation
    # Several worker processes share their metrics through prometheus_client's multiprocess files.
    shared = "PROMETHEUS_MULTIPROC_DIR" in os.environ
    registry = None if shared else CollectorRegistry()
    requests = Counter(
        "twotower_requests", "HTTP requests by route and status", ["route", "status"], registry=registry
    )
    latency = Histogram(
        "twotower_request_latency_seconds", "request latency", ["route"], buckets=_BUCKETS, registry=registry
    )
    reloads = Counter("twotower_model_reloads", "successful model swaps", registry=registry)

    async def follow() -> None:
        """Swap in what another worker swapped in (polls the shared control file)."""
        assert control_file is not None
        while True:
            await asyncio.sleep(0.5)
            try:
                state = read_json(control_file)
            except (FileNotFoundError, ValueError):
                continue
            if state["generation"] > holder.generation:
                try:
                    swapped = await run_in_threadpool(
                        holder.swap, Path(state["path"]), retrieve_n, index, light_n, state["generation"]
                    )
                    if swapped is not None:
                        reloads.inc()
                except Exception as exc:  # keep serving the model we have, and keep following
                    log.error("could not follow the swap to %s: %s", state["path"], exc)

    @asynccontextmanager
    async def lifespan(_: FastAPI):  # type: ignore[no-untyped-def]
        task = asyncio.create_task(follow()) if control_file is not None else None
        yield
        if task is not None:
            task.cancel()

    app = FastAPI(
        title="twotower",
        version=__version__,
        description="Two-tower retrieval + debiased ranking",
        lifespan=lifespan,
    )
    app.state.holder = holder

    async def measure(scope, receive, send, inner):  # type: ignore[no-untyped-def]
        """Count and time every HTTP request (a plain ASGI wrapper: Starlette's BaseHTTPMiddleware
        costs about a millisecond a request)."""
        start, status = time.perf_counter(), 500

        async def send_status(message):  # type: ignore[no-untyped-def]
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await inner(scope, receive, send_status)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", "unmatched")
            requests.labels(name, str(status)).inc()
            latency.labels(name).observe(time.perf_counter() - start)

    async def recommend_fast(scope, receive, send, routed) -> None:  # type: ignore[no-untyped-def]
        """POST /recommend without FastAPI's per-request machinery (a dozen ASGI layers, JSON decoded
        by the stdlib then validated field by field): pydantic-core parses and validates the raw body
        in one call. Only well-formed requests are answered here: anything else (another content
        type, a body that does not validate, a request the model refuses) goes to the declared route
        (``routed``), so errors are FastAPI's, byte for byte, and the OpenAPI spec describes them."""
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        content_type = dict(scope["headers"]).get(b"content-type", b"")
        if content_type.split(b";")[0].strip().lower() == b"application/json":
            try:
                request = RecommendRequest.model_validate_json(body)
                current = holder.pipeline  # read once: a concurrent swap cannot split this request
                payload = current.recommend(request).model_dump_json().encode()
            except (ValidationError, RequestError):
                pass
            else:
                headers = [(b"content-type", b"application/json"),
                           (b"content-length", str(len(payload)).encode())]  # fmt: skip
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                await send({"type": "http.response.body", "body": payload})
                return
        replayed = False

        async def replay():  # type: ignore[no-untyped-def]
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # e.g. the client's disconnect

        await routed(scope, replay, send)

    app.add_middleware(_Measure, measure=measure, fast={("POST", "/recommend"): recommend_fast})

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default answer echoes the offending input, which may be a float JSON cannot
        # encode (Python's parser accepts Infinity): that would turn a 422 into a 500.
        return JSONResponse(status_code=422, content={"detail": _errors(exc.errors())})

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": str(exc)})

    @app.post("/recommend", response_model=RecommendResponse)
    async def recommend(body: RecommendRequest) -> Response:
        # Run on the event loop, not a worker thread: a request is ~1 ms of mostly Python work that
        # holds the GIL, so threads add switching and contention without adding parallelism.
        current = holder.pipeline  # read once: a concurrent swap cannot split this request
        answer = current.recommend(body)
        # Serialised by pydantic-core directly: returning the model would make FastAPI validate it
        # again and encode it field by field (about a third of a request's time).
        return Response(answer.model_dump_json(), media_type="application/json")

    @app.get("/healthz")
    def healthz() -> dict:
        current = holder.pipeline  # read once: a concurrent swap cannot mix two models' facts
        exported = current.exported
        return {
            "status": "ok",
            "model": current.model_id,
            "items": int(len(exported.item_ids)),
            "users": int(len(exported.user_ids)),
            "index": exported.manifest["index"]["backend"],
            "ranker": exported.ranker is not None,
            "similarity": exported.similarity,
        }

    @app.get("/metrics")
    def metrics() -> Response:
        if registry is not None:
            return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
        merged = CollectorRegistry()  # every worker's counts, summed
        multiprocess.MultiProcessCollector(merged)
        return Response(generate_latest(merged), media_type=CONTENT_TYPE_LATEST)

    if allow_reload:

        @app.post("/admin/reload")
        async def reload(body: ReloadRequest | None = None) -> dict:
            target = Path(body.path) if body is not None and body.path else holder.source
            start = time.perf_counter()

            def publish() -> None:  # tell the other workers (under the swap's lock: see ModelHolder.swap)
                assert control_file is not None
                holder.generation = max(time.time_ns(), holder.generation + 1)
                write_json(control_file, {"generation": holder.generation, "path": str(target)})

            try:
                fresh = await run_in_threadpool(
                    holder.swap, target, retrieve_n, index, light_n, None, publish if control_file else None
                )
            except Exception as exc:  # a missing or broken run or export: the old model keeps serving
                reason = str(exc) if isinstance(exc, OSError | ValueError) else f"{type(exc).__name__}: {exc}"
                return JSONResponse(status_code=409, content={"detail": f"not swapped: {reason}"})  # type: ignore[return-value]
            assert fresh is not None  # only a followed swap is ever skipped
            reloads.inc()
            log.warning("swapped in %s", fresh.model_id)
            return {"model": fresh.model_id, "seconds": round(time.perf_counter() - start, 3)}

    return app


def _errors(errors: list, prefix: tuple = ()) -> list[dict]:
    """Validation errors without the echoed input (it may be a float JSON cannot encode)."""
    return [
        {"loc": [*prefix, *e.get("loc", ())], "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in errors
    ]


class _Measure:
    """ASGI middleware: ``measure(scope, receive, send, inner)`` around every HTTP request, with the
    routes in ``fast`` ((method, path) -> handler(scope, receive, send, routed_app)) answered here
    first; a handler passes what it does not answer on to the router."""

    def __init__(self, app, measure, fast=None) -> None:  # type: ignore[no-untyped-def]
        self.app, self.measure, self.fast = app, measure, fast or {}

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        handler = self.fast.get((scope["method"], scope["path"]))
        if handler is None:
            await self.measure(scope, receive, send, self.app)
            return
        scope["route"] = _FastRoute(scope["path"])  # named in the metrics like a routed request

        async def fast(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
            await handler(scope, receive, send, self.app)

        await self.measure(scope, receive, send, fast)


class _FastRoute:
    def __init__(self, path: str) -> None:
        self.path = path


_SETTINGS = "TWOTOWER_SERVE_SETTINGS"


def serve(
    source: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    retrieve_n: int | None = None,
    index: IndexConfig | None = None,
    threads: int = 1,
    allow_reload: bool = True,
    log_level: str = "warning",
    workers: int = 1,
    light_n: int = 100,
) -> None:
    """Load the model once per worker process and serve it until interrupted.

    With ``workers > 1`` uvicorn runs that many processes on one port (the GIL makes one process
    use one core); they share a control directory so that a swap reaches all of them, and their
    Prometheus metrics are summed.
    """
    import uvicorn

    # Export once, here, rather than racing to export in every worker. The source stays what was
    # given: a reload without a path then re-checks a run directory and exports it again if its
    # weights or ranker changed since (a new `train-ranker`), instead of reloading the old export.
    resolve_export(source, index)
    settings = {
        "source": str(source),
        "retrieve_n": retrieve_n,
        "light_n": light_n,
        "threads": threads,
        "index": None if index is None else index.model_dump(),
        "allow_reload": allow_reload,
    }
    if workers == 1:
        uvicorn.run(_app_from(settings), host=host, port=port, log_level=log_level, access_log=False)
        return
    control = Path(tempfile.mkdtemp(prefix="twotower-serve-"))
    try:
        (control / "metrics").mkdir()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(control / "metrics")
        os.environ[_SETTINGS] = json.dumps({**settings, "control": str(control)})
        uvicorn.run("twotower.serve:worker_app", factory=True, workers=workers, host=host, port=port,
                    log_level=log_level, access_log=False)  # fmt: skip
    finally:
        shutil.rmtree(control, ignore_errors=True)


def worker_app() -> FastAPI:
    """The app of one worker process (uvicorn calls this factory in each)."""
    return _app_from(json.loads(os.environ[_SETTINGS]))


def _app_from(settings: dict) -> FastAPI:
    torch.set_num_threads(settings["threads"])
    try:  # FAISS's OpenMP team would spin against torch's on a small machine
        import faiss

        faiss.omp_set_num_threads(settings["threads"])
    except ImportError:  # pragma: no cover - the exact backend needs no faiss
        pass
    index = None if settings["index"] is None else IndexConfig.model_validate(settings["index"])
    app = create_app(settings["source"], settings["retrieve_n"], index, settings["allow_reload"],
                     light_n=settings["light_n"],
                     control=settings.get("control"))  # fmt: skip
    # The loaded model is millions of long-lived objects (id maps, metadata): move them out of the
    # garbage collector's sight, or every full collection walks them all in the middle of a request.
    gc.collect()
    gc.freeze()
    return app
