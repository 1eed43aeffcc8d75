"""ASGI app (Starlette): the Open Inference Protocol (KServe v2) REST API plus `/v1/classify`.

Endpoints

    GET  /v2                                    server metadata
    GET  /v2/health/live, /v2/health/ready      200 = true, 503 = false, empty body
    GET  /v2/models/{name}[/versions/1]         model metadata
    GET  /v2/models/{name}[/versions/1]/ready
    POST /v2/models/{name}[/versions/1]/infer   FP32 tensors, JSON or the binary tensor data extension
    POST /v1/classify?top_k=5                   a JPEG/PNG/WebP (multipart field or raw body) -> top-k classes
    GET  /v2/models/{name}[/versions/1]/config  Triton's model configuration (serve.triton)
    GET  /v2/models[/{name}[/versions/1]]/stats  Triton's statistics (serve.triton)
    GET  /metrics                               Prometheus text, or OpenMetrics when the Accept header asks

Torch-free: only numpy, Pillow, OpenVINO (through `Runtime`) and the web stack are imported. The
event loop only routes: body parsing, image decoding and response encoding run in a small thread
pool, inference in the runtime's worker processes via the `DynamicBatcher`. The v2 codec is `serve.v2`,
the middleware (metrics, access log, body limits) `serve.middleware`, and uvicorn's protocol with the
connection guards `serve.http_protocol`.
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import warnings
from collections import deque
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from parnet_cpu import __version__
from parnet_cpu.data.preprocess import (IMAGE_FORMATS, ImageDecodeError, ImageTooLargeError, PreprocessConfig,
                                        PreprocessPlan, load_and_preprocess, max_plan_bytes, plan_image)
from parnet_cpu.data.inputs import MAX_IMAGE_PIXELS
from parnet_cpu.options import check_fields
from parnet_cpu.runtime.classify import check_top_k, softmax_top_k
from parnet_cpu.serve.batcher import BatcherClosedError, DynamicBatcher, QueueFullError
from parnet_cpu.serve import triton
from parnet_cpu.serve.metrics import ServeMetrics
from parnet_cpu.serve.middleware import BodyLimitMiddleware, ObservabilityMiddleware
from parnet_cpu.serve.v2 import (MODEL_VERSION, ApiError, ModelInfo, api_error_response, encode_infer_response,
                                 error_response, parse_infer_request, read_infer_body, require_finite)

__all__ = ["ServeConfig", "check_model_name", "create_app", "decode_image_bytes"]

log = logging.getLogger("parnet_cpu.serve")

ACCEPTED_FORMATS = IMAGE_FORMATS  # the same allow-list as calibration and evaluation
UPLOAD = "<upload>"  # the "path" named in ImageDecodeError for uploaded bytes
CLIENT_CLOSED = 499  # nginx's code for "client closed the request": recorded, never received by anyone
# A name every client can put in /v2/models/{name}/... as it is: one path segment, never a dot segment
# ("." or ".." are removed by URL normalisation), nothing that needs percent-encoding.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_model_name(name: Any) -> str:
    """`name` if the v2 routes can serve it, else ValueError: a name with '/', spaces or '%', an empty one
    or '..' would be announced ready while every model URL answers 404. Used by `ServeConfig` and `--name`."""
    if not isinstance(name, str) or MODEL_NAME.fullmatch(name) is None:
        raise ValueError(f"model name {name!r} cannot be routed as /v2/models/<name>: use 1 to 128 ASCII letters, "
                         "digits, '.', '_' or '-', starting with a letter or digit")
    return name


@dataclass(frozen=True)
class ServeConfig:
    """Everything `parnet-cpu serve` configures; defaults are the CLI's."""

    model: str
    name: str = "parnet"
    cores_per_stream: int | str = "auto"
    cores: str | None = None
    precision: str | None = None
    plan: str = "auto"
    share_cores: bool = False  # run on cores another Runtime holds (warns); default: free cores only
    replicas: int | str = 1  # N single-graph runtimes on disjoint core groups, or "auto" (see serve/replicas.py)
    p99_ms: float | None = None  # latency target for replicas="auto" (default: 1.5x one replica's p50)
    max_batch: int = 8
    max_wait_ms: float = 2.0
    max_queue: int = 256  # images waiting; more -> 503
    inflight: int = 2  # batches inside the runtime at once
    max_body_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = MAX_IMAGE_PIXELS  # decoded size limit for /v1/classify (decompression bombs)
    cpu_threads: int | None = None  # body parsing / image decoding pool; default min(4, usable CPUs)
    retry_after_s: int = 1
    access_log: bool = True
    infer_timeout_s: float = 60.0  # one runtime call; then 504, and the runtime discards the late answer
    body_timeout_s: float = 60.0  # the whole request body must arrive within this (408 otherwise)
    header_timeout_s: float = 10.0  # request line and headers (enforced by the CLI's HTTP protocol)
    max_connections: int = 256  # open connections; requests beyond answer 503 (uvicorn's limit_concurrency)
    health_interval_s: float = 1.0  # how often the runtime's workers are checked (log, metrics, restart)
    max_restarts: int = 3  # times a runtime whose worker died is replaced; then not live (orchestrator restarts)

    def __post_init__(self) -> None:
        check_model_name(self.name)
        check_fields(self)  # every numeric field against its spec in parnet_cpu/options.py


