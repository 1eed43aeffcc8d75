"""ASGI app (Starlette): the Open Inference Protocol (KServe v2) REST API plus `/v1/classify`.

Endpoints

    GET  /v2                                    server metadata
    GET  /v2/health/live, /v2/health/ready      200 = true, 503 = false, empty body
    GET  /v2/models/{name}[/versions/1]         model metadata
    GET  /v2/models/{name}[/versions/1]/ready
    POST /v2/models/{name}[/versions/1]/infer   FP32 tensors, JSON or the binary tensor data extension
    POST /v1/classify?top_k=5                   a JPEG/PNG/WebP (multipart field or raw body) -> top-k classes
    GET  /metrics                               Prometheus

Torch-free: only numpy, Pillow, OpenVINO (through `Runtime`) and the web stack are imported. The
event loop only routes: body parsing, image decoding and response encoding run in a small thread
pool, inference in the runtime's worker processes via the `DynamicBatcher`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import time
import warnings
from collections import deque
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Callable, Protocol

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from parnet_cpu import __version__
from parnet_cpu.artifacts import INPUT_NAME, OUTPUT_NAME
from parnet_cpu.data.preprocess import (IMAGE_FORMATS, ImageDecodeError, ImageTooLargeError, PreprocessConfig,
                                        PreprocessPlan, load_and_preprocess, max_plan_bytes, plan_image)
from parnet_cpu.data.inputs import MAX_IMAGE_PIXELS
from parnet_cpu.options import check_fields
from parnet_cpu.runtime.classify import softmax_top_k
from parnet_cpu.serve.batcher import BatcherClosedError, DynamicBatcher, QueueFullError
from parnet_cpu.serve.metrics import CONTENT_TYPE_LATEST, ServeMetrics

__all__ = ["ApiError", "ServeConfig", "check_model_name", "create_app", "decode_image_bytes", "error_response",
           "json_tensor"]

log = logging.getLogger("parnet_cpu.serve")

ACCEPTED_FORMATS = IMAGE_FORMATS  # the same allow-list as calibration and evaluation
UPLOAD = "<upload>"  # the "path" named in ImageDecodeError for uploaded bytes
MODEL_VERSION = "1"
PLATFORM = "openvino_ir"
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


class ApiError(Exception):
    """An error answered as `{"error": message}` with an HTTP status (4xx: the client's; 5xx: ours)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class BodyTooLarge(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than the server's limit of {limit} bytes")


# ---------------------------------------------------------------------------------------------- model facts

@dataclass(frozen=True)
class ModelInfo:
    """Facts about the served model, computed once at start-up (nothing of this on the hot path)."""

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    precision: str
    class_names: tuple[str, ...] | None
    preprocess: PreprocessConfig
    metadata_json: bytes = field(repr=False, default=b"")

    @classmethod
    def from_runtime(cls, name: str, runtime: RuntimeLike) -> "ModelInfo":
        md = runtime.model_dir
        num_classes = int(md.config["num_classes"])
        names = md.class_names
        if names is not None and len(names) != num_classes:
            names = None  # a mismatched list would mislabel every answer
        meta = {"name": name, "versions": [MODEL_VERSION], "platform": PLATFORM,
                "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, *runtime.input_shape]}],
                "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, num_classes]}],
                "parameters": {"preprocessing": preprocessing_metadata(md.preprocess_config())}}
        return cls(name, tuple(runtime.input_shape), num_classes, runtime.precision, names, md.preprocess_config(),
                   json.dumps(meta).encode())


def preprocessing_metadata(cfg: PreprocessConfig) -> dict:
    """What a client must do to an image before sending tensors (so it need not read parnet.json)."""
    return {"color": "RGB" if cfg.channels == 3 else "L", "resize_shorter_side": cfg.resize_size,
            "interpolation": cfg.interpolation, "center_crop": cfg.input_size, "scale": "pixel / 255",
            "mean": list(cfg.mean), "std": list(cfg.std), "layout": "NCHW", "datatype": "FP32"}


# ---------------------------------------------------------------------------------------------- v2 tensors

@dataclass(frozen=True)
class InferRequest:
    images: np.ndarray  # (N, C, H, W) float32, C-contiguous
    id: str | None
    binary_output: bool


def parse_infer_request(body: bytes, header_length: str | None, model: ModelInfo, max_images: int) -> InferRequest:
    """A v2 inference request (JSON, or JSON + binary tensor data) -> validated FP32 images. 400 otherwise."""
    head, binary = _split_binary(body, header_length)
    req = _loads(head)
    if not isinstance(req, dict):
        raise ApiError(400, "request body must be a JSON object")
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ApiError(400, f"'inputs' must be a list with exactly one tensor, '{INPUT_NAME}'")
    images = _input_tensor(inputs[0], binary, model, max_images)
    req_id = req.get("id")
    if req_id is not None and not isinstance(req_id, str):
        raise ApiError(400, "'id' must be a string")
    return InferRequest(images, req_id, _binary_output(req))


def _not_a_number(constant: str) -> Any:
    """`json.loads` hook for NaN, Infinity and -Infinity: Python accepts them, JSON has no such numbers."""
    raise ApiError(400, f"request body is not valid JSON: {constant} is not a JSON number")


def _loads(text: bytes) -> Any:
    try:
        return json.loads(text, parse_constant=_not_a_number)
    except RecursionError:  # the client's nesting, not our failure
        raise ApiError(400, "request body is not valid JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None


# Refusing an oversized body before reading it: the declared shape bounds what the body may hold.
BOUND_PREFIX = 64 * 1024  # the tensor's "shape" is looked for in this much of a JSON body
JSON_BYTES_PER_VALUE = 32  # "-1.2345678901234567e-38, " is 25: generous for any float32 as JSON text
JSON_SLACK = 64 * 1024  # id, parameters, outputs, whitespace
_SHAPE = re.compile(rb'"shape"\s*:\s*\[([0-9,\s]{1,200})\]')


def body_bound(prefix: bytes, header_length: str | None) -> tuple[int, str] | None:
    """(the largest body the request's declared tensor shape can need, that shape), from the first bytes of
    the body; None when it cannot be told yet (binary header incomplete, or no "shape" near the start:
    then only --max-body-mb applies). A binary request's size is exact; JSON gets 32 bytes per value."""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(prefix):
            return None
        try:
            inputs = json.loads(prefix[:int(header_length)]).get("inputs")
            shape = inputs[0]["shape"]
            count = math.prod(shape)
        except Exception:  # malformed: the full parse says what is wrong
            return None
        if type(count) is not int or count < 0:
            return None
        return int(header_length) + 4 * count, str(shape)
    m = _SHAPE.search(prefix)
    if m is None:
        return None
    try:
        dims = [int(d) for d in m.group(1).split(b",")]
    except ValueError:
        return None
    return JSON_BYTES_PER_VALUE * math.prod(dims) + JSON_SLACK, str(dims)


async def read_infer_body(request: Request) -> bytes:
    """The body of an inference request, refused with 413 as soon as its first bytes declare a tensor that
    cannot need that many bytes (Content-Length, or what arrived so far): memory is bounded by the
    declared shape, not only by --max-body-mb, and a mismatched body is never read, let alone parsed."""
    header_length = request.headers.get("inference-header-content-length")
    declared = request.headers.get("content-length", "")
    declared_size = int(declared) if declared.isdigit() else 0
    chunks: list[bytes] = []
    size, bound = 0, None
    async for chunk in request.stream():
        chunks.append(chunk)
        size += len(chunk)
        if bound is None:
            head = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            bound = body_bound(head[:BOUND_PREFIX], header_length)
            if bound is None and size >= BOUND_PREFIX:
                bound = (math.inf, "")  # nothing to go by: the full parse checks
        if bound is not None and max(size, declared_size) > bound[0]:
            raise ApiError(413, f"request body of {max(size, declared_size)} bytes is larger than its declared "
                           f"tensor shape {bound[1]} can need ({bound[0]} bytes)")
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _split_binary(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    if header_length is None:
        return body, memoryview(b"")
    try:
        n = int(header_length)
    except ValueError:
        n = -1
    if not 0 <= n <= len(body):
        raise ApiError(400, f"Inference-Header-Content-Length {header_length!r} does not fit a {len(body)}-byte body")
    return body[:n], memoryview(body)[n:]


def _input_tensor(spec: dict, binary: memoryview, model: ModelInfo, max_images: int) -> np.ndarray:
    if spec.get("name") != INPUT_NAME:
        raise ApiError(400, f"unknown input {spec.get('name')!r}; this model's input is '{INPUT_NAME}'")
    if spec.get("datatype") != "FP32":
        raise ApiError(400, f"input '{INPUT_NAME}' must have datatype FP32, got {spec.get('datatype')!r}")
    shape = spec.get("shape")
    expected = "[N, " + ", ".join(map(str, model.input_shape)) + "]"
    if (not isinstance(shape, list) or len(shape) != 4 or not all(type(d) is int for d in shape)
            or tuple(shape[1:]) != model.input_shape or shape[0] < 1):
        raise ApiError(400, f"input '{INPUT_NAME}' must have shape {expected}, got {shape!r}")
    if shape[0] > max_images:
        raise ApiError(400, f"batch of {shape[0]} images is more than this server queues ({max_images})")
    count = int(np.prod(shape))
    params = spec.get("parameters") or {}
    if not isinstance(params, dict):
        raise ApiError(400, "'parameters' must be an object")
    if "binary_data_size" in params:
        arr = _binary_tensor(params["binary_data_size"], binary, count)
    else:
        if len(binary):
            raise ApiError(400, "binary data present but no input declares binary_data_size")
        arr = json_tensor(INPUT_NAME, spec.get("data"), shape, np.float32)
    arr = arr.reshape(shape)
    if not np.isfinite(arr).all():
        raise ApiError(400, f"input '{INPUT_NAME}' contains NaN or infinity (or a number beyond the FP32 range)")
    return arr


def _binary_tensor(size: Any, binary: memoryview, count: int) -> np.ndarray:
    if type(size) is not int or size != count * 4:
        raise ApiError(400, f"binary_data_size must be {count * 4} bytes (FP32 x {count}), got {size!r}")
    if len(binary) != size:
        raise ApiError(400, f"binary data is {len(binary)} bytes, binary_data_size says {size}")
    return np.frombuffer(binary, dtype="<f4").astype(np.float32)  # copy: aligned, native, writable


JSON_NUMBERS = frozenset({int, float})  # what json.loads makes of JSON numbers (bool, str, None are not)


def json_tensor(name: str, data: Any, shape: list[int], dtype: type) -> np.ndarray:
    """A v2 tensor's JSON `data` -> a flat array of `dtype`, for every JSON-encoded input. The protocol allows
    a flat list of prod(shape) values or lists nested exactly as `shape`; anything else is a 400 naming the
    input and the dimension (data nested in another layout, e.g. NHWC under an NCHW shape, would otherwise be
    read as the same numbers in the wrong places). Only JSON numbers are values: no strings, booleans or null
    (NaN and Infinity are refused by the parser). Checks run per level in C-level loops, not per value."""
    if not isinstance(data, list):
        raise ApiError(400, f"input '{name}' needs 'data': a flat or nested list of numbers")
    count = math.prod(shape)
    if data and type(data[0]) is list:  # nested: every level must have exactly its dimension's length
        level: list = [data]
        for depth, size in enumerate(shape):
            bad = next((i for i, item in enumerate(level) if type(item) is not list or len(item) != size), None)
            if bad is not None:
                item = level[bad]
                where = "data" + "".join(f"[{k}]" for k in np.unravel_index(bad, shape[:depth])) if depth else "data"
                found = f"a list of {len(item)}" if type(item) is list else f"a {_json_type(type(item))}"
                raise ApiError(400, f"input '{name}': {where} is {found}, but dimension {depth} of its shape "
                               f"{shape} is {size} (nested data must match the shape; or send it flat)")
            level = list(chain.from_iterable(level))
        values = level
    elif len(data) != count:
        raise ApiError(400, f"input '{name}' has {len(data)} values in flat 'data', its shape {shape} needs {count}")
    else:
        values = data
    kinds = set(map(type, values))
    if not kinds <= JSON_NUMBERS:
        other = next(k for k in kinds if k not in JSON_NUMBERS)
        deeper = " (nested deeper than its shape's dimensions)" if other is list and values is not data else ""
        raise ApiError(400, f"input '{name}' data must be JSON numbers, found a {_json_type(other)}{deeper}")
    try:
        return np.asarray(values, dtype=dtype)
    except OverflowError:  # an integer too large for any float
        raise ApiError(400, f"input '{name}' contains a number beyond the {np.dtype(dtype).name} range") from None


def _json_type(kind: type) -> str:
    """The JSON name of a type json.loads produces, for error messages."""
    return {bool: "boolean", str: "string", type(None): "null", dict: "object", list: "list", int: "number",
            float: "number"}.get(kind, kind.__name__)


def _binary_output(req: dict) -> bool:
    params = req.get("parameters") or {}
    if not isinstance(params, dict):
        raise ApiError(400, "'parameters' must be an object")
    default = _json_bool(params, "binary_data_output")
    outputs = req.get("outputs")
    if not outputs:
        return default
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise ApiError(400, "'outputs' must be a list of objects")
    binary = default
    for out in outputs:
        if out.get("name") != OUTPUT_NAME:
            raise ApiError(400, f"unknown output {out.get('name')!r}; this model's output is '{OUTPUT_NAME}'")
        oparams = out.get("parameters") or {}
        if not isinstance(oparams, dict):
            raise ApiError(400, f"output '{OUTPUT_NAME}': 'parameters' must be an object")
        if "binary_data" in oparams:
            binary = _json_bool(oparams, "binary_data")
    return binary


def _json_bool(params: dict, key: str) -> bool:
    """A boolean parameter: only JSON true/false (bool("false") would be True: binary where text was asked)."""
    value = params.get(key, False)
    if type(value) is not bool:
        raise ApiError(400, f"parameter '{key}' must be true or false, got {value!r}")
    return value


def encode_infer_response(model: ModelInfo, req: InferRequest, logits: np.ndarray) -> tuple[bytes, dict, str]:
    """(body, headers, media type) of a v2 inference response; binary when the request asked for it."""
    require_finite(logits)
    out: dict[str, Any] = {"name": OUTPUT_NAME, "datatype": "FP32", "shape": list(logits.shape)}
    resp: dict[str, Any] = {"model_name": model.name, "model_version": MODEL_VERSION}
    if req.id is not None:
        resp["id"] = req.id
    resp["outputs"] = [out]
    if req.binary_output:
        raw = np.ascontiguousarray(logits, dtype="<f4").tobytes()
        out["parameters"] = {"binary_data_size": len(raw)}
        head = json.dumps(resp).encode()
        return head + raw, {"Inference-Header-Content-Length": str(len(head))}, "application/octet-stream"
    out["data"] = logits.ravel().tolist()
    return json.dumps(resp).encode(), {}, "application/json"


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
    """Bytes of upload decoding in flight at once, by the plans' estimates: an async weighted semaphore,
    first come first served, so concurrent large-but-allowed uploads queue instead of multiplying memory.
    A request larger than the whole budget counts as the whole budget (it runs alone)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, int(capacity))
        self.used = 0
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()

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

    async def _acquire(self, n: int) -> None:
        if not self._waiters and self.used + n <= self.capacity:
            self.used += n
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((n, fut))
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
        while self._waiters:
            n, fut = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
            elif self.used + n <= self.capacity:
                self._waiters.popleft()
                self.used += n
                fut.set_result(None)
            else:
                break


async def decode_upload(svc: "Service", data: bytes) -> np.ndarray:
    """An upload -> (1, C, H, W) float32: planned from its header first (413/400 before any pixel is
    decoded), then decoded in the CPU pool once its estimated bytes fit the server's decode budget (two of
    the costliest decodes `--max-image-pixels` allows, created on first use)."""
    cfg, limit = svc.model.preprocess, svc.config.max_image_pixels
    plan = await svc.run_cpu(plan_upload, data, cfg, limit)
    budget = getattr(svc, "decode_budget", None)
    if budget is None:
        budget = svc.decode_budget = DecodeBudget(2 * max_plan_bytes(cfg, limit))
    return await budget.run(plan.bytes, svc.pool, decode_image_bytes, data, cfg, limit)


def require_finite(logits: np.ndarray) -> None:
    """Refuse to answer NaN or infinite logits: JSON cannot carry them (a bare NaN is invalid JSON) and
    no ranking of them means anything. The inputs were finite, so this is the model's fault: 500."""
    if not np.isfinite(logits).all():
        raise ApiError(500, "the model produced non-finite logits (NaN or infinity) for this input; "
                       "no answer is given")


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
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="parnet-serve")
        self.batcher = DynamicBatcher(rt.submit, max_batch=min(c.max_batch, rt.max_batch), max_wait_s=c.max_wait_ms / 1e3,
                                      max_queue=c.max_queue, inflight=rt.inflight, on_batch=self.metrics.observe_batch)
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
        if self.pool is not None:
            self.pool.shutdown(wait=False)
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
    return JSONResponse({"name": "parnet-cpu", "version": __version__, "extensions": ["binary_tensor_data"]})


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


def _top_k_param(request: Request, num_classes: int) -> int:
    raw = request.query_params.get("top_k", "5")
    try:
        k = int(raw)
    except ValueError:
        k = 0
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
    return Response(_svc(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


# ---------------------------------------------------------------------------------------------- middleware

class ObservabilityMiddleware:
    """Counts and times every request by route (bounded label set) and writes one JSON access-log line."""

    def __init__(self, app, service: Service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            seconds = time.perf_counter() - start
            endpoint = _endpoint_label(scope)
            self.service.metrics.observe_request(endpoint, scope["method"], status, seconds)
            if self.service.config.access_log:
                log.info("request", extra={"method": scope["method"], "path": scope["path"], "status": status,
                                           "duration_ms": round(seconds * 1e3, 3),
                                           "client": (scope.get("client") or ("?",))[0]})


def _endpoint_label(scope: dict) -> str:
    """The route template (Starlette sets `scope["route"]`; older releases only the endpoint function)."""
    path = getattr(scope.get("route"), "path", None)
    return path or getattr(scope.get("endpoint"), "__name__", None) or "unmatched"


class BodyLimitMiddleware:
    """Refuses bodies over the limit: at once from Content-Length, or mid-stream for chunked uploads; and
    bodies that do not arrive within `timeout_s` (a slow or stalled client holding memory and a slot): 408."""

    def __init__(self, app, max_bytes: int, timeout_s: float | None = None) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for key, value in scope["headers"]:
            if key == b"content-length":
                if not value.isdigit() or int(value) > self.max_bytes:
                    err = BodyTooLarge(self.max_bytes) if value.isdigit() else ApiError(400, "invalid Content-Length")
                    return await _error_response(err)(scope, receive, send)
                break
        received, more, deadline = 0, True, None

        async def limited() -> dict:
            nonlocal received, more, deadline
            if not more or self.timeout_s is None:  # body complete: only the disconnect watch is left
                message = await receive()
            else:
                loop = asyncio.get_running_loop()
                deadline = deadline or loop.time() + self.timeout_s  # from the first read of the body
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    raise ApiError(408, f"request body not received within {self.timeout_s:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                more = message.get("more_body", False)
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            else:
                more = False
            return message

        await self.app(scope, limited, send)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """Every error this server answers, the app's and the HTTP protocol's: `{"error": message}`."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _error_response(exc: ApiError) -> Response:
    return error_response(exc.status, exc.message, exc.headers)


async def _api_error(request: Request, exc: ApiError) -> Response:
    return _error_response(exc)


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
        log.info("replicas chosen", extra=chosen)
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
    routes = [Route("/v2", server_metadata), Route("/v2/health/live", live), Route("/v2/health/ready", ready),
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
                    exception_handlers={ApiError: _api_error, ImageDecodeError: _decode_error,
                                        HTTPException: _http_error, Exception: _internal_error})
    app.state.service = service
    return app
