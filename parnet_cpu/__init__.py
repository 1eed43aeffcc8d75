"""parnet-cpu: ParNet on CPU servers.

Public API (everything in `__all__`)::

    model = create_model("parnet_s", checkpoint="planes_92_...pth.tar")   # timm-style builder
    deploy = reparameterize(model)                                        # exact training -> deploy fusion
    export(model, "parnet_s-fp32/")                                       # model folder: FP32 IR
    report = quantize(model, "imagenet_val/", "parnet_s-int8/")           # INT8 PTQ with OpenVINO + NNCF
    with Runtime("parnet_s-int8/") as rt:                                 # pinned multi-stream runtime
        images, paths = load_images("photos/", "parnet_s-int8/")
        logits = rt.infer(images)

Embedding (torch-free; see the README's "Embedding" section)::

    rt = Runtime("parnet_s-int8/")                    # or cores="share:N" in each of N server workers
    rt.preprocess(upload_bytes)                       # bytes, path, PIL image or uint8 array -> (C, H, W)
    rt.classify(["a.jpg", upload_bytes], top_k=5)     # [TopK(labels, indices, probabilities), ...]
    await rt.infer_async(batch); await rt.classify_async(image)   # asyncio, cancellation-safe
    batcher = Batcher(rt, max_batch=8, max_wait_ms=2)  # serve's dynamic batcher for any asyncio server
    await batcher.classify(upload_bytes)               # concurrent calls share batches
    rt.class_names, rt.input_shape, rt.preprocess_config, rt.healthy()

Importing this package is cheap and torch-free; the torch side (models, reparameterization, export,
quantization) loads on first use, so a serving install without torch can still use the runtime.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "create_model": "parnet_cpu.models.parnet",
    "build_model": "parnet_cpu.models.parnet",
    "list_models": "parnet_cpu.models.parnet",
    "ParNet": "parnet_cpu.models.parnet",
    "ParNetConfig": "parnet_cpu.models.parnet",
    "count_parameters": "parnet_cpu.models.parnet",
    "load_checkpoint": "parnet_cpu.models.checkpoint",
    "reparameterize": "parnet_cpu.reparam.fuse",
    "Runtime": "parnet_cpu.runtime.runtime",
    "Batcher": "parnet_cpu.serve.batcher",
    "TopK": "parnet_cpu.runtime.classify",
    "export": "parnet_cpu.api",
    "quantize": "parnet_cpu.api",
    "load_images": "parnet_cpu.api",
    "QuantizeOptions": "parnet_cpu.quantization.base",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'parnet_cpu' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
