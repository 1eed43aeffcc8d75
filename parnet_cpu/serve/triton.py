"""Triton's model configuration and statistics extensions, which tritonclient (`get_model_config`,
`get_inference_statistics`), perf_analyzer and Model Analyzer read next to the v2 protocol:

    GET  /v2/models/{name}[/versions/1]/config   the model's configuration in Triton's JSON (ModelConfig)
    GET  /v2/models[/{name}[/versions/1]]/stats  cumulative statistics since the server started

Statistics come from the observations the Prometheus metrics take (`metrics.ModelStats`, fed by the batcher):
`inference_count` counts images, `execution_count` runtime batches; per request, `queue` is the time in the
batcher's queue before its batch started, `compute_infer` its batch's time in the runtime and `success` /
`fail` their sum. Body parsing and response encoding are not timed separately: `compute_input` and
`compute_output` stay at zero (the request-duration histogram of /metrics covers them).
"""
from __future__ import annotations

from typing import Any, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from parnet_cpu.artifacts import INPUT_NAME, OUTPUT_NAME
from parnet_cpu.serve.metrics import Duration, ModelStats
from parnet_cpu.serve.v2 import MODEL_VERSION, PLATFORM, ApiError

__all__ = ["model_config", "model_statistics", "routes"]

ModelCheck = Callable[[Any, Request], None]  # (service, request): raises the 404 of an unknown model or version


def model_config(svc: Any) -> dict:
    """The served model in Triton's model-configuration schema: batching with `max_batch_size` (dims without
    the batch), the tensors, the dynamic batcher's settings and the runtime's concurrent batches."""
    m, c = svc.model, svc.config
    return {
        "name": m.name, "platform": PLATFORM, "backend": "openvino",
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": svc.batcher.max_batch,
        "input": [{"name": INPUT_NAME, "data_type": "TYPE_FP32", "format": "FORMAT_NCHW",
                   "dims": list(m.input_shape), "optional": False}],
        "output": [{"name": OUTPUT_NAME, "data_type": "TYPE_FP32", "dims": [m.num_classes], "label_filename": ""}],
        "dynamic_batching": {"preferred_batch_size": [svc.batcher.max_batch],
                             "max_queue_delay_microseconds": int(round(c.max_wait_ms * 1000)),
                             "default_queue_policy": {"max_queue_size": c.max_queue}},
        "instance_group": [{"name": m.name, "kind": "KIND_CPU", "count": svc.batcher.inflight}],
        "model_transaction_policy": {"decoupled": False},
        "parameters": {"precision": {"string_value": m.precision}},
    }


def _duration(d: Duration) -> dict[str, int]:
    return {"count": d.count, "ns": d.ns}


def model_statistics(name: str, stats: ModelStats) -> dict:
    """One `$model_stat` of Triton's statistics extension."""
    zero = Duration()
    return {
        "name": name, "version": MODEL_VERSION, "last_inference": stats.last_inference_ms,
        "inference_count": stats.inference_count, "execution_count": stats.execution_count,
        "inference_stats": {"success": _duration(stats.success), "fail": _duration(stats.fail),
                            "queue": _duration(stats.queue), "compute_input": _duration(zero),
                            "compute_infer": _duration(stats.compute_infer), "compute_output": _duration(zero),
                            "cache_hit": _duration(zero), "cache_miss": _duration(zero)},
        "response_stats": {},
        "batch_stats": [{"batch_size": size, "compute_input": _duration(zero), "compute_infer": _duration(d),
                         "compute_output": _duration(zero)} for size, d in sorted(stats.batches.items())],
        "memory_usage": [],
    }


def routes(check_model: ModelCheck) -> list[Route]:
    """The extension's routes; `check_model` is the app's own check of the path's model name and version.
    They go before the app's `/v2/models/{name}` (else `/v2/models/stats` would be read as a model's metadata)."""

    async def config(request: Request) -> Response:
        svc = request.app.state.service
        check_model(svc, request)
        if svc.model is None or svc.batcher is None:
            raise ApiError(503, "server is not ready (starting)")
        return JSONResponse(model_config(svc))

    async def stats(request: Request) -> Response:
        svc = request.app.state.service
        if "name" in request.path_params:
            check_model(svc, request)
        return JSONResponse({"model_stats": [model_statistics(svc.config.name, svc.metrics.model_stats)]})

    out = [Route("/v2/models/stats", stats)]
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        out += [Route(prefix + "/config", config), Route(prefix + "/stats", stats)]
    return out