class RuntimeLike(Protocol):
    """What the app needs from `parnet_cpu.runtime.Runtime` (tests substitute a stub)."""

    model_dir: Any
    input_shape: tuple[int, int, int]
    precision: str
    max_batch: int
    inflight: int
    stats: Any

    def submit(self, batch: np.ndarray): ...
    def describe(self) -> dict: ...
    def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------- images

def decode_image_bytes(data: bytes, cfg: PreprocessConfig, max_pixels: int) -> np.ndarray:
    """Uploaded image bytes (IMAGE_FORMATS) -> (1, C, H, W) float32, by `data.decode_image`'s rules (the same
    as for files: EXIF orientation, grey/CMYK/palette/alpha handling, truncation refused) and the model's
    preprocessing; an image over `max_pixels` (or a decompression bomb) is refused with 413."""
    out = np.empty((1, *cfg.output_shape), np.float32)
    try:
        load_and_preprocess(data, cfg, out[0], name=UPLOAD, max_pixels=max_pixels)
    except ImageTooLargeError as exc:
        raise ApiError(413, exc.reason) from None
    return out


def plan_upload(data: bytes, cfg: PreprocessConfig, max_pixels: int) -> PreprocessPlan:
    """The upload's bounded plan from its header alone (`data.plan_image`, nothing decoded): over the limits
    413, not an allowed image 400 (`ImageDecodeError`)."""
    try:
        return plan_image(data, cfg, name=UPLOAD, max_pixels=max_pixels)
    except ImageTooLargeError as exc:
        raise ApiError(413, exc.reason) from None


