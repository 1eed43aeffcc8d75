"""`bench --cost-model`: each stage's latency at 1..N threads, fitted with Amdahl, predicted for 16/32/56 cores.

Each stage (and the whole graph) is timed at 1..k threads, each time in a process pinned to exactly
that many cores (`parnet_cpu.runtime.pinned`), and fitted with T(t) = serial + parallel / t (Amdahl).
A plan's latency is then
    single(N)      = T_model(N)
    multistream(N) = T_stem(N) + max_i T_stream_i(c_i) + T_tail(N) + handover
with the N cores split between streams in proportion to their one-thread cost. Fitted from a few
threads only, the prediction is a first-order estimate: check it against a real run (`bench`) on the
bigger machine, and record that machine's CPU with the result. For planning, the per-layer model in
`parnet_cpu.runtime.costmodel` (fitted on one thread, used by `parnet-cpu plan`) replaces this fit.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from parnet_cpu.artifacts import ModelDir
from parnet_cpu.runtime.cores import proportional_sizes
from parnet_cpu.runtime.costmodel import STAGES
from parnet_cpu.runtime.pinned import run_pinned
from parnet_cpu.runtime.timing import measure_latency


def time_stages(ir_path: str, precision: str, threads: int, iters: int) -> dict[str, float]:
    """Run in a child pinned to `threads` cores: median batch-1 latency (ms) of every stage."""
    from parnet_cpu.runtime.engine import CompileOptions, compile_model
    from parnet_cpu.runtime.partition import cut_stage

    out = {}
    for stage in STAGES:
        compiled = compile_model(cut_stage(ir_path, stage),
                                 CompileOptions(precision=precision, num_threads=threads, pinning=True))
        inputs = [np.zeros([1] + [d.get_length() for d in list(p.get_partial_shape())[1:]], np.float32)
                  for p in compiled.inputs]
        out[stage.name] = measure_latency(lambda: compiled(inputs), 2, iters)["median_ms"]
    return out


def measure_scaling(model_dir: str | Path, precision: str, max_threads: int | None = None,
                    iters: int = 10) -> dict[str, dict[int, float]]:
    """Median batch-1 latency (ms) of each stage at 1..max_threads threads, pinned."""
    md = ModelDir.open(model_dir)
    cpus = sorted(os.sched_getaffinity(0))
    table: dict[str, dict[int, float]] = {}
    for t in range(1, min(max_threads or len(cpus), len(cpus)) + 1):
        payload = run_pinned(time_stages, (str(md.ir_path(precision)), precision, t, iters), cpus[:t],
                             what=f"cost model: timing the stages on {t} thread(s)")
        for stage, ms in payload.items():
            table.setdefault(stage, {})[t] = ms
    return table


def fit_amdahl(points: dict[int, float]) -> tuple[float, float]:
    """(serial, parallel) in ms with T(t) = serial + parallel / t, least squares, both >= 0."""
    ts = np.array(sorted(points), dtype=float)
    ys = np.array([points[int(t)] for t in ts])
    if len(ts) == 1:
        return 0.0, float(ys[0] * ts[0])
    a = np.stack([np.ones_like(ts), 1.0 / ts], axis=1)
    serial, parallel = np.linalg.lstsq(a, ys, rcond=None)[0]
    if serial < 0:
        serial, parallel = 0.0, float(np.mean(ys * ts))
    if parallel < 0:
        serial, parallel = float(np.mean(ys)), 0.0
    return float(serial), float(parallel)


def predict(fits: dict[str, tuple[float, float]], cores: int, handover_ms: float = 0.0) -> dict:
    def t(stage: str, n: int) -> float:
        s, p = fits[stage]
        return s + p / max(1, n)

    single = t("model", cores)
    out = {"cores": cores, "single_ms": single}
    if cores >= 3:
        costs = [sum(fits[f"stream{i}"]) for i in (1, 2, 3)]
        sizes = proportional_sizes(costs, cores)
        multi = t("stem", cores) + max(t(f"stream{i + 1}", c) for i, c in enumerate(sizes)) + t("tail", cores) \
            + handover_ms
        out.update({"groups": sizes, "multistream_ms": multi, "ratio_multi_vs_single": multi / single})
    return out


def cost_model(model_dir: str | Path, precision: str, predict_cores=(16, 32, 56), handover_ms: float = 0.0,
               iters: int = 10) -> dict:
    table = measure_scaling(model_dir, precision, iters=iters)
    fits = {stage: fit_amdahl(points) for stage, points in table.items()}
    return {"measured_ms": {k: {str(t): v for t, v in pts.items()} for k, pts in table.items()},
            "fit_ms": {k: {"serial": s, "parallel": p} for k, (s, p) in fits.items()},
            "handover_ms": handover_ms,
            "predictions": [predict(fits, n, handover_ms) for n in predict_cores],
            "caveat": f"fitted from 1..{max(len(p) for p in table.values())} threads on this machine"}
