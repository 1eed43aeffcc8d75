"""Where the time goes inside a compiled model, from OpenVINO's own per-node counters (`PERF_COUNT`).

Why: an "AMX-aware" or "VNNI" claim means nothing until the time per kernel is read back from the
engine. For every executed node of the runtime graph this records its time (summed over several
inferences), the kernel OpenVINO ran (`exec_type`, e.g. `brgconv_avx512_amx_I8`) and what that kernel
is: its instruction set (AMX / VNNI / AVX512 / AVX2 / SSE / reference) and precision (int8 / bf16 /
f32). The summary gives the time per op class and per kernel class, `matrix_unit_share` (time on AMX
tiles, 0 on CPUs without AMX), the share on VNNI and on int8 kernels, reorders and precision conversions,
and the achieved GMAC/s against a peak derived from ISA, core count and clock (see `peak_gmacs`).
Torch-free (the runtime package never imports torch).
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

# Dense int8 / bf16 / f32 multiply-accumulates per cycle per core, by instruction set (see peak_gmacs).
MACS_PER_CYCLE = {
    "int8": {"AMX": 1024, "AVX512_VNNI": 128, "AVX_VNNI": 64, "AVX512": 64, "AVX2": 32, "SSE": 16},
    "bf16": {"AMX": 512, "AVX512_BF16": 64, "AVX512": 32, "AVX2": 16, "SSE": 8},
    "f32": {"AMX": 32, "AVX512": 32, "AVX2": 16, "SSE": 8},
}
PEAK_BASIS = ("peak = MACs/cycle/core x cores x clock. MACs/cycle/core: AMX 1024 int8 / 512 bf16 (one TDPBUSD/"
              "TDPBF16PS tile op: 16x64 by 64x16 in 16 cycles); AVX-512 with two 512-bit FMA ports: VNNI 128 int8 "
              "(2 x vpdpbusd, 64 MACs each), AVX512_BF16 64 (2 x vdpbf16ps), f32 32 (2 x 16-lane FMA); int8 without "
              "VNNI needs vpmaddubsw+vpmaddwd, counted at half the VNNI rate; AVX2 256-bit halves each; "
              "AMD Zen 4 (family 25) runs 512-bit ops as two 256-bit halves, so its AVX-512 rates are halved; Zen 5 "
              "(family 26) has full-width units")
MATRIX_CLASSES = ("Convolution", "GroupConvolution", "FullyConnected", "MatMul")
PEAK_PRECISION = {"int8": "int8", "bf16": "bf16", "fp32": "f32"}  # model precision -> its matrix work's


@dataclass
class LayerProfile:
    """One executed node of the runtime graph, its time per inference (mean over the profiled runs)."""

    name: str
    type: str  # OpenVINO CPU node type (Convolution, ReduceMean, Reorder, Subgraph, ...)
    exec_type: str  # the kernel, as OpenVINO names it
    isa: str  # AMX | VNNI | AVX512 | AVX2 | SSE | reference | none
    precision: str  # int8 | bf16 | f16 | f32 | other
    op_class: str
    ms: float
    conversion: bool = False  # changes precision (int8 <-> f32/bf16, f32 <-> bf16)


def kernel_precision(exec_type: str) -> str:
    """Precision of a kernel from OpenVINO's exec-type suffix (`..._I8`, `..._BF16`, `..._f32`)."""
    tail = exec_type.rsplit("_", 1)[-1].lower()
    return {"i8": "int8", "u8": "int8", "bf16": "bf16", "f16": "f16", "f32": "f32", "fp32": "f32"}.get(tail, "other")


def kernel_isa(exec_type: str, precision: str, isa: dict[str, bool]) -> str:
    """Instruction set a kernel runs on. oneDNN names int8 kernels after the vector width only
    (`brgconv_avx512_I8`); whether they use VNNI dot products follows from the CPU's flags."""
    name = exec_type.lower()
    if "amx" in name:
        return "AMX"
    if name.startswith("ref") or "_ref" in name or name.startswith("gemm_"):
        return "reference"
    named = "avx512" in name or "avx2" in name  # `jit_uni_*` kernels (reorders, eltwise) do no dot products
    if "avx512" in name or "uni" in name and isa.get("avx512f"):
        width = "AVX512"
    elif "avx2" in name or "uni" in name and isa.get("avx2"):
        width = "AVX2"
    elif "sse" in name:
        width = "SSE"
    else:
        return "none"
    if named and precision == "int8" and (width == "AVX512" and isa.get("avx512_vnni")
                                          or width == "AVX2" and isa.get("avx_vnni")):
        return "VNNI"
    return width


