"""HTTP serving: the Open Inference Protocol (KServe v2) REST API and `/v1/classify`, with dynamic
batching onto the multi-stream `Runtime`, Prometheus metrics and JSON logs.

Torch-free on purpose: a serving install is `openvino numpy psutil pillow` plus the web stack
(`starlette uvicorn prometheus-client python-multipart`). Run it with `parnet-cpu serve --model-dir DIR`.
"""
from parnet_cpu.serve.app import ServeConfig, create_app, decode_image_bytes
from parnet_cpu.serve.v2 import ApiError
from parnet_cpu.serve.batcher import BatcherClosedError, DynamicBatcher, QueueFullError

__all__ = ["ApiError", "BatcherClosedError", "DynamicBatcher", "QueueFullError", "ServeConfig", "create_app",
           "decode_image_bytes"]
