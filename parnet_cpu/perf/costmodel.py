"""Predict multi-stream vs single-graph latency on machines with more cores than this one.

The per-layer model (`validate`, `predict_plan`; used by `parnet-cpu plan` and benchmarks/scale_check.py):
each layer's one-thread time split over its parallel work items, fitted on ONE thread, so a 2-thread
measurement can falsify it (see below). Profiles run in a child process pinned to the cores they time
(`parnet_cpu.perf.pinned`). `scan_core_counts` asks the model what more cores would give. This is the
project's one prediction model (the whole-stage Amdahl fit of the former `bench --cost-model` was retired
in its favour, issue 22).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from parnet_cpu.artifacts import ModelDir
from parnet_cpu.perf.pinned import run_pinned
from parnet_cpu.runtime.cores import proportional_sizes
from parnet_cpu.runtime.partition import RECOMPUTE_STAGES, SINGLE_STAGES
from parnet_cpu.runtime.plan import time_balanced_sizes
from parnet_cpu.runtime.timing import measure_latency

STAGES = RECOMPUTE_STAGES + SINGLE_STAGES


# --------------------------------------------------------------------------- per-layer model
# Fitted on ONE thread only, so it can be checked against two (the falsification test this machine allows):
#   layer(t) = ms_1 * ceil(grain / t) / grain + sync(t)      (sync(1) = 0; layers with grain 1 do not split)
#   stage(t) = sum of its layers(t)                         (layers scaled to the 1-thread wall, see fit_stage)
# grain = the independent work items OpenVINO's CPU plugin (oneDNN) can hand to threads: batch x blocks
# of 16 output channels x output rows for convolutions, batch x channel blocks for reductions and the
# classifier, every row of every channel for elementwise work. sync(t) is measured by a microbenchmark
# (a chain of convolutions too small to split), not fitted on ParNet. Memory bandwidth, caches and clock
# changes with the number of busy cores are NOT modelled: a first-order estimate.

CHANNEL_BLOCK = 16  # oneDNN's blocked layouts (nChw16c) on AVX-512; AVX2 uses 8 (a finer grain)
MATRIX_TYPES = ("Convolution", "GroupConvolution", "FullyConnected", "MatMul", "ReduceMean", "Pooling", "MVN")


def parallel_grain(node_type: str, shape: Sequence[int]) -> int:
    """Work items a layer with this output shape splits into (see above)."""
    dims = [max(1, int(d)) for d in shape] or [1]
    batch, channels = dims[0], dims[1] if len(dims) > 1 else 1
    rows = dims[2] if len(dims) > 2 else 1
    blocks = -(-channels // CHANNEL_BLOCK)
    if node_type.startswith(MATRIX_TYPES):
        return batch * blocks * (rows if node_type.startswith(("Convolution", "GroupConvolution")) else 1)
    return batch * channels * rows


@dataclass
class LayerCost:
    name: str
    type: str
    kernel: str  # OpenVINO's exec type: the oneDNN kernel (e.g. brgconv_avx512_amx_I8, jit_avx512_vnni_I8)
    ms: float  # one thread, per inference
    grain: int


def layer_ms(layer: LayerCost, threads: int, sync_ms: float) -> float:
    if threads <= 1 or layer.grain <= 1:
        return layer.ms
    return layer.ms * math.ceil(layer.grain / threads) / layer.grain + sync_ms


def stage_ms(fit: dict, threads: int, sync_ms: float) -> float:
    """Predicted wall time of one stage (a `fit_stage` result) on `threads` threads."""
    return sum(layer_ms(LayerCost(**l), threads, sync_ms) for l in fit["layers"]) + fit["overhead_ms"]


def fit_stage(profile: dict) -> dict:
    """A stage's 1-thread profile -> its model: the layers and the per-call overhead."""
    wall, node_sum = profile["wall_ms"], sum(l["ms"] for l in profile["layers"])
    # The layers are scaled so they add up to the 1-thread wall time. The counters miss part of the time
    # (3-5 % at batch 1 but ~50 % at batch 8 for ParNet-S here) and that part halved on 2 threads like the
    # layers did: a first version that kept it as serial per-call overhead was 45-56 % off at batch 8.
    scale = wall / node_sum if node_sum > 0 else 1.0
    layers = [dict(l, ms=l["ms"] * scale) for l in profile["layers"]]
    return {"layers": layers, "overhead_ms": 0.0, "unaccounted_ms": wall - node_sum, "wall_1thread_ms": wall}


