"""`parnet-cpu bench`: the multi-stream runtime against the best single-graph execution, same cores.

Rows (see `parnet_cpu.bench.engines` for the competing engines, each in its own pinned process):

- multistream     `Runtime` (stem+tail on all groups' cores, one stream per group)
- auto            `Runtime(plan="auto")` on the same cores: whichever plan measured faster at load (the default)
- ov-latency, ov-throughput, torch-eager, ort-parallel, ort-int8, torch-int8, ipex-int8: pinned to the CPUs
  of the plan

Every engine is built first, then all are timed in alternating rounds (`parnet_cpu.bench.rounds`) while the
quiet check samples other load between rounds; every ratio is against ov-latency in the same round, and
reported as the median over the rounds with its range.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import numpy as np

from parnet_cpu.artifacts import ModelDir
from parnet_cpu.outputs import report_stamp
from parnet_cpu.bench.base import BenchConfig, throughput
from parnet_cpu.bench.engines import (
    INT8_ENGINES,
    NEEDS_ONNX,
    EngineSpec,
    PinnedEngine,
    available_engines,
    export_onnx_for,
    missing_inputs,
)
from parnet_cpu.bench.quiet import LoadWatch
from parnet_cpu.bench.rounds import combine_rounds, interleaved_rounds, per_round_ratios
from parnet_cpu.perf.pinned import PinnedChildError
from parnet_cpu.runtime.timing import measure_latency

RUNTIME_ENGINES = ("multistream", "auto")
BASELINE = "ov-latency"


def runtime_round(rt, x: np.ndarray, cfg: BenchConfig) -> dict:
    """One round of a `Runtime`: latency of `infer`, the stages' medians, and throughput via `submit`."""
    from parnet_cpu.runtime.runtime import StageStats

    iters, min_s = cfg.per_round()
    rt.stats = StageStats()
    stats = measure_latency(lambda: rt.infer(x), cfg.warmup, iters, min_s, batch=len(x))
    stats["stage_median_ms"] = {k: v["median_ms"] for k, v in rt.stats.summary().items()}

    def run_many(k):
        for f in [rt.submit(x) for _ in range(k)]:
            f.result()

    stats["throughput_ips"] = throughput(run_many, max(8, 4 * rt.inflight), len(x))
    return stats


def runtime_row(rt, engine: str, rounds: list[dict]) -> dict:
    row = {"engine": engine, "plan": rt.plan.kind, "plan_reason": rt.plan.reason, "inflight": rt.inflight,
           **combine_rounds(rounds)}
    stages = {k: float(np.median([r["stage_median_ms"].get(k, 0.0) for r in rounds])) for k in rounds[0]["stage_median_ms"]}
    critical = stages.get("stem", 0) + max(stages.get(f"stream{i}", 0) for i in (1, 2, 3)) + stages.get("tail", 0)
    row["stage_median_ms"] = stages
    # what is left besides the critical path: messages, copies, scheduling, and, where the groups
    # overlap, streams slowing each other down
    row["overhead_ms"] = row["median_ms"] - critical
    return row


def start_runtimes(stack: ExitStack, md: ModelDir, engines, cores_per_stream, cores, precision: str,
                   use_smt: bool, max_batch: int, log) -> tuple[dict, dict[str, str]]:
    """The runtime engines, alive together for the rounds: `auto` first (it measures both plans at load
    and caches its choice), then `multistream` on the same cores, sharing them (they never run at once)."""
    from parnet_cpu.runtime.runtime import Runtime

    runtimes, errors = {}, {}
    for engine in [e for e in ("auto", "multistream") if e in engines]:
        log(f"{engine}: starting the runtime" + (" (plan='auto' measures both plans at load unless cached)"
                                                  if engine == "auto" else "") + " ...")
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="sharing CPUs")  # our own other runtime, idle meanwhile
                runtimes[engine] = stack.enter_context(Runtime(
                    md.path, cores_per_stream=cores_per_stream, cores=cores, precision=precision, plan=engine,
                    use_smt=use_smt, max_batch=max_batch, share=bool(runtimes)))
        except Exception as exc:
            errors[engine] = f"{type(exc).__name__}: {exc}"
    return runtimes, errors


