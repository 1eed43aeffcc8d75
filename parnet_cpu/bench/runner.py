"""`parnet-cpu bench`: the multi-stream runtime against the best single-graph execution, same cores.

Rows (see `parnet_cpu.bench.engines` for the competing engines, each in its own pinned process):

- multistream     `Runtime` (stem+tail on all groups' cores, one stream per group)
- auto            `Runtime(plan="auto")` on the same cores: whichever plan measured faster at load (the default)
- ov-latency, ov-throughput, torch-eager, ort-parallel, torch-int8, ipex-int8: pinned to the CPUs of the plan

The runtime pins its own workers; every ratio is against ov-latency measured in the same run.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from parnet_cpu.artifacts import ModelDir, report_stamp
from parnet_cpu.bench.base import BenchConfig, throughput
from parnet_cpu.bench.engines import available_engines, export_onnx_for, run_pinned_engine
from parnet_cpu.bench.quiet import LoadWatch
from parnet_cpu.runtime.timing import measure_latency


def bench_runtime(rt, cfg: BenchConfig, engine: str = "multistream") -> list[dict]:
    from parnet_cpu.runtime.runtime import StageStats

    rows = []
    for b in cfg.batches:
        x = np.random.default_rng(0).standard_normal((b, *rt.input_shape)).astype(np.float32)
        rt.stats = StageStats()
        stats = measure_latency(lambda: rt.infer(x), cfg.warmup, cfg.iters, cfg.min_seconds, batch=b)
        stages = {k: v["median_ms"] for k, v in rt.stats.summary().items()}
        critical = stages.get("stem", 0) + max(stages.get(f"stream{i}", 0) for i in (1, 2, 3)) + stages.get("tail", 0)
        stats["stage_median_ms"] = stages
        # what is left besides the critical path: messages, copies, scheduling, and, where the groups
        # overlap, streams slowing each other down
        stats["overhead_ms"] = stats["median_ms"] - critical
        n = max(8, 4 * rt.inflight)

        def run_many(k):
            for f in [rt.submit(x) for _ in range(k)]:
                f.result()

        stats["throughput_ips"] = throughput(run_many, n, b)
        rows.append({"engine": engine, "plan": rt.plan.kind, "plan_reason": rt.plan.reason, "inflight": rt.inflight,
                     **stats})
    rows[0]["message_round_trip_ms"] = rt.message_round_trip_ms()
    return rows


def run_bench(model_dir: str | Path, cores_per_stream, cores, precision: str | None, cfg: BenchConfig,
              use_smt: bool = False, with_cost_model: bool = False, log=print) -> dict:
    from parnet_cpu.runtime.runtime import Runtime
    from parnet_cpu.system.cpuinfo import describe_machine, format_cpu_list, machine_summary

    md = ModelDir.open(model_dir)
    precision = precision or md.default_precision
    engines = cfg.engines or available_engines(md)
    # the CPUs the engines will run on: the explicit groups, else every CPU this process may use
    watched = sorted({c for g in cores for c in g}) if cores else sorted(os.sched_getaffinity(0))
    watch = LoadWatch(watched, cfg.require_quiet, cfg.quiet_wait_s, "benchmark", log).settle()
    rows: list[dict] = []
    plan_info, cpus = None, None
    if "multistream" in engines:
        log("multistream: starting pinned workers ...")
        try:
            with Runtime(md.path, cores_per_stream=cores_per_stream, cores=cores, precision=precision,
                         plan="multistream", use_smt=use_smt, max_batch=max(cfg.batches)) as rt:
                plan_info, cpus = rt.plan.describe(), rt.plan.cpus
                rows += bench_runtime(rt, cfg)
            watch.sample()
        except Exception as exc:
            rows += [{"engine": "multistream", "batch": b, "error": str(exc)} for b in cfg.batches]
    if "auto" in engines:
        log("auto: starting the runtime with plan='auto' (measures both plans at load unless cached) ...")
        try:
            with Runtime(md.path, cores_per_stream=cores_per_stream, cores=cores, precision=precision,
                         plan="auto", use_smt=use_smt, max_batch=max(cfg.batches)) as rt:
                cpus = cpus or rt.plan.cpus
                rows += bench_runtime(rt, cfg, "auto")
            watch.sample()
        except Exception as exc:
            rows += [{"engine": "auto", "batch": b, "error": str(exc)} for b in cfg.batches]
    if cpus is None:
        cpus = sorted(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx_for(md, Path(tmp)) if "ort-parallel" in engines else None
        for engine in engines:
            if engine in ("multistream", "auto"):
                continue
            log(f"{engine}: pinned to CPUs {format_cpu_list(cpus)} ...")
            rows += run_pinned_engine(engine, md.path, precision, cpus, cfg, onnx_path)
            watch.sample()
    load = watch.finish(rows)
    for r in rows:
        r.setdefault("precision", precision)
    baseline = {r["batch"]: r for r in rows if r["engine"] == "ov-latency" and "error" not in r}
    for r in rows:
        base = baseline.get(r["batch"])
        if base and "error" not in r:
            r["latency_ratio_vs_ov_latency"] = r["median_ms"] / base["median_ms"]
            r["throughput_ratio_vs_ov_latency"] = r["throughput_ips"] / base["throughput_ips"]
    info = describe_machine()
    model = None
    if with_cost_model:
        from parnet_cpu.bench.scaling import cost_model

        log("cost model: timing every stage at 1..N threads ...")
        # a request crosses three hand-overs (stem -> streams -> tail -> caller), each a message round trip
        rtt = next((r["message_round_trip_ms"] for r in rows if "message_round_trip_ms" in r), None)
        model = cost_model(md.path, precision, handover_ms=3 * rtt if rtt is not None else 0.0)
        model["handover_source"] = ("3 x measured parent-worker message round trip" if rtt is not None
                                    else "not measured (no multi-stream run): 0")
    return {**report_stamp("bench"), "cost_model": model, "model": str(md.path), "config": md.config, "precision": precision, "cpus": format_cpu_list(cpus),
            "threads": len(cpus), "plan": plan_info, "settings": asdict(cfg),
            "machine": machine_summary(info), "other_load": load, "machine_was_quiet": load["machine_was_quiet"],
            "rows": rows}
