"""OpenVINO compilation with explicit, reported settings.

Precision is always set explicitly: OpenVINO 2026 picks bf16 as the CPU default inference precision
wherever the CPU has avx512_bf16 or AMX (seen on this project's AMD EPYC development machine), which
silently turns an "FP32" baseline into a bf16 one (relative error ~4e-4 instead of ~3e-8 on ParNet).
FP32 here always means f32 kernels.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parnet_cpu.system.openvino_core import core  # noqa: F401  (re-exported: the runtime's callers use engine.core)

PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}  # int8: see float_leftovers
LEFTOVERS_ENV = "PARNET_CPU_INT8_LEFTOVERS"  # auto | bf16 | f32: reaches worker processes and every compile
LEFTOVER_CHOICES = ("auto", "bf16", "f32")




@dataclass(frozen=True)
class CompileOptions:
    precision: str = "fp32"  # fp32 | bf16 | int8 (the IR decides what is quantized)
    hint: str = "LATENCY"  # LATENCY | THROUGHPUT
    num_threads: int | None = None  # None: OpenVINO decides
    num_streams: int | None = None
    pinning: bool | None = None
    leftovers: str | None = None  # int8 IR only: precision of the ops NNCF left in float (see float_leftovers)
    perf_count: bool = False  # OpenVINO per-node counters (`profile`); off on the hot path

    def properties(self) -> dict[str, Any]:
        props: dict[str, Any] = {"PERFORMANCE_HINT": self.hint,
                                 "INFERENCE_PRECISION_HINT": float_leftovers(self.precision, self.leftovers)}
        if self.perf_count:
            props["PERF_COUNT"] = True
        if self.num_threads is not None:
            props["INFERENCE_NUM_THREADS"] = int(self.num_threads)
        if self.num_streams is not None:
            props["NUM_STREAMS"] = int(self.num_streams)
        if self.pinning is not None:
            props["ENABLE_CPU_PINNING"] = bool(self.pinning)
        return props


def float_leftovers(precision: str, leftovers: str | None = None) -> str:
    """INFERENCE_PRECISION_HINT for a compile: f32 for "fp32", bf16 for "bf16"; for an INT8 IR it sets
    the precision of the ops left in float (stem, SE gates, pooling, elementwise). `leftovers` (else the
    PARNET_CPU_INT8_LEFTOVERS environment variable, else "auto"): "auto" = bf16 where the CPU runs bf16
    natively (AMX-BF16 / AVX512_BF16), f32 elsewhere; "f32" is the pre-2026-11 default (opt-out)."""
    if precision != "int8":
        return PRECISION_HINTS[precision]
    choice = leftovers or os.environ.get(LEFTOVERS_ENV) or "auto"
    if choice not in LEFTOVER_CHOICES:
        raise ValueError(f"int8 float leftovers must be one of {', '.join(LEFTOVER_CHOICES)}, got {choice!r}")
    if choice == "auto":
        return "bf16" if precision_supported("bf16") and isa_cap_allows_bf16(os.environ.get("ONEDNN_MAX_CPU_ISA")) \
            else "f32"
    return choice


def isa_cap_allows_bf16(cap: str | None) -> bool:
    """Whether an ONEDNN_MAX_CPU_ISA cap leaves native bf16 kernels (OpenVINO's capability list ignores the
    cap, so a capped AVX2 run would otherwise get bf16 emulated in f32 code)."""
    if not cap or cap.upper() in ("ALL", "DEFAULT"):
        return True
    cap = cap.upper()
    return "BF16" in cap or "AMX" in cap or "FP16" in cap or cap.startswith("AVX10")


def default_leftovers(isa: dict[str, bool], cap: str | None = None) -> str:
    """What "auto" picks on a CPU with these ISA flags (`parnet-cpu info`, also for captured trees)."""
    has_bf16 = bool(isa.get("avx512_bf16") or (isa.get("amx_tile") and isa.get("amx_bf16")))
    return "bf16" if has_bf16 and isa_cap_allows_bf16(cap) else "f32"


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