def _input_arrays(compiled, batch: int, rng) -> list:
    return [rng.standard_normal([batch] + [d.get_length() for d in list(p.get_partial_shape())[1:]], dtype=np.float32)
            for p in compiled.inputs]


def profile_in_child(ir_path: str, precision: str, threads: int, batches: list[int], iters: int) -> dict:
    """Run in a child pinned to `threads` cores (`run_pinned`): per stage and batch, the per-layer 1-run
    profile (PERF_COUNT) and the median wall time; plus the sync microbenchmark."""
    from parnet_cpu.runtime.engine import CompileOptions, compile_model
    from parnet_cpu.system.openvino_core import core
    from parnet_cpu.runtime.partition import cut_stage
    from parnet_cpu.perf.profile import collect

    rng = np.random.default_rng(0)
    opts = CompileOptions(precision=precision, num_threads=threads, pinning=True, perf_count=True)
    out: dict = {"stages": {}}
    for stage in STAGES:
        compiled = compile_model(cut_stage(ir_path, stage), opts)
        for batch in batches:
            feed = _input_arrays(compiled, batch, rng)
            raw, _ = collect(compiled, dict(enumerate(feed)), iters)
            shapes = {op.get_friendly_name(): [d.get_length() if d.is_static else batch
                                               for d in op.get_output_partial_shape(0)]
                      for op in compiled.get_runtime_model().get_ordered_ops() if op.get_output_size()}
            request = compiled.create_infer_request()
            wall = measure_latency(lambda: request.infer(feed, share_inputs=True), 2, iters)["median_ms"]
            layers = [asdict(LayerCost(n, t, e, ms, parallel_grain(t, shapes.get(n, [batch]))))
                      for n, t, e, ms in raw]
            out["stages"].setdefault(stage.name, {})[str(batch)] = {"wall_ms": wall, "layers": layers}
    out["sync_ms"] = _sync_microbenchmark(core(), opts, iters)
    return out


def _sync_microbenchmark(ov_core, opts, iters: int, layers: int = 40) -> float:
    """Mean time of a convolution that has almost no work (16 channels, 4x4): on one thread it is the
    kernel's fixed cost; the extra on t threads is what handing a layer to t threads costs."""
    import openvino as ov

    x = ov.opset13.parameter([1, 16, 4, 4], ov.Type.f32)
    y = x.output(0)
    w = ov.opset13.constant(np.random.default_rng(0).standard_normal((16, 16, 3, 3), dtype=np.float32) * 0.1)
    for _ in range(layers):
        y = ov.opset13.relu(ov.opset13.convolution(y, w, [1, 1], [1, 1], [1, 1], [1, 1])).output(0)
    compiled = ov_core.compile_model(ov.Model([ov.opset13.result(y)], [x]), "CPU", opts.properties())
    from parnet_cpu.perf.profile import collect

    raw, _ = collect(compiled, {0: np.ones((1, 16, 4, 4), np.float32)}, iters)
    convs = [ms for _, t, _, ms in raw if t == "Convolution"]
    return float(np.mean(convs)) if convs else 0.0


def profile_stages(model_dir: str | Path, precision: str, threads: int, batches: Sequence[int] = (1,),
                   iters: int = 10) -> dict:
    """Per-layer profile of every stage (and the whole graph) on the first `threads` usable physical
    cores, in a child process pinned to them (one thread per core)."""
    from parnet_cpu.system.cpuinfo import describe_machine, usable_physical_cores

    md = ModelDir.open(model_dir)
    cores = usable_physical_cores(describe_machine(query_openvino=False))
    if threads > len(cores):
        raise ValueError(f"{threads} threads need {threads} usable physical cores, this process has {len(cores)}")
    cpus = [c[0] for c in cores[:threads]]
    payload = run_pinned(profile_in_child, (str(md.ir_path(precision)), precision, threads, list(batches), iters),
                         cpus, timeout_s=1800, what=f"profiling on {threads} thread(s)")
    return payload | {"threads": threads, "cpus": cpus}


def fit_layer_model(one_thread: dict, sync_ms: float = 0.0) -> dict:
    """The model: per stage and batch, fitted on a 1-thread `profile_stages` result; `sync_ms` per
    split layer comes from the microbenchmark on the target thread count (`sync_cost`)."""
    if one_thread["threads"] != 1:
        raise ValueError("the layer model is fitted on a 1-thread profile only")
    return {"stages": {s: {b: fit_stage(p) for b, p in by_b.items()} for s, by_b in one_thread["stages"].items()},
            "sync_ms": sync_ms}


