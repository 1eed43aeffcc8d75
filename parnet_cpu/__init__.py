"""parnet-cpu: ParNet on CPU servers.

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
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'parnet_cpu' has no attribute {name!r}")
