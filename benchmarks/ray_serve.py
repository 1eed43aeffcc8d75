"""Ray Serve (2 replicas) against `parnet-cpu serve --replicas 2` and one runtime, same run.

    bash scripts/ray_env.sh  # once: the Ray venv (default ~/.cache/parnet-cpu/ray-venv)
    ~/.cache/parnet-cpu/ray-venv/bin/python benchmarks/ray_serve.py [--model DIR] [--variant parnet_s]
        [--concurrency 16] [--seconds 10] [--rounds 2] [--replicas 2]

Three servers answer `POST /v1/classify` of the same JPEG (calibration/sample/cat_chelsea.jpg) with its
top-5, each with dynamic batching max 8 images / 2 ms, FP32, on the same free cores: `parnet-cpu serve
--ray --replicas N` (a local Ray instance, N replicas each leasing 1/N of the cores, Ray's proxy in front),
`parnet-cpu serve --replicas N` (N runtimes on disjoint cores in one process, one batcher) and `parnet-cpu
serve` (one runtime on all cores). Rounds alternate the three so drift on a shared machine falls on all;
closed-loop clients run on the same machine. Writes benchmarks/results/ray_serve.json with the ratios.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from common import OtherLoad, machine_summary, other_busy_processes, print_table, usable_cores, write_result
from serve_load import Server, add_server_bench_args, export_model, interleaved_rounds, measure_server, round_ratios, throughput_by_kind

REPO = Path(__file__).resolve().parents[1]
PHOTO = REPO / "calibration" / "sample" / "cat_chelsea.jpg"
BATCHING = ["--max-batch", "8", "--max-wait-ms", "2"]
KINDS = ("ray", "replicas", "runtime")


class RayServer(Server):
    """`parnet-cpu serve --ray --replicas N`: starts (and at SIGTERM stops) its own local Ray instance."""

    def wait_ready(self, timeout: float = 600.0) -> None:
        super().wait_ready(timeout)

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        deadline = time.monotonic() + 60  # the next server needs the cores the replicas leased
        while time.monotonic() < deadline and replicas_alive():
            time.sleep(0.5)


def replicas_alive() -> bool:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::ServeReplica"):
                return True
        except OSError:  # ended meanwhile
            continue
    return False


def server(kind: str, model: Path, logdir: Path, replicas: int) -> Server:
    if kind == "ray":
        return RayServer(model, logdir, [*BATCHING, "--ray", "--replicas", str(replicas)])
    if kind == "replicas":
        return Server(model, logdir, [*BATCHING, "--replicas", str(replicas)])
    return Server(model, logdir, BATCHING)


def measure(kind: str, model: Path, logdir: Path, args) -> dict:
    request = ("/v1/classify?top_k=5", PHOTO.read_bytes(), {"content-type": "image/jpeg"})
    return measure_server(kind, lambda: server(kind, model, logdir, args.replicas), request, args.concurrency,
                          args.warmup, args.seconds)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_server_bench_args(ap, 16, "ray/replicas/runtime triples, alternating")
    ap.add_argument("--replicas", type=int, default=2)
    args = ap.parse_args(argv)

    busy = other_busy_processes()
    if busy:
        print("WARNING: other processes are busy, timings will be noisy: " + ", ".join(busy))
    t_start = time.time()
    # the servers' core leases in a namespace of this run: other sessions' runtimes on this machine neither
    # refuse these servers nor are refused by them (they still share the CPUs: see other_load_during_run)
    os.environ["PARNET_CPU_LEASE_DIR"] = tempfile.mkdtemp(prefix="parnet_ray_serve_leases_")
    with tempfile.TemporaryDirectory(prefix="parnet_ray_serve_") as tmp, OtherLoad(exclude_children=True) as load:
        tmp = Path(tmp)
        model = args.model or export_model(args.variant, tmp / "model")
        rows = interleaved_rounds(KINDS, lambda kind: measure(kind, model, tmp, args), args.rounds, reverse_odd=True)
    per_round = round_ratios(rows, "ray", "replicas")
    total = throughput_by_kind(rows)
    ratio = total["ray"] / total["replicas"]
    print()
    print_table(rows, ["round", "kind", "completed", "throughput_rps", "p50_ms", "p99_ms", "start_s"])
    print(f"Ray Serve / serve --replicas {args.replicas} throughput at {args.concurrency} clients: {ratio:.3f} "
          f"(rounds: {', '.join(f'{x:.3f}' for x in per_round)}); ray / one runtime: "
          f"{total['ray'] / total['runtime']:.3f}; target: within 15% (>= 0.85)")
    if not load.quiet:
        print("WARNING: other processes used the CPU during the run (see other_load_during_run)")
    payload = {
        "benchmark": "ray_serve",
        "description": f"parnet-cpu serve --ray --replicas {args.replicas} (local Ray instance, Ray Serve proxy, "
                       f"replicas on leased disjoint cores) vs serve --replicas {args.replicas} vs serve (one "
                       "runtime); /v1/classify of the same JPEG, top-5; batching max 8 / 2 ms; closed-loop clients "
                       "on the same machine; rounds alternate the three",
        "model": str(args.model) if args.model else f"{args.variant} (random weights)", "precision": "fp32",
        "concurrency": args.concurrency, "seconds_per_measurement": args.seconds, "rounds": args.rounds,
        "throughput_rps": total, "ratio_ray_over_replicas": ratio, "ratio_ray_over_replicas_per_round": per_round,
        "ratio_ray_over_one_runtime": total["ray"] / total["runtime"], "target": "ray within 15% of serve --replicas",
        "note": args.note, "machine": machine_summary(usable_cores()), "busy_processes_at_start": busy,
        "other_load_during_run": load.summary(), "machine_was_quiet": load.quiet,
        "wall_seconds": round(time.time() - t_start, 1), "results": rows,
    }
    print(f"wrote {write_result('ray_serve', payload)} ({payload['wall_seconds']} s)")


if __name__ == "__main__":
    main()