def op_class(node_type: str) -> str:
    """Coarse op class for the per-class table (benchmark_app -pc reports the node type only)."""
    if node_type in MATRIX_CLASSES or node_type.startswith("FullyConnected"):
        return "FullyConnected" if node_type.startswith("FullyConnected") else node_type
    if node_type in ("ReduceMean", "Pooling", "AvgPool", "MaxPool"):
        return "Pooling"
    if node_type in ("Subgraph", "Eltwise", "Multiply", "Add", "Subtract", "Sigmoid", "Relu", "Swish", "Clamp"):
        return "Elementwise"
    if node_type in ("Reorder", "Convert", "FakeQuantize", "Concat", "ShuffleChannels", "Transpose"):
        return node_type
    return "Other"


def classify(name: str, node_type: str, exec_type: str, ms: float, isa: dict[str, bool],
             conversion: bool = False) -> LayerProfile:
    prec, kind = kernel_precision(exec_type), op_class(node_type)
    isa_name = kernel_isa(exec_type, prec, isa)
    if isa_name == "VNNI" and kind not in MATRIX_CLASSES:  # int8 pooling/eltwise: no dot products
        isa_name = "AVX2" if "avx2" in exec_type.lower() else "AVX512"
    conv = conversion or node_type == "Convert"
    return LayerProfile(name, node_type, exec_type, isa_name, prec, kind, ms, conv)


def conversions(compiled) -> set[str]:
    """Names of runtime nodes that change precision (a Reorder from f32 to u8, a Convert, ...), read from
    the runtime graph: a node's input precision is its producer's output precision."""
    out = set()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "layerType" not in info or info["layerType"].astype(str) not in ("Reorder", "Convert"):
            continue
        produced = str(info["outputPrecisions"].astype(str)) if "outputPrecisions" in info else ""
        consumed = {str(v.get_node().get_rt_info()["outputPrecisions"].astype(str))
                    for v in op.input_values() if "outputPrecisions" in v.get_node().get_rt_info()}
        if consumed and produced and consumed != {produced}:
            out.add(op.get_friendly_name())
    return out


def _counters(request) -> dict[str, tuple[str, str, float]]:
    """name -> (node type, exec type, ms) of the executed nodes, as the request reports them now."""
    return {p.node_name: (p.node_type, p.exec_type, p.real_time.total_seconds() * 1e3)
            for p in request.get_profiling_info() if p.status == p.Status.EXECUTED}


def collect(compiled, feed: dict, iters: int = 10, warmup: int = 3) -> tuple[list[tuple[str, str, str, float]], float]:
    """Run `iters` inferences with counters on: (name, node type, exec type, mean ms) for each executed
    node, and the mean wall time per inference in ms. The model must be freshly compiled with
    PERF_COUNT=True and used by this one request: OpenVINO's CPU counters are running means over every
    inference since compilation (checked here: they fall as the slow first runs are diluted), so the
    mean of the timed runs alone is (mean_after * (warmup + iters) - mean_before * warmup) / iters."""
    request = compiled.create_infer_request()
    for _ in range(warmup):
        request.infer(feed, share_inputs=True)
    before = _counters(request)
    t0 = time.perf_counter()
    for _ in range(iters):
        request.infer(feed, share_inputs=True)
    wall = (time.perf_counter() - t0) / iters * 1e3
    after = _counters(request)
    rows = []
    for name, (kind, exec_type, mean_after) in after.items():
        mean_before = before.get(name, (kind, exec_type, 0.0))[2]
        rows.append((name, kind, exec_type, max(0.0, (mean_after * (warmup + iters) - mean_before * warmup) / iters)))
    return rows, wall


