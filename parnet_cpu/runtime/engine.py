"""OpenVINO compilation with explicit, reported settings.

Precision is always set explicitly: OpenVINO 2026 picks bf16 as the CPU default inference precision
wherever the CPU has avx512_bf16 or AMX (seen on this project's AMD EPYC development machine), which
silently turns an "FP32" baseline into a bf16 one (relative error ~4e-4 instead of ~3e-8 on ParNet).
FP32 here always means f32 kernels.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8 IR: non-quantized ops stay f32


@lru_cache(maxsize=1)
def core():
    """One `ov.Core` per process: it caches plugin state and is safe to share between threads."""
    import openvino as ov

    return ov.Core()


@dataclass(frozen=True)
class CompileOptions:
    precision: str = "fp32"  # fp32 | bf16 | int8 (the IR decides what is quantized)
    hint: str = "LATENCY"  # LATENCY | THROUGHPUT
    num_threads: int | None = None  # None: OpenVINO decides
    num_streams: int | None = None
    pinning: bool | None = None

    def properties(self) -> dict[str, Any]:
        props: dict[str, Any] = {"PERFORMANCE_HINT": self.hint,
                                 "INFERENCE_PRECISION_HINT": PRECISION_HINTS[self.precision]}
        if self.num_threads is not None:
            props["INFERENCE_NUM_THREADS"] = int(self.num_threads)
        if self.num_streams is not None:
            props["NUM_STREAMS"] = int(self.num_streams)
        if self.pinning is not None:
            props["ENABLE_CPU_PINNING"] = bool(self.pinning)
        return props


def precision_supported(precision: str) -> bool:
    """Whether the CPU runs this precision natively (OpenVINO's OPTIMIZATION_CAPABILITIES)."""
    caps = set(core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    return {"fp32": "FP32", "bf16": "BF16", "int8": "INT8"}[precision] in caps


def read_model(path_or_model):
    return core().read_model(str(path_or_model)) if isinstance(path_or_model, (str, Path)) else path_or_model


def compile_model(path_or_model, options: CompileOptions = CompileOptions()):
    return core().compile_model(read_model(path_or_model), "CPU", options.properties())


def _rt(info, key: str) -> str:
    return str(info[key].astype(str)) if key in info else "?"


def runtime_layers(compiled) -> list[dict[str, str]]:
    """Each executed layer of the compiled (runtime) graph, read back rather than assumed: its type,
    the precision it really runs in, and the kernel OpenVINO chose (e.g. `jit_avx2_I8`, `brgconv_avx512_amx`)."""
    return [{"name": op.get_friendly_name(), "type": _rt(op.get_rt_info(), "layerType"),
             "precision": _rt(op.get_rt_info(), "runtimePrecision"), "kernel": _rt(op.get_rt_info(), "primitiveType")}
            for op in compiled.get_runtime_model().get_ordered_ops()]