class DecodeBudget:
    """Bytes of upload decoding in flight at once, by the plans' estimates: an async weighted semaphore, so
    concurrent large-but-allowed uploads queue instead of multiplying memory. A decode that fits in what is
    left goes ahead of larger ones waiting (a 100x100 upload is not held behind four 40 M-pixel ones), but a
    decode that has waited `patience_s` gets a reservation: from then on decodes are granted in arrival
    order until it runs, so a big one is never starved by a stream of small ones. A request larger than the
    whole budget counts as the whole budget (it runs alone)."""

    def __init__(self, capacity: int, patience_s: float = 1.0) -> None:
        self.capacity = max(1, int(capacity))
        self.patience_s = patience_s
        self.used = 0
        self._waiters: deque[tuple[int, asyncio.Future, float]] = deque()  # (bytes, future, since), arrival order
        self._timer: asyncio.TimerHandle | None = None  # wakes the queue when the head's patience runs out

    async def run(self, nbytes: int, pool: Executor, fn: Callable, *args) -> Any:
        """`fn(*args)` in `pool` once `nbytes` fit; they are given back when `fn` returns, not when the
        awaiting request is cancelled (the thread still holds the memory until then)."""
        n = min(max(0, int(nbytes)), self.capacity)
        await self._acquire(n)
        loop = asyncio.get_running_loop()
        try:
            cf = pool.submit(fn, *args)
        except BaseException:
            self._release(n)
            raise
        cf.add_done_callback(lambda _: self._release_from_thread(loop, n))
        return await asyncio.wrap_future(cf)

    def _reserved(self, now: float) -> bool:
        """Whether the longest waiter has waited `patience_s`: then only arrival order counts."""
        return bool(self._waiters) and now - self._waiters[0][2] >= self.patience_s

    async def _acquire(self, n: int) -> None:
        loop = asyncio.get_running_loop()
        if self.used + n <= self.capacity and not self._reserved(loop.time()):
            self.used += n
            return
        fut = loop.create_future()
        self._waiters.append((n, fut, loop.time()))
        if len(self._waiters) == 1:  # the head's reservation must start even if nothing is released meanwhile
            self._arm(loop)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # granted just as the request went away
                self._release(n)
            else:
                self._waiters = deque(w for w in self._waiters if w[1] is not fut)
                self._wake()
            raise

    def _release_from_thread(self, loop: asyncio.AbstractEventLoop, n: int) -> None:
        try:
            loop.call_soon_threadsafe(self._release, n)
        except RuntimeError:  # the loop is closed: the server is gone, nothing waits
            pass

    def _release(self, n: int) -> None:
        self.used -= n
        self._wake()

    def _wake(self) -> None:
        """Grant the waiters that fit: in arrival order, skipping those that do not fit, unless the head has
        a reservation (then stop at the first that does not fit)."""
        while self._waiters and self._waiters[0][1].done():
            self._waiters.popleft()
        if not self._waiters:
            return
        loop = self._waiters[0][1].get_loop()
        strict = self._reserved(loop.time())
        kept: deque[tuple[int, asyncio.Future, float]] = deque()
        for n, fut, since in self._waiters:
            if fut.done():
                continue
            if self.used + n <= self.capacity and (not strict or not kept):
                self.used += n
                fut.set_result(None)
            else:
                kept.append((n, fut, since))
        self._waiters = kept
        if kept and not strict:  # the (new) head's reservation, when its patience runs out
            self._arm(loop)

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_later(max(0.0, self._waiters[0][2] + self.patience_s - loop.time()), self._wake)


# Uploads whose plan holds a buffer larger than this (a 16 MP photo) decode in their own pool, one thread
# fewer than the CPU pool: however many of them arrive, a thread stays free for ordinary uploads and bodies.
LARGE_DECODE_PIXELS = 16_000_000


async def decode_upload(svc: "Service", data: bytes) -> np.ndarray:
    """An upload -> (1, C, H, W) float32: planned from its header first (413/400 before any pixel is
    decoded), then decoded once its estimated bytes fit the server's decode budget (two of the costliest
    decodes `--max-image-pixels` allows): large ones in the large-decode pool, the others in the CPU pool."""
    cfg, limit = svc.model.preprocess, svc.config.max_image_pixels
    plan = await svc.run_cpu(plan_upload, data, cfg, limit)
    large = max(w * h for _, w, h, _ in plan.steps) > LARGE_DECODE_PIXELS
    return await svc.decode_budget.run(plan.bytes, svc.large_pool if large else svc.pool, decode_image_bytes,
                                       data, cfg, limit)


def top_k(model: ModelInfo, logits: np.ndarray, k: int) -> list[dict]:
    """Softmax probabilities of the k best classes (ties: lower index first)."""
    require_finite(logits)
    return softmax_top_k(logits, k, model.class_names)[0].predictions()  # the ranking Runtime.classify gives


# ---------------------------------------------------------------------------------------------- service

