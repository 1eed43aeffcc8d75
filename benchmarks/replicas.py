"""Replicas vs OpenVINO multi-stream on the same cores: throughput and p50/p99 per count, one run.

    python benchmarks/replicas.py --model DIR [--precision int8] [--seconds 3] [--repeats 3] [--clients N]

For every replica count worth trying on the free cores (`replica_counts`: 1 and 2 on a 2-core machine):
- `replicas`: `parnet_cpu.serve.replicas.ReplicaSet` (N single-graph Runtimes, each on its own leased
  cores, N = 1 is one Runtime on all of them);
- `ov-streams`: one OpenVINO compiled model on all the same cores with NUM_STREAMS = N (THROUGHPUT
  hint, as OpenVINO's own multi-stream mode does it), one infer request per caller.
Each configuration gets the same closed-loop load (`--clients` callers, default 2 x the most replicas),
batch 1, for `--seconds`; configurations are interleaved and repeated (`--repeats`) so drift in the
machine's load shows as spread between repeats, not as a difference between configurations. Run it
under /tmp/quiet.sh on a shared machine. Writes benchmarks/results/replicas_<name>.json.
"""
from __future__ import annotations

import argparse
import queue
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OtherLoad, machine_summary, print_table, write_result  # noqa: E402


class OvStreams:
    """One compiled model with `streams` OpenVINO streams on this process's cores, behind submit()."""

    def __init__(self, ir: Path, precision: str, streams: int, threads: int, callers: int) -> None:
        from parnet_cpu.runtime.engine import CompileOptions, compile_model

        self.compiled = compile_model(ir, CompileOptions(precision=precision, hint="THROUGHPUT", num_streams=streams,
                                                         num_threads=threads))
        self.requests: queue.Queue = queue.Queue()
        for _ in range(callers):
            self.requests.put(self.compiled.create_infer_request())
        self.pool = ThreadPoolExecutor(callers)

    def _run(self, x: np.ndarray) -> np.ndarray:
        req = self.requests.get()
        try:
            return req.infer({0: x})[0].copy()
        finally:
            self.requests.put(req)

    def submit(self, x: np.ndarray):
        return self.pool.submit(self._run, x)

    def close(self) -> None:
        self.pool.shutdown()


def main() -> int:
    from parnet_cpu.artifacts import ModelDir
    from parnet_cpu.runtime.leases import available_cores
    from parnet_cpu.serve.replicas import ReplicaSet, closed_loop, replica_counts

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--precision", default=None)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clients", type=int)
    ap.add_argument("--name", default="parnet_s")
    args = ap.parse_args()

    md = ModelDir.open(args.model)
    precision = args.precision or md.default_precision
    free = len(available_cores())
    counts = replica_counts(free)
    clients = args.clients or 2 * max(counts)
    x = np.zeros((1, *md.input_shape()), np.float32)
    samples: dict[tuple[str, int], list] = {}
    with OtherLoad() as load:
        for rep in range(args.repeats):
            for n in counts:
                for engine in ("replicas", "ov-streams"):
                    if engine == "replicas":
                        runner = ReplicaSet(md.path, n, precision=precision, max_batch=1, inflight=2)
                    else:
                        runner = OvStreams(md.ir_path(precision), precision, n, free, clients)
                    try:
                        res = closed_loop(runner.submit, x, clients, args.seconds, warmup=10)
                    finally:
                        runner.close()
                    samples.setdefault((engine, n), []).append(res.to_dict())
                    print(f"repeat {rep + 1}: {engine:<10} N={n}: {res.throughput_ips:7.1f} img/s  "
                          f"p50 {res.p50_ms:6.2f} ms  p99 {res.p99_ms:6.2f} ms", flush=True)
    rows = []
    for (engine, n), runs in samples.items():
        tput = [r["throughput_ips"] for r in runs]
        rows.append({"engine": engine, "count": n, "cores_each": free // n if engine == "replicas" else free,
                     "img_per_s": statistics.median(tput), "img_per_s_min": min(tput), "img_per_s_max": max(tput),
                     "p50_ms": statistics.median(r["p50_ms"] for r in runs),
                     "p99_ms": statistics.median(r["p99_ms"] for r in runs),
                     "p99_ms_max": max(r["p99_ms"] for r in runs)})
    print_table(rows, ["engine", "count", "cores_each", "img_per_s", "img_per_s_min", "img_per_s_max", "p50_ms",
                       "p99_ms", "p99_ms_max"])
    path = write_result(f"replicas_{args.name}", {
        "what": "closed-loop batch-1 load on the same cores: N replicas (single-graph Runtimes on disjoint leased "
                "cores) vs one OpenVINO compiled model with N streams; medians over interleaved repeats",
        "model": str(md.path), "precision": precision, "clients": clients, "seconds": args.seconds,
        "repeats": args.repeats, "free_cores": free, "rows": rows, "runs": {f"{e}/{n}": r for (e, n), r in samples.items()},
        "other_load": load.summary(), "machine": machine_summary(free), "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