def run_bench(model_dir: str | Path, cores_per_stream, cores, precision: str | None, cfg: BenchConfig,
              use_smt: bool = False, log=print) -> dict:
    from parnet_cpu.system.cpuinfo import describe_machine, format_cpu_list, machine_summary

    md = ModelDir.open(model_dir)
    precision = precision or md.default_precision
    engines = cfg.engines or available_engines(md)
    # the CPUs the engines will run on: the explicit groups, else every CPU this process may use
    watched = sorted({c for g in cores for c in g}) if cores else sorted(os.sched_getaffinity(0))
    watch = LoadWatch(watched, cfg.require_quiet, cfg.quiet_wait_s, "benchmark", log).settle()
    rows: list[dict] = []
    with ExitStack() as stack:
        runtimes, errors = start_runtimes(stack, md, engines, cores_per_stream, cores, precision, use_smt,
                                          max(cfg.batches), log)
        rt_multi = runtimes.get("multistream")
        plan_info = rt_multi.plan.describe() if rt_multi else None
        cpus = next((rt.plan.cpus for rt in runtimes.values() if rt.plan.kind == "multistream"), None) \
            or next((rt.plan.cpus for rt in runtimes.values()), None) or sorted(os.sched_getaffinity(0))
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        errors.update({e: why for e in engines if e not in RUNTIME_ENGINES and (why := missing_inputs(md, e))})
        onnx_path = (export_onnx_for(md, Path(tmp)) if any(e in NEEDS_ONNX and e not in errors for e in engines)
                     else None)
        pinned: dict[str, PinnedEngine] = {}
        for engine in engines:
            if engine in RUNTIME_ENGINES or engine in errors:
                continue
            log(f"{engine}: building, pinned to CPUs {format_cpu_list(cpus)} ...")
            spec = EngineSpec(str(md.path), precision, len(cpus), onnx_path, cfg.calib_dir)
            try:
                pinned[engine] = stack.enter_context(PinnedEngine(engine, spec, cpus))
            except PinnedChildError as exc:
                errors[engine] = str(exc)
        watch.sample()  # the builds are not measured
        iters, min_s = cfg.per_round()
        log(f"timing {len(runtimes) + len(pinned)} engines in {cfg.rounds} interleaved rounds per batch ...")
        for b in cfg.batches:
            x = np.random.default_rng(0).standard_normal((b, *md.input_shape())).astype(np.float32)
            runners = {}
            for engine in engines:  # the order of --engines is the order within a round
                if engine in runtimes:
                    runners[engine] = lambda rt=runtimes[engine]: runtime_round(rt, x, cfg)
                elif engine in pinned:
                    runners[engine] = lambda e=pinned[engine], b=b: e.measure(b, cfg.warmup, iters, min_s)
            results, failed = interleaved_rounds(runners, cfg.rounds, between=watch.sample)
            by_engine = {}
            for engine in engines:
                if engine in errors or engine in failed or not results.get(engine):
                    rows.append({"engine": engine, "batch": b, "error": errors.get(engine) or failed.get(engine, "")})
                    continue
                row = (runtime_row(runtimes[engine], engine, results[engine]) if engine in runtimes
                       else {"engine": engine, **pinned[engine].info, **combine_rounds(results[engine])})
                if engine in INT8_ENGINES:
                    row["precision"] = "int8"
                by_engine[engine] = row
                rows.append(row)
            base = results.get(BASELINE) if BASELINE in by_engine else None
            for engine, row in by_engine.items():
                if base:
                    n = min(len(base), len(results[engine]))
                    lat = per_round_ratios([r["median_ms"] for r in results[engine][:n]], [r["median_ms"] for r in base[:n]])
                    thr = per_round_ratios([r["throughput_ips"] for r in results[engine][:n]],
                                           [r["throughput_ips"] for r in base[:n]])
                    row["latency_ratio_vs_ov_latency"] = lat["median"]
                    row["latency_ratio_range"] = [lat["min"], lat["max"]]
                    row["throughput_ratio_vs_ov_latency"] = thr["median"]
                    row["throughput_ratio_range"] = [thr["min"], thr["max"]]
        if rt_multi is not None:
            rtt = rt_multi.message_round_trip_ms()
            next(r for r in rows if r["engine"] == "multistream")["message_round_trip_ms"] = rtt
    for r in rows:
        r.setdefault("precision", precision)
    load = watch.finish(rows)
    info = describe_machine()
    return {**report_stamp("bench"), "model": str(md.path), "config": md.config,
            "precision": precision, "cpus": format_cpu_list(cpus), "threads": len(cpus), "plan": plan_info,
            "settings": asdict(cfg), "machine": machine_summary(info), "other_load": load,
            "machine_was_quiet": load["machine_was_quiet"], "rows": rows}