class Service:
    """The app's state: runtime, batcher, metrics, CPU pool and precomputed model facts."""

    def __init__(self, config: ServeConfig, runtime: RuntimeLike | None,
                 runtime_factory: Callable[[ServeConfig], RuntimeLike]) -> None:
        self.config = config
        self.runtime = runtime
        self._runtime_factory = runtime_factory
        self.metrics = ServeMetrics(config.max_batch)
        self.model: ModelInfo | None = None
        self.batcher: DynamicBatcher | None = None
        self.pool: ThreadPoolExecutor | None = None
        self.large_pool: ThreadPoolExecutor | None = None  # decodes over LARGE_DECODE_PIXELS
        self.decode_budget: DecodeBudget | None = None
        self.ready = False
        self.broken: str | None = None  # the runtime failed: not live any more, let the orchestrator restart us
        self._stopping = False
        self._watcher: asyncio.Task | None = None
        self.restarts = 0  # runtimes replaced after a worker died

    async def start(self) -> None:
        c = self.config
        if self.runtime is None:
            self.runtime = await asyncio.to_thread(self._runtime_factory, c)
        rt = self.runtime
        self.model = ModelInfo.from_runtime(c.name, rt)
        threads = c.cpu_threads or min(4, len(os.sched_getaffinity(0)))
        # raises ImageTooLargeError when no image fits the limit with this model's resize (checked at start)
        self.decode_budget = DecodeBudget(2 * max_plan_bytes(self.model.preprocess, c.max_image_pixels))
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="parnet-serve")
        self.large_pool = ThreadPoolExecutor(max_workers=max(1, threads - 1), thread_name_prefix="parnet-decode")
        self.batcher = DynamicBatcher(rt.submit, max_batch=min(c.max_batch, rt.max_batch), max_wait_s=c.max_wait_ms / 1e3,
                                      max_queue=c.max_queue, inflight=rt.inflight, on_batch=self.metrics.observe_batch,
                                      on_item=self.metrics.observe_item)
        await self.batcher.start()
        self.metrics.bind_live(self.batcher, lambda: self.runtime.stats.summary(),
                               {"model": c.name, "precision": rt.precision, "version": __version__},
                               healthy=lambda: self.broken is None, restarts=lambda: self.restarts)
        self.ready = True
        self._watcher = asyncio.create_task(self._watch(), name="parnet-health")
        log.info("ready", extra={"model": c.name, "model_dir": str(rt.model_dir.path), "runtime": rt.describe(),
                                 "max_batch": self.batcher.max_batch, "max_wait_ms": c.max_wait_ms,
                                 "max_queue": c.max_queue, "cpu_threads": threads})

    async def stop(self) -> None:
        """Drain: finish what is queued and in flight, then stop the runtime's workers."""
        self.ready = False
        self._stopping = True
        if self._watcher is not None:
            self._watcher.cancel()
        if self.batcher is not None:
            log.info("draining", extra={"queued_images": self.batcher.queued_images,
                                        "batches_in_flight": self.batcher.running_batches})
            await self.batcher.close()
        if self.runtime is not None:
            await asyncio.to_thread(self.runtime.close)
        for pool in (self.pool, self.large_pool):
            if pool is not None:
                pool.shutdown(wait=False)
        log.info("stopped")

    def run_cpu(self, fn: Callable, *args) -> asyncio.Future:
        """CPU-bound work (parsing, decoding, encoding) off the event loop."""
        return asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def failure(self) -> str | None:
        """Why the runtime cannot answer any more (a worker process died), or None. Asks the runtime (one
        non-blocking waitpid per worker), so a health probe sees a death at once; logged once."""
        if self.broken is None and not self._stopping and self.runtime is not None:
            why = getattr(self.runtime, "failure", lambda: None)()
            if why is not None and not self._stopping:
                self.broken = why
                log.error("runtime failed; not ready", extra={"error": why, "will_restart": self.recoverable()})
        return self.broken

    def recoverable(self) -> bool:
        """Whether a failed runtime will be replaced here (else only restarting the process helps)."""
        return self.restarts < self.config.max_restarts

    async def _watch(self) -> None:
        """Notice a dead worker within `health_interval_s` even when neither requests nor probes come, and
        replace the runtime (up to `max_restarts` times)."""
        while not self._stopping:
            await asyncio.sleep(self.config.health_interval_s)
            why = self.failure()
            if why is not None:
                if not self.recoverable():
                    return
                await self._restart(why)

    async def _restart(self, why: str) -> None:
        """Close the broken runtime (its calls fail fast) and start a new one on the same settings; requests
        meanwhile get 503 (not ready), and the batcher then sends batches to the new runtime."""
        self.restarts += 1
        log.warning("restarting the runtime", extra={"cause": why, "restart": self.restarts,
                                                     "max_restarts": self.config.max_restarts})
        await asyncio.to_thread(self.runtime.close)
        try:
            new = await asyncio.to_thread(self._runtime_factory, self.config)
        except Exception as exc:
            self.restarts = self.config.max_restarts  # give up: not live, let the orchestrator restart us
            log.error("runtime restart failed; reporting not live", exc_info=exc)
            return
        if self._stopping:
            await asyncio.to_thread(new.close)
            return
        self.runtime = new
        self.batcher.retarget(new.submit)
        self.broken = None
        log.info("runtime restarted", extra={"restarts": self.restarts, "runtime": new.describe()})

    def admit(self) -> None:
        """Refuse before reading the body when the answer is already known to be 503."""
        if not self.ready or self.batcher.closing:
            raise ApiError(503, "server is not ready (starting or shutting down)", self._retry())
        if self.broken is not None:
            raise ApiError(503, f"the runtime failed: {self.broken}")
        if self.batcher.is_full():
            self.batcher.stats.rejected_requests += 1
            raise ApiError(503, "server overloaded: inference queue is full", self._retry())

    def _retry(self) -> dict[str, str]:
        return {"Retry-After": str(self.config.retry_after_s)}

    async def infer(self, request: Request, images: np.ndarray) -> np.ndarray | None:
        """Logits for `images` through the batcher; None if the client disconnected first."""
        try:
            fut = self.batcher.enqueue(images)
        except QueueFullError as exc:
            raise ApiError(503, f"server overloaded: {exc}", self._retry()) from None
        except BatcherClosedError as exc:
            raise ApiError(503, str(exc), self._retry()) from None
        try:
            return await _unless_disconnected(request, fut)
        except (asyncio.CancelledError, ApiError):
            raise
        except BatcherClosedError as exc:
            raise ApiError(503, str(exc), self._retry()) from None
        except Exception as exc:
            why = self.failure()
            if why is not None:  # a worker died: this replica cannot answer until it is restarted
                raise ApiError(503, f"the runtime failed: {why}") from None
            if isinstance(exc, TimeoutError):  # a stopped or overloaded worker; the runtime stays usable
                log.error("inference timed out", extra={"error": str(exc)})
                raise ApiError(504, f"inference timed out: {exc}") from None
            log.error("inference failed", exc_info=exc)  # e.g. a stage failed: only this batch
            raise ApiError(500, f"inference failed: {type(exc).__name__}") from None