def clock_mhz(info) -> tuple[float | None, str]:
    """Highest per-core max frequency (cpufreq), else the `cpu MHz` /proc/cpuinfo reports (nominal in VMs)."""
    freqs = [c.max_freq_mhz for c in info.cores if c.max_freq_mhz]
    if freqs:
        return max(freqs), "cpufreq cpuinfo_max_freq"
    from parnet_cpu.system.cpuinfo import parse_cpuinfo

    try:
        entries = parse_cpuinfo(Path(info.root, "proc/cpuinfo").read_text())
        return float(entries[0]["cpu MHz"]), "/proc/cpuinfo cpu MHz (nominal in VMs: turbo not counted)"
    except (OSError, IndexError, KeyError, ValueError):
        return None, "unknown"


def macs_per_cycle(precision: str, isa: dict[str, bool], vendor: str | None, family: int | None = None) -> tuple[int, str]:
    """Dense MACs per cycle per core for `precision` (int8 | bf16 | f32) and the ISA that gives it."""
    if isa.get("amx_tile") and (precision == "int8" and isa.get("amx_int8") or precision == "bf16" and isa.get("amx_bf16")):
        key = "AMX"
    elif precision == "int8" and isa.get("avx512_vnni") and isa.get("avx512f"):
        key = "AVX512_VNNI"
    elif precision == "int8" and isa.get("avx_vnni"):
        key = "AVX_VNNI"
    elif precision == "bf16" and isa.get("avx512_bf16"):
        key = "AVX512_BF16"
    elif isa.get("avx512f"):
        key = "AVX512"
    elif isa.get("avx2"):
        key = "AVX2"
    else:
        key = "SSE"
    rate = MACS_PER_CYCLE[precision].get(key, MACS_PER_CYCLE[precision]["AVX512"])
    if vendor == "AuthenticAMD" and family == 25 and key.startswith("AVX512"):  # Zen 4: 2 x 256-bit halves
        rate //= 2
    return rate, key


def peak_gmacs(precision: str, info, cores: int) -> dict:
    """Peak GMAC/s of `cores` cores of this CPU for a precision, and how it was derived."""
    rate, key = macs_per_cycle(precision, info.isa, info.vendor, info.cpu_family)
    mhz, source = clock_mhz(info)
    return {"precision": precision, "isa": key, "macs_per_cycle_per_core": rate, "cores": cores, "clock_mhz": mhz,
            "clock_source": source, "gmacs": rate * cores * mhz / 1e3 if mhz else None, "basis": PEAK_BASIS}


def _shares(layers: Sequence[LayerProfile], key: str, total: float) -> dict[str, dict]:
    groups: dict[str, list[LayerProfile]] = defaultdict(list)
    for layer in layers:
        groups[getattr(layer, key)].append(layer)
    rows = {k: {"ms": sum(l.ms for l in v), "nodes": len(v)} for k, v in groups.items()}
    for row in rows.values():
        row["share"] = row["ms"] / total if total else 0.0
    return dict(sorted(rows.items(), key=lambda kv: -kv[1]["ms"]))


def summarize(layers: Sequence[LayerProfile], wall_ms: float, batch: int, macs_per_image: float, peak: dict) -> dict:
    """The profile's numbers. Shares are of the summed node time (what the counters see); GMAC/s uses
    wall time (what a caller sees)."""
    total = sum(l.ms for l in layers)

    def share(pred) -> float:
        return sum(l.ms for l in layers if pred(l)) / total if total else 0.0

    gmacs = macs_per_image * batch / (wall_ms * 1e-3) / 1e9 if wall_ms > 0 else 0.0
    return {
        "batch": batch, "wall_ms": wall_ms, "images_per_s": batch * 1e3 / wall_ms if wall_ms else 0.0,
        "node_ms": total, "nodes": len(layers),
        "matrix_unit_share": share(lambda l: l.isa == "AMX"),
        "vnni_share": share(lambda l: l.isa == "VNNI"),
        "int8_share": share(lambda l: l.precision == "int8"),
        "matrix_ops_int8_share": share(lambda l: l.op_class in MATRIX_CLASSES and l.precision == "int8"),
        "float_matrix_ops_share": share(lambda l: l.op_class in MATRIX_CLASSES and l.precision in ("f32", "bf16")),
        "reorder_share": share(lambda l: l.type == "Reorder"),
        "conversion_share": share(lambda l: l.conversion),
        "reorders": sum(1 for l in layers if l.type == "Reorder"),
        "conversions": sum(1 for l in layers if l.conversion),
        "gmacs_per_image": macs_per_image / 1e9,
        "achieved_gmacs": gmacs,
        "peak": peak,
        "peak_fraction": gmacs / peak["gmacs"] if peak.get("gmacs") else None,
        "by_op_class": _shares(layers, "op_class", total),
        "by_kernel": _shares(layers, "exec_type", total),
        "by_isa": _shares(layers, "isa", total),
        "by_precision": _shares(layers, "precision", total),
    }


