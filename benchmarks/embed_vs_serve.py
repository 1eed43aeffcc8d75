"""The embedded FastAPI example (public `Batcher` on a `Runtime`) against `parnet-cpu serve`, same run.

    python benchmarks/embed_vs_serve.py [--model DIR] [--variant parnet_s] [--concurrency 32]
                                        [--seconds 10] [--rounds 2]

Both answer `POST` of the same JPEG (calibration/sample/cat_chelsea.jpg) with its top-5 classes: serve's
`/v1/classify` and examples/fastapi_app.py's `/classify` under uvicorn (one worker), each with dynamic
batching max 8 images / 2 ms and the runtime on every free core. Rounds alternate serve, embed, serve,
embed... so drift on a shared machine falls on both; the ratio embed / serve is given per round and
overall. Closed-loop clients (`serve_load.closed_loop`) run on the same cores as the servers. Random
weights, FP32. Writes benchmarks/results/embed_vs_serve.json.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import OtherLoad, machine_summary, other_busy_processes, print_table, usable_cores, write_result
from serve_load import Server, add_server_bench_args, export_model, free_port, interleaved_rounds, measure_server, round_ratios, throughput_by_kind

REPO = Path(__file__).resolve().parents[1]
PHOTO = REPO / "calibration" / "sample" / "cat_chelsea.jpg"
BATCHING = {"max_batch": 8, "max_wait_ms": 2}


class Embedded(Server):
    """examples/fastapi_app.py under uvicorn (one worker) on 127.0.0.1:<free port>."""

    def __init__(self, model: Path, logdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = logdir / f"embed_{self.port}.log"
        env = {**os.environ, "PYTHONPATH": str(REPO), "PARNET_MODEL_DIR": str(model), "WEB_CONCURRENCY": "1",
               "PARNET_MAX_BATCH": str(BATCHING["max_batch"]), "PARNET_MAX_WAIT_MS": str(BATCHING["max_wait_ms"])}
        cmd = [sys.executable, "-m", "uvicorn", "examples.fastapi_app:app", "--host", "127.0.0.1", "--port",
               str(self.port), "--no-access-log"]
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 120.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"example exited ({self.proc.returncode}):\n{self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("example did not become ready")


def measure(kind: str, model: Path, logdir: Path, args) -> dict:
    request = (("/v1/classify" if kind == "serve" else "/classify") + "?top_k=5", PHOTO.read_bytes(),
               {"content-type": "image/jpeg"})
    serve_args = ["--max-batch", str(BATCHING["max_batch"]), "--max-wait-ms", str(BATCHING["max_wait_ms"])]
    return measure_server(kind, lambda: Server(model, logdir, serve_args) if kind == "serve" else Embedded(model, logdir),
                          request, args.concurrency, args.warmup, args.seconds, warmup_timeout_s=30)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_server_bench_args(ap, 32, "serve/embed pairs, alternating")
    args = ap.parse_args(argv)

    busy = other_busy_processes()
    if busy:
        print("WARNING: other processes are busy, timings will be noisy: " + ", ".join(busy))
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="parnet_embed_vs_serve_") as tmp, OtherLoad(exclude_children=True) as load:
        tmp = Path(tmp)
        model = args.model or export_model(args.variant, tmp / "model")
        rows = interleaved_rounds(("serve", "embed"), lambda kind: measure(kind, model, tmp, args), args.rounds)
    ratios = round_ratios(rows, "embed", "serve")
    total = throughput_by_kind(rows)
    ratio = total["embed"] / total["serve"]
    print()
    print_table(rows, ["round", "kind", "completed", "throughput_rps", "p50_ms", "p99_ms"])
    print(f"embed / serve throughput at {args.concurrency} clients: {ratio:.3f} (rounds: "
          f"{', '.join(f'{x:.3f}' for x in ratios)})")
    if not load.quiet:
        print("WARNING: other processes used the CPU during the run (see other_load_during_run)")
    payload = {
        "benchmark": "embed_vs_serve",
        "description": "examples/fastapi_app.py (public Batcher on a Runtime, uvicorn 1 worker) vs parnet-cpu serve "
                       "/v1/classify; the same JPEG, top-5; closed-loop clients on the same machine; rounds "
                       "alternate serve and embed",
        "model": str(args.model) if args.model else f"{args.variant} (random weights)", "precision": "fp32",
        "batching": BATCHING, "concurrency": args.concurrency, "seconds_per_measurement": args.seconds,
        "rounds": args.rounds, "throughput_rps": total, "ratio_embed_over_serve": ratio, "ratio_per_round": ratios,
        "note": args.note, "machine": machine_summary(usable_cores()), "busy_processes_at_start": busy,
        "other_load_during_run": load.summary(), "machine_was_quiet": load.quiet,
        "wall_seconds": round(time.time() - t_start, 1), "results": rows,
    }
    print(f"wrote {write_result('embed_vs_serve', payload)} ({payload['wall_seconds']} s)")


if __name__ == "__main__":
    main()