async def _unless_disconnected(request: Request, fut: asyncio.Future) -> np.ndarray | None:
    """Await `fut`, or cancel it (dropping work not yet batched) as soon as the client goes away."""
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({fut, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        fut.cancel()
        raise
    finally:
        watcher.cancel()
    if fut.done():
        return fut.result()
    fut.cancel()
    return None


async def _disconnected(request: Request) -> None:
    """Returns when the server reports `http.disconnect` (the body has been read already)."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # cannot tell: keep waiting for the result instead
        await asyncio.Event().wait()


# ---------------------------------------------------------------------------------------------- handlers

def _svc(request: Request) -> Service:
    return request.app.state.service


def _check_model(svc: Service, request: Request) -> None:
    name = request.path_params["name"]
    version = request.path_params.get("version")
    if name != svc.config.name or (version is not None and version != MODEL_VERSION):
        what = f"{name!r}" + (f" version {version!r}" if version is not None else "")
        raise ApiError(404, f"unknown model {what}; this server serves {svc.config.name!r} version {MODEL_VERSION}")


async def server_metadata(request: Request) -> Response:
    return JSONResponse({"name": "parnet-cpu", "version": __version__,
                         "extensions": ["binary_tensor_data", "classification", "model_configuration",
                                        "statistics"]})


async def live(request: Request) -> Response:
    svc = _svc(request)
    return Response(status_code=503 if svc.failure() and not svc.recoverable() else 200)


async def ready(request: Request) -> Response:
    svc = _svc(request)
    return Response(status_code=200 if svc.ready and not svc.failure() else 503)


async def model_metadata(request: Request) -> Response:
    svc = _svc(request)
    _check_model(svc, request)
    return Response(svc.model.metadata_json, media_type="application/json")


async def model_ready(request: Request) -> Response:
    svc = _svc(request)
    _check_model(svc, request)
    return await ready(request)


async def infer(request: Request) -> Response:
    svc = _svc(request)
    _check_model(svc, request)
    svc.admit()
    body = await read_infer_body(request)
    req = await svc.run_cpu(parse_infer_request, body, request.headers.get("inference-header-content-length"),
                            svc.model, svc.config.max_queue)
    logits = await svc.infer(request, req.images)
    if logits is None:
        return Response(status_code=CLIENT_CLOSED)
    content, headers, media_type = await svc.run_cpu(encode_infer_response, svc.model, req, logits)
    return Response(content, headers=headers, media_type=media_type)


async def classify(request: Request) -> Response:
    svc = _svc(request)
    k = _top_k_param(request, svc.model.num_classes)
    svc.admit()
    data = await _upload_bytes(request)
    images = await decode_upload(svc, data)
    logits = await svc.infer(request, images)
    if logits is None:
        return Response(status_code=CLIENT_CLOSED)
    return JSONResponse({"model": svc.config.name, "predictions": top_k(svc.model, logits[0], k)})


def query_params(request: Request, allowed: frozenset[str]) -> dict[str, str]:
    """The query string, each parameter once and only those the route knows: a misspelt or repeated one
    (`TOP_K=3`, `top_k=5&top_k=7`) is a 400, never silently ignored or resolved by position."""
    items = request.query_params.multi_items()
    unknown = sorted({k for k, _ in items} - allowed)
    if unknown:
        raise ApiError(400, f"unknown query parameter(s) {', '.join(map(repr, unknown))}; this route takes "
                            f"{', '.join(sorted(allowed)) or 'none'}")
    seen = [k for k, _ in items]
    repeated = sorted({k for k in seen if seen.count(k) > 1})
    if repeated:
        raise ApiError(400, f"query parameter(s) {', '.join(map(repr, repeated))} given more than once")
    return dict(items)


def _top_k_param(request: Request, num_classes: int) -> int:
    raw = query_params(request, frozenset({"top_k"})).get("top_k")
    if raw is None:
        return check_top_k(None, num_classes)  # 5, or every class of a model with fewer
    k = int(raw) if raw.isascii() and raw.isdigit() else 0  # int() would also take ' 5' and '5_0'
    if not 1 <= k <= num_classes:
        raise ApiError(400, f"top_k must be an integer in 1..{num_classes}, got {raw!r}")
    return k


async def _upload_bytes(request: Request) -> bytes:
    """The image: the single file of a multipart form (any field name), or the raw body."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        await request.body()  # read through the size limit first; the form parser reuses the cached body
        async with request.form(max_files=1, max_fields=16) as form:
            files = [v for v in form.values() if hasattr(v, "read")]
            if not files:
                raise ApiError(400, "multipart form has no file field (send the image as e.g. 'file')")
            return await files[0].read()
    if ctype and not (ctype.startswith("image/") or ctype == "application/octet-stream"):
        raise ApiError(415, f"send the image as multipart/form-data or as a raw image/* body, not {ctype}")
    return await request.body()


async def metrics(request: Request) -> Response:
    body, content_type = _svc(request).metrics.exposition(request.headers.get("accept"))
    return Response(body, media_type=content_type)


async def _api_error(request: Request, exc: ApiError) -> Response:
    return api_error_response(exc)


async def _client_disconnect(request: Request, exc: ClientDisconnect) -> Response:
    """The client went away while its body was being read: its doing, not a server error. Recorded as 499
    (the metrics and the one access-log line); nobody receives the answer, and nothing else is logged."""
    return Response(status_code=CLIENT_CLOSED)


async def _decode_error(request: Request, exc: ImageDecodeError) -> Response:
    return JSONResponse({"error": f"cannot decode image: {exc.reason}"}, status_code=400)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return error_response(exc.status_code, str(exc.detail), exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error", exc_info=exc)
    return error_response(500, "internal server error")


# ---------------------------------------------------------------------------------------------- factory

def open_runtime(config: ServeConfig) -> RuntimeLike:
    """The default runtime: `parnet_cpu.runtime.Runtime` with the server's settings."""
    from parnet_cpu.runtime.runtime import Runtime

    with warnings.catch_warnings(record=True) as caught:  # (shared cores, unstamped folder): into the JSON log
        warnings.simplefilter("always")
        if config.replicas != 1:
            rt = open_replicas(config)
        else:
            rt = Runtime(config.model, cores_per_stream=config.cores_per_stream, cores=config.cores,
                         precision=config.precision, plan=config.plan, max_batch=config.max_batch,
                         inflight=config.inflight, share=config.share_cores, timeout=config.infer_timeout_s)
    for w in caught:
        log.warning(str(w.message), extra={"category": w.category.__name__})
    try:
        self_test(rt)
        try:  # a limit no image fits with this model's resize would refuse every upload: say so at start
            max_plan_bytes(rt.model_dir.preprocess_config(), config.max_image_pixels)
        except ImageTooLargeError as exc:
            raise ValueError(f"--max-image-pixels {config.max_image_pixels} is too small for {rt.model_dir.path}: "
                             f"{exc.reason}") from None
    except BaseException:
        rt.close()
        raise
    return rt


def open_replicas(config: ServeConfig) -> RuntimeLike:
    """`--replicas N|auto`: single-graph runtimes on disjoint free core groups behind the one batcher."""
    from parnet_cpu.serve.replicas import ReplicaSet, choose_replicas

    kwargs = dict(precision=config.precision, max_batch=config.max_batch, inflight=config.inflight,
                  share=config.share_cores, timeout=config.infer_timeout_s)
    if config.replicas == "auto":
        rs, chosen = choose_replicas(config.model, config.p99_ms, **kwargs)
        if chosen["target_met"]:
            log.info("replicas chosen", extra=chosen)
        else:
            log.warning(chosen["warning"], extra=chosen)
        return rs
    return ReplicaSet(config.model, int(config.replicas), **kwargs)


def self_test(rt: RuntimeLike) -> None:
    """One real inference through the whole model before the server may report ready: a folder that loads
    but cannot answer (wrong input size, wrong class count) fails here, not on every request."""
    from parnet_cpu.artifacts import ModelDirError

    classes = int(rt.model_dir.config["num_classes"])
    try:
        out = np.asarray(rt.infer(np.zeros((1, *rt.input_shape), np.float32)))
    except Exception as exc:
        raise ModelDirError(f"{rt.model_dir.path}: the start-up inference failed: {exc}") from None
    if out.shape != (1, classes):
        raise ModelDirError(f"{rt.model_dir.path}: the start-up inference gave logits of shape {out.shape}, "
                            f"parnet.json promises (1, {classes})")
    if not np.isfinite(out).all():
        raise ModelDirError(f"{rt.model_dir.path}: the start-up inference gave non-finite logits")


def _routes() -> list[Route]:
    routes = [*triton.routes(_check_model),  # first: /v2/models/stats is not a model named "stats"
              Route("/v2", server_metadata), Route("/v2/health/live", live), Route("/v2/health/ready", ready),
              Route("/v1/classify", classify, methods=["POST"]), Route("/metrics", metrics)]
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        routes += [Route(prefix, model_metadata), Route(prefix + "/ready", model_ready),
                   Route(prefix + "/infer", infer, methods=["POST"])]
    return routes


def create_app(config: ServeConfig, runtime: RuntimeLike | None = None,
               runtime_factory: Callable[[ServeConfig], RuntimeLike] = open_runtime) -> Starlette:
    """The ASGI app. The runtime is `runtime` if given, else made by `runtime_factory` at start-up;
    either way the app owns it and closes it after draining at shutdown."""
    service = Service(config, runtime, runtime_factory)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = Starlette(routes=_routes(), lifespan=lifespan,
                    middleware=[Middleware(ObservabilityMiddleware, service=service),
                                Middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes,
                                           timeout_s=config.body_timeout_s)],
                    exception_handlers={ApiError: _api_error, ClientDisconnect: _client_disconnect,
                                        ImageDecodeError: _decode_error,
                                        HTTPException: _http_error, Exception: _internal_error})
    app.state.service = service
    return app
