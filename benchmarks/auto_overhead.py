"""What the runtime's single-graph plan (what `auto` picks when multi-stream loses) costs over calling
OpenVINO directly, on the same cores, timed in interleaved blocks so that drift of the machine hits both
alike. On every CPU of the process the plan runs in the process itself; on fewer CPUs it runs in a pinned
worker process with shared-memory hand-over (`--cores` below the process's CPUs measures that path).

    python benchmarks/auto_overhead.py --model OUT [--model OUT2 ...] [--batches 1,8] [--rounds 30] [--cores 0-3]

Result: `benchmarks/results/auto_overhead.json` (per model and batch: both medians, their ratio, the
runtime's own inference time, and the parent<->worker message round trip, 0 in-process).
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from common import OtherLoad, machine_summary, print_table, usable_cores, write_result


def interleaved(a, b, rounds: int, block: int = 10) -> tuple[float, float]:
    """Medians (ms) of `a()` and `b()`, timed in alternating blocks of `block` calls."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(3):
        a(), b()
    for _ in range(rounds):
        for fn, out in ((a, times[0]), (b, times[1])):
            for _ in range(block):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
    return float(np.median(times[0]) * 1e3), float(np.median(times[1]) * 1e3)


def measure(model_dir: str, batches: list[int], rounds: int, cores: str | None) -> list[dict]:
    from parnet_cpu import Runtime
    from parnet_cpu.artifacts import ModelDir
    from parnet_cpu.runtime.engine import CompileOptions, compile_model
    from parnet_cpu.runtime.runtime import StageStats

    md = ModelDir.open(model_dir)
    rows = []
    with Runtime(model_dir, plan="single", cores=cores, max_batch=max(batches)) as rt:
        before = os.sched_getaffinity(0)
        os.sched_setaffinity(0, rt.plan.cpus)  # the direct model's threads start from here: same CPUs
        try:
            direct = compile_model(rt.ir_path, CompileOptions(precision=rt.precision, num_threads=len(rt.plan.cpus)))
        finally:
            os.sched_setaffinity(0, before)
        for b in batches:
            x = np.random.default_rng(0).standard_normal((b, *md.input_shape())).astype(np.float32)
            rt.stats = StageStats()
            runtime_ms, direct_ms = interleaved(lambda: rt.infer(x), lambda: direct(x), rounds)
            rows.append({"model": md.manifest.get("source", {}).get("model") or model_dir, "precision": rt.precision, "batch": b,
                         "runtime_single_ms": runtime_ms, "direct_ms": direct_ms,
                         "ratio": runtime_ms / direct_ms, "overhead_ms": runtime_ms - direct_ms,
                         "runtime_infer_ms": rt.stats.summary()["model"]["median_ms"],
                         "message_round_trip_ms": rt.message_round_trip_ms(), "cpus": rt.plan.cpus,
                         "plan_reason": rt.plan.reason})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, help="model folder (repeatable)")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--cores", help="CPU list for the runtime and the direct model (default: all usable)")
    p.add_argument("--rounds", type=int, default=30, help="interleaved blocks of 10 calls per engine")
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    with OtherLoad(exclude_children=True) as load:
        rows = [r for m in args.model for r in measure(m, batches, args.rounds, args.cores)]
    print_table(rows, ["model", "precision", "batch", "runtime_single_ms", "direct_ms", "ratio", "overhead_ms",
                       "runtime_infer_ms", "message_round_trip_ms"])
    path = write_result("auto_overhead", {
        "benchmark": "auto_overhead", "description": __doc__.split("\n\n")[0].replace("\n", " "),
        "rounds": args.rounds, "rows": rows, "machine": machine_summary(usable_cores()),
        "other_load_during_run": load.summary(), "machine_was_quiet": load.quiet})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