def profile_compiled(compiled, feed: dict, batch: int, precision: str, macs_per_image: float, cores: int,
                     iters: int = 10, info=None) -> dict:
    """Profile an already compiled model (compiled with PERF_COUNT=True) on `feed` (input port -> array)."""
    from parnet_cpu.system.cpuinfo import describe_machine

    info = info or describe_machine(query_openvino=False)
    raw, wall = collect(compiled, feed, iters)
    converting = conversions(compiled)
    layers = [classify(n, t, e, ms, info.isa, n in converting) for n, t, e, ms in raw]
    summary = summarize(layers, wall, batch, macs_per_image, peak_gmacs(PEAK_PRECISION[precision], info, cores))
    summary["layers"] = [asdict(l) for l in sorted(layers, key=lambda l: -l.ms)]
    return summary


def profile_model(model_dir: str | Path, precision: str | None = None, batch: int = 8, plan: str = "single",
                  iters: int = 10, threads: int | None = None, leftovers: str | None = None) -> dict:
    """Profile a model folder's IR the way `Runtime` compiles it (LATENCY hint, pinned threads).

    plan "single": the whole graph. plan "multistream": each stage of the multi-stream plan compiled on
    its own and run one after another (stage inputs from the previous stages), so the per-stage kernels
    and times show; concurrency itself is not profiled (the counters are per compiled model)."""
    from parnet_cpu.artifacts import INPUT_NAME, ModelDir
    from parnet_cpu.runtime.engine import CompileOptions, float_leftovers
    from parnet_cpu.system.openvino_core import core
    from parnet_cpu.runtime.macs import model_macs
    from parnet_cpu.system.cpuinfo import describe_machine, usable_physical_cores

    if plan not in ("single", "multistream"):
        raise ValueError(f"plan must be single or multistream, got {plan!r}")
    if batch < 1 or iters < 1:
        raise ValueError("batch and iters must be >= 1")
    md = ModelDir.open(model_dir)
    precision = precision or md.default_precision
    ir = md.ir_path(precision)
    info = describe_machine(query_openvino=False)
    cores = threads or max(1, len(usable_physical_cores(info)))
    opts = CompileOptions(precision=precision, num_threads=cores, pinning=True, leftovers=leftovers, perf_count=True)
    model = core().read_model(str(ir))
    macs = model_macs(model)
    x = np.random.default_rng(0).standard_normal((batch, *md.input_shape()), dtype=np.float32)
    header = {"model": str(md.path), "ir": ir.name, "precision": precision, "plan": plan, "threads": cores,
              "iters": iters, "compile_properties": {k: str(v) for k, v in opts.properties().items()},
              "float_leftovers": float_leftovers(precision, leftovers), "cpu": info.model_name,
              "isa_level": info.isa_level}
    if plan == "single":
        compiled = core().compile_model(model, "CPU", opts.properties())
        return header | profile_compiled(compiled, {0: x}, batch, precision, macs, cores, iters, info)
    from parnet_cpu.runtime.partition import RECOMPUTE_STAGES, cut_stage

    tensors, stages, layers, wall = {INPUT_NAME: x}, {}, [], 0.0
    for stage in RECOMPUTE_STAGES:
        sub = cut_stage(ir, stage)
        compiled = core().compile_model(sub, "CPU", opts.properties())
        feed = {i: tensors[n] for i, n in enumerate(stage.inputs)}
        result = profile_compiled(compiled, feed, batch, precision, model_macs(sub), cores, iters, info)
        outs = compiled(feed)
        for out in compiled.outputs:
            for name in out.get_names() & set(stage.outputs):
                tensors[name] = np.asarray(outs[out])
        stages[stage.name] = {k: result[k] for k in ("wall_ms", "node_ms", "matrix_unit_share", "vnni_share",
                                                     "int8_share", "achieved_gmacs")}
        layers += [LayerProfile(**l) for l in result["layers"]]
        wall += result["wall_ms"]
    summary = summarize(layers, wall, batch, macs, peak_gmacs(PEAK_PRECISION[precision], info, cores))
    summary["stages"] = stages
    summary["layers"] = [asdict(l) for l in sorted(layers, key=lambda l: -l.ms)]
    return header | summary


