"""The Open Inference Protocol (KServe v2) REST codec: model metadata, request parsing, response encoding.

Pure translation between HTTP bodies and arrays, no serving state: a v2 inference request (JSON, or JSON +
the binary tensor data extension) becomes validated FP32 images (`parse_infer_request`; JSON data through
the one decoder `json_tensor`), logits become a v2 response (`encode_infer_response`). Every refusal is an
`ApiError`, answered as v2's `{"error": message}` with its HTTP status (`error_response`). Bodies are
bounded by their declared shape before they are read (`read_infer_body`). `serve.app` routes to it.
"""
from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from parnet_cpu.artifacts import INPUT_NAME, OUTPUT_NAME
from parnet_cpu.data.preprocess import PreprocessConfig
from parnet_cpu.runtime.runtime import InputError, check_images

MODEL_VERSION = "1"
PLATFORM = "openvino_ir"


class ApiError(Exception):
    """An error answered as `{"error": message}` with an HTTP status (4xx: the client's; 5xx: ours)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class BodyTooLarge(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than the server's limit of {limit} bytes")


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """Every error this server answers, the app's and the HTTP protocol's: `{"error": message}`."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def api_error_response(exc: ApiError) -> Response:
    """An `ApiError` as its HTTP answer."""
    return error_response(exc.status, exc.message, exc.headers)


def require_finite(logits: np.ndarray) -> None:
    """Refuse to answer NaN or infinite logits: JSON cannot carry them (a bare NaN is invalid JSON) and
    no ranking of them means anything. The inputs were finite, so this is the model's fault: 500."""
    if not np.isfinite(logits).all():
        raise ApiError(500, "the model produced non-finite logits (NaN or infinity) for this input; "
                       "no answer is given")


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
    def from_runtime(cls, name: str, runtime: Any) -> "ModelInfo":
        """From a started runtime (a `serve.app.RuntimeLike`)."""
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
    classification: int | None = None  # Triton's classification extension: top-k "value:index[:label]" strings


def parse_infer_request(body: bytes, header_length: str | None, model: ModelInfo, max_images: int) -> InferRequest:
    """A v2 inference request (JSON, or JSON + binary tensor data) -> validated FP32 images. 400 otherwise."""
    head, binary = _split_binary(body, header_length)
    req = _loads(head)
    if not isinstance(req, dict):
        raise ApiError(400, "request body must be a JSON object")
    params = parameters(req, "the request", REQUEST_PARAMETERS)
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ApiError(400, f"'inputs' must be a list with exactly one tensor, '{INPUT_NAME}'")
    images = _input_tensor(inputs[0], binary, model, max_images)
    req_id = req.get("id")
    if req_id is not None and not isinstance(req_id, str):
        raise ApiError(400, "'id' must be a string")
    binary, classification = _outputs(req, params, model.num_classes)
    return InferRequest(images, req_id, binary, classification)


# Every parameter this server honours, per place: anything else is refused (400 naming it), never ignored,
# so a client asking for an extension it does not get (shared memory, sequences, ...) learns it at once.
REQUEST_PARAMETERS = frozenset({"binary_data_output"})
INPUT_PARAMETERS = frozenset({"binary_data_size"})
OUTPUT_PARAMETERS = frozenset({"binary_data", "classification"})


def parameters(spec: dict, where: str, known: frozenset[str]) -> dict:
    """`spec["parameters"]` (an object, or absent), refused with 400 when it holds a parameter not in `known`:
    the one check every request, input and output parameter passes."""
    params = spec.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ApiError(400, f"{where}: 'parameters' must be an object")
    unknown = sorted(set(params) - known)
    if unknown:
        raise ApiError(400, f"{where}: unknown parameter(s) {unknown}; this server supports {sorted(known)}")
    return params


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
    params = parameters(spec, f"input '{INPUT_NAME}'", INPUT_PARAMETERS)
    if "binary_data_size" in params:
        arr = _binary_tensor(params["binary_data_size"], binary, count)
    else:
        if len(binary):
            raise ApiError(400, "binary data present but no input declares binary_data_size")
        arr = json_tensor(INPUT_NAME, spec.get("data"), shape, np.float32)
    try:  # the Runtime's own input check (shape, dtype, finiteness): one rule for the API and the server
        return check_images(arr.reshape(shape), model.input_shape)
    except InputError as exc:
        raise ApiError(400, f"input '{INPUT_NAME}': {exc}") from None


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


def _outputs(req: dict, params: dict, num_classes: int) -> tuple[bool, int | None]:
    """(binary output?, classification count or None) from the request's and its outputs' parameters."""
    binary = _json_bool(params, "binary_data_output")
    outputs = req.get("outputs")
    if not outputs:
        return binary, None
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise ApiError(400, "'outputs' must be a list of objects")
    classification = None
    for out in outputs:
        if out.get("name") != OUTPUT_NAME:
            raise ApiError(400, f"unknown output {out.get('name')!r}; this model's output is '{OUTPUT_NAME}'")
        oparams = parameters(out, f"output '{OUTPUT_NAME}'", OUTPUT_PARAMETERS)
        if "binary_data" in oparams:
            binary = _json_bool(oparams, "binary_data")
        if "classification" in oparams:
            k = oparams["classification"]
            if type(k) is not int or not 1 <= k <= num_classes:
                raise ApiError(400, f"output '{OUTPUT_NAME}': parameter 'classification' must be an integer in "
                               f"1..{num_classes}, got {k!r}")
            classification = k
    return binary, classification


def classification_strings(logits: np.ndarray, k: int, names: tuple[str, ...] | None) -> list[list[str]]:
    """Triton's classification extension: per row the k highest outputs (ties: lower index first) as
    "<value>:<index>[:<label>]", value as Triton prints it (C++ std::to_string, 6 decimals)."""
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return [[f"{float(row[i]):f}:{i}" + (f":{names[i]}" if names else "") for i in idx]
            for row, idx in zip(logits, order)]


def _bytes_tensor(strings: list[str]) -> bytes:
    """A BYTES tensor in the binary tensor data extension: each element as a 4-byte little-endian length
    followed by its bytes."""
    return b"".join(struct.pack("<I", len(b)) + b for b in (s.encode() for s in strings))


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
    if req.classification is not None:
        rows = classification_strings(logits, req.classification, model.class_names)
        out.update(datatype="BYTES", shape=[len(rows), req.classification])
        flat = [s for row in rows for s in row]
    resp: dict[str, Any] = {"model_name": model.name, "model_version": MODEL_VERSION}
    if req.id is not None:
        resp["id"] = req.id
    resp["outputs"] = [out]
    if req.binary_output:
        raw = np.ascontiguousarray(logits, dtype="<f4").tobytes() if req.classification is None else _bytes_tensor(flat)
        out["parameters"] = {"binary_data_size": len(raw)}
        head = json.dumps(resp).encode()
        return head + raw, {"Inference-Header-Content-Length": str(len(head))}, "application/octet-stream"
    out["data"] = logits.ravel().tolist() if req.classification is None else flat
    return json.dumps(resp).encode(), {}, "application/json"