def sync_cost(one_thread: dict, t_threads: dict) -> float:
    """Extra time per split layer on t threads, from the microbenchmark run in both profiles."""
    return max(0.0, t_threads["sync_ms"] - one_thread["sync_ms"])


def validate(model_dir: str | Path, precision: str, threads: int = 2, batches: Sequence[int] = (1,),
             iters: int = 10) -> dict:
    """Fit on 1 thread, predict `threads`, compare with a measurement on `threads`: per stage and batch,
    predicted vs measured wall ms and the relative error (also for a naive 'perfect scaling' guess)."""
    p1 = profile_stages(model_dir, precision, 1, batches, iters)
    pt = profile_stages(model_dir, precision, threads, batches, iters)
    sync = sync_cost(p1, pt)
    model = fit_layer_model(p1, sync)
    rows = []
    for stage, by_b in pt["stages"].items():
        for b, meas in by_b.items():
            fit = model["stages"][stage][b]
            pred = stage_ms(fit, threads, sync)
            rows.append({"stage": stage, "batch": int(b), "measured_1t_ms": fit["wall_1thread_ms"],
                         "measured_ms": meas["wall_ms"], "predicted_ms": pred, "error": pred / meas["wall_ms"] - 1,
                         "naive_perfect_scaling_error": fit["wall_1thread_ms"] / threads / meas["wall_ms"] - 1})
    errors = [abs(r["error"]) for r in rows]
    return {"threads": threads, "precision": precision, "sync_ms_per_split_layer": sync,
            "microbenchmark_conv_ms": {"1": p1["sync_ms"], str(threads): pt["sync_ms"]},
            "rows": rows, "mean_abs_error": float(np.mean(errors)), "max_abs_error": float(np.max(errors)),
            "kernels": kernel_table(p1), "model": model, "profiles": {"1": p1, str(threads): pt}}


def kernel_table(profile: dict) -> dict[str, int]:
    """oneDNN kernel -> number of matrix layers (whole-graph profile) that ran it."""
    counts: dict[str, int] = {}
    for p in next(iter(profile["stages"]["model"].values()))["layers"]:
        if p["type"].startswith(("Convolution", "GroupConvolution", "FullyConnected", "MatMul")):
            counts[p["kernel"]] = counts.get(p["kernel"], 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def predict_plan(model: dict, batch: int, stream_cores: Sequence[int], union_cores: int, single_cores: int,
                 handover_ms: float) -> dict:
    """Predicted latency of the multi-stream plan (stem and tail on all the groups' cores, streams on
    their own groups, `handover_ms` for the messages) and of the single graph on `single_cores`."""
    st, b = model["stages"], str(batch)
    sync = model["sync_ms"]
    streams = [stage_ms(st[f"stream{i + 1}"][b], n, sync) for i, n in enumerate(stream_cores)]
    multi = stage_ms(st["stem"][b], union_cores, sync) + max(streams) + stage_ms(st["tail"][b], union_cores, sync) \
        + handover_ms
    single = stage_ms(st["model"][b], single_cores, sync)
    return {"batch": batch, "multistream_ms": multi, "single_ms": single, "stream_ms": streams,
            "ratio_multi_vs_single": multi / single, "auto_would_choose": "multistream" if multi < single else "single"}


# --------------------------------------------------------------------------- what more cores would give
def scan_core_counts(model: dict, mac_costs: Sequence[float], core_counts: Sequence[int], batches: Sequence[int],
                     handover_ms: float, size_batch: int = 1) -> list[dict]:
    """For single-socket machines of each core count: the predicted multi-stream/single ratio with groups
    sized by MACs and by predicted time (at batch `size_batch`), per batch. Used by `parnet-cpu plan`."""
    def group_time(i: int, n: int) -> float:
        return stage_ms(model["stages"][f"stream{i + 1}"][str(size_batch)], n, model["sync_ms"])

    rows = []
    for n in core_counts:
        splits = {"macs": proportional_sizes(mac_costs, n), "time": time_balanced_sizes(group_time, len(mac_costs), n)}
        row: dict = {"cores": n, "groups": splits}
        for kind, sizes in splits.items():
            for b in batches:
                p = predict_plan(model, b, sizes, n, n, handover_ms)
                row[f"ratio_{kind}_b{b}"] = p["ratio_multi_vs_single"]
        rows.append(row)
    return rows


def break_even(rows: Sequence[dict], key: str) -> int | None:
    """The smallest scanned core count at which multi-stream is predicted faster (ratio < 1), if any."""
    return min((r["cores"] for r in rows if r[key] < 1.0), default=None)