def format_table(report: dict, top: int = 25) -> str:
    """Text report in the spirit of benchmark_app's `-pc`: slowest layers, then per class and kernel."""
    lines = [f"{report['model']} ({report['ir']}, {report['precision']}, float leftovers {report['float_leftovers']}), "
             f"batch {report['batch']}, {report['threads']} threads, plan {report['plan']}, {report['cpu']}"]
    lines.append(f"{'layer':<58} {'type':<17} {'kernel':<28} {'isa':<9} {'prec':<5} {'ms':>8} {'%':>6}")
    total = report["node_ms"] or 1.0
    for l in report["layers"][:top]:
        name = l["name"] if len(l["name"]) <= 58 else "..." + l["name"][-55:]
        lines.append(f"{name:<58} {l['type'][:17]:<17} {l['exec_type'][:28]:<28} {l['isa']:<9} {l['precision']:<5} "
                     f"{l['ms']:8.3f} {100 * l['ms'] / total:6.1f}")
    if len(report["layers"]) > top:
        lines.append(f"... {len(report['layers']) - top} more layers (--json for all)")
    for title, key in (("op class", "by_op_class"), ("kernel isa", "by_isa"), ("precision", "by_precision")):
        lines.append(f"\nper {title}:")
        lines += [f"  {k:<22} {v['ms']:8.2f} ms {100 * v['share']:5.1f}%  ({v['nodes']} nodes)" for k, v in report[key].items()]
    peak = report["peak"]
    peak_txt = (f"{peak['gmacs']:.0f} GMAC/s ({peak['isa']} {peak['precision']}: {peak['macs_per_cycle_per_core']} "
                f"MACs/cycle/core x {peak['cores']} cores x {peak['clock_mhz']:.0f} MHz, {peak['clock_source']})"
                if peak.get("gmacs") else "unknown (no clock)")
    lines += ["",
              f"total: {report['wall_ms']:.2f} ms wall per batch ({report['images_per_s']:.1f} images/s), "
              f"{report['node_ms']:.2f} ms in counted nodes",
              f"matrix unit (AMX) share {100 * report['matrix_unit_share']:.1f}%   VNNI share "
              f"{100 * report['vnni_share']:.1f}%   int8 kernels {100 * report['int8_share']:.1f}%   float matrix ops "
              f"{100 * report['float_matrix_ops_share']:.1f}%",
              f"reorders {report['reorders']} ({100 * report['reorder_share']:.1f}%), precision conversions "
              f"{report['conversions']} ({100 * report['conversion_share']:.1f}%)",
              f"achieved {report['achieved_gmacs']:.0f} GMAC/s ({report['gmacs_per_image']:.3f} GMAC per image) vs peak "
              f"{peak_txt}" + (f": {100 * report['peak_fraction']:.1f}% of peak" if report.get("peak_fraction") else "")
              + (" (over 100%: the cores run above the clock used for the peak, e.g. turbo above a VM's nominal "
                 "MHz)" if (report.get("peak_fraction") or 0) > 1 else "")]
    return "\n".join(lines)
