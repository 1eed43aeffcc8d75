"""HTTP load on `parnet-cpu serve`: throughput and p50/p99 latency per concurrency, batching on vs off.

    python benchmarks/serve_load.py [--model DIR] [--variant parnet_s] [--concurrency 1,4,16,64]
                                    [--requests 300] [--seconds 10] [--endpoint v2|classify]

Starts the real server twice on a free loopback port (never another address): dynamic batching on
(`--max-batch 8 --max-wait-ms 2`) and off (`--max-batch 1`); both keep `inflight` 2 batches in the
runtime. At each concurrency level, that many closed-loop clients send requests back to back until
`--requests` have completed or `--seconds` have passed, whichever is first. Each request is one image:
`v2` = KServe v2 infer with the binary tensor extension (no JSON float parsing), `classify` = a JPEG
from calibration/sample to /v1/classify (decode + resize on the server too).

The load generator runs on the same machine as the server and takes some of its CPU: figures are
for the server *and* its clients sharing the cores. Random weights (latency does not depend on them);
FP32 (INFERENCE_PRECISION_HINT=f32). Writes benchmarks/results/serve_load.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import OtherLoad, machine_summary, other_busy_processes, print_table, usable_cores, write_result

REPO = Path(__file__).resolve().parents[1]
MODES = {"batching": ["--max-batch", "8", "--max-wait-ms", "2"], "no_batching": ["--max-batch", "1"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_model(variant: str, out: Path) -> Path:
    from parnet_cpu.export import export_model_dir
    from parnet_cpu.models.parnet import create_model

    return export_model_dir(create_model(variant), out)


class Server:
    """`python -m parnet_cpu.cli.serve` on 127.0.0.1:<free port>, logs to files, SIGTERM on exit."""

    def __init__(self, model: Path, logdir: Path, extra: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "parnet_cpu.cli.serve", "--model-dir", str(model), "--host", "127.0.0.1",
               "--port", str(self.port), "--precision", "fp32", "--no-access-log", *extra]
        self.log = logdir / f"server_{self.port}.log"
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONPATH": str(REPO)})

    def wait_ready(self, timeout: float = 120.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/v2/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not become ready")

    def __enter__(self) -> "Server":
        try:
            self.wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def make_request(endpoint: str, shape: tuple[int, ...]) -> tuple[str, bytes, dict]:
    """(path, body, headers) of the one request every client repeats."""
    if endpoint == "classify":
        photo = REPO / "calibration" / "sample" / "cat_chelsea.jpg"
        return "/v1/classify?top_k=5", photo.read_bytes(), {"content-type": "image/jpeg"}
    x = np.random.default_rng(0).standard_normal((1, *shape)).astype("<f4")
    head = json.dumps({"inputs": [{"name": "input", "shape": [1, *shape], "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
    return "/v2/models/parnet/infer", head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head))}


async def closed_loop(url: str, request: tuple[str, bytes, dict], concurrency: int, max_requests: int,
                      seconds: float) -> dict:
    """`concurrency` clients, each sending the next request as soon as its previous answer arrives."""
    import httpx

    path, body, headers = request
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    issued = 0
    deadline = time.perf_counter() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal issued
        while issued < max_requests and time.perf_counter() < deadline:
            issued += 1
            t0 = time.perf_counter()
            try:
                r = await http.post(path, content=body, headers=headers)
                code = r.status_code
            except httpx.HTTPError:
                code = -1
            if code == 200:
                latencies.append(time.perf_counter() - t0)
            statuses[code] = statuses.get(code, 0) + 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    lat = np.asarray(latencies) * 1e3 if latencies else np.asarray([np.nan])
    return {"concurrency": concurrency, "completed": len(latencies), "statuses": statuses, "wall_s": round(wall, 3),
            "throughput_rps": len(latencies) / wall, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "mean_ms": float(lat.mean()), "max_ms": float(lat.max())}


def batch_counters(url: str) -> tuple[float, float]:
    """(batches, images) so far, from the server's batch-size histogram."""
    import httpx

    text = httpx.get(url + "/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line.startswith(("parnet_batch_size_count ", "parnet_batch_size_sum "))}
    return values.get("parnet_batch_size_count", 0.0), values.get("parnet_batch_size_sum", 0.0)


def add_server_bench_args(ap: argparse.ArgumentParser, concurrency: int, rounds_help: str) -> None:
    """The options every server-vs-server benchmark takes (model, clients, time, rounds, warm-up, note)."""
    ap.add_argument("--model", type=Path, help="model folder (default: export --variant with random weights)")
    ap.add_argument("--variant", default="parnet_s")
    ap.add_argument("--concurrency", type=int, default=concurrency)
    ap.add_argument("--seconds", type=float, default=10.0, help="timed seconds per measurement")
    ap.add_argument("--rounds", type=int, default=2, help=rounds_help)
    ap.add_argument("--warmup", type=int, default=16, help="untimed requests after each start")
    ap.add_argument("--note", default="", help="what else ran on the machine (goes into the JSON)")


def measure_server(kind: str, make_server, request: tuple[str, bytes, dict], concurrency: int, warmup: int,
                   seconds: float, warmup_timeout_s: float = 60.0) -> dict:
    """Start a server (`make_server()`, a context manager with `.url`), warm it up with 4 clients, then
    `concurrency` closed-loop clients for `seconds`: the row, with the server's start-up seconds."""
    t0 = time.perf_counter()
    with make_server() as srv:
        start_s = time.perf_counter() - t0
        asyncio.run(closed_loop(srv.url, request, 4, warmup, warmup_timeout_s))
        row = asyncio.run(closed_loop(srv.url, request, concurrency, 10**9, seconds))
    row.update(kind=kind, start_s=round(start_s, 1))
    print(f"  {kind:8s} c={concurrency}: {row['throughput_rps']:7.1f} req/s  p50 {row['p50_ms']:7.1f} ms  "
          f"p99 {row['p99_ms']:7.1f} ms  {row['statuses']}  (ready after {start_s:.0f} s)", flush=True)
    return row


def interleaved_rounds(kinds: tuple[str, ...], measure, rounds: int, reverse_odd: bool = False) -> list[dict]:
    """`measure(kind)` for every kind, round after round (A B C A B C ..., or A B C C B A ... with
    `reverse_odd`), so drift on a shared machine falls on every kind; each row gets its round number."""
    rows = []
    for r in range(rounds):
        for kind in (kinds[::-1] if reverse_odd and r % 2 else kinds):
            rows.append({**measure(kind), "round": r + 1})
    return rows


def throughput_by_kind(rows: list[dict]) -> dict[str, float]:
    """Requests per second of each kind over all its rounds (completed / wall, summed)."""
    kinds = dict.fromkeys(row["kind"] for row in rows)
    return {k: sum(x["completed"] for x in rows if x["kind"] == k) / sum(x["wall_s"] for x in rows if x["kind"] == k)
            for k in kinds}


def round_ratios(rows: list[dict], num: str, den: str) -> list[float]:
    """Throughput of `num` over `den` within each round."""
    by = {(row["round"], row["kind"]): row["throughput_rps"] for row in rows}
    return [by[r, num] / by[r, den] for r in sorted({row["round"] for row in rows})]


def run_mode(model: Path, logdir: Path, mode: str, args: argparse.Namespace, shape: tuple[int, ...]) -> list[dict]:
    rows = []
    request = make_request(args.endpoint, shape)
    with Server(model, logdir, MODES[mode]) as srv:
        asyncio.run(closed_loop(srv.url, request, 4, args.warmup, 30))
        for c in args.concurrency:
            b0, i0 = batch_counters(srv.url)
            row = asyncio.run(closed_loop(srv.url, request, c, args.requests, args.seconds))
            b1, i1 = batch_counters(srv.url)
            row.update(mode=mode, mean_batch=(i1 - i0) / max(1.0, b1 - b0))
            rows.append(row)
            print(f"  {mode:12s} c={c:3d}: {row['throughput_rps']:7.1f} req/s  p50 {row['p50_ms']:7.1f} ms  "
                  f"p99 {row['p99_ms']:7.1f} ms  batch {row['mean_batch']:.2f}  {row['statuses']}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, help="model folder (default: export --variant with random weights)")
    ap.add_argument("--variant", default="parnet_s")
    ap.add_argument("--concurrency", default="1,4,16,64", help="comma-separated client counts")
    ap.add_argument("--requests", type=int, default=300, help="at most this many requests per level")
    ap.add_argument("--seconds", type=float, default=10.0, help="at most this long per level")
    ap.add_argument("--warmup", type=int, default=16, help="untimed requests after each server start")
    ap.add_argument("--endpoint", choices=("v2", "classify"), default="v2")
    args = ap.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]

    busy = other_busy_processes()
    if busy:
        print("WARNING: other processes are busy, timings will be noisy: " + ", ".join(busy))
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="parnet_serve_load_") as tmp, OtherLoad(exclude_children=True) as load:
        tmp = Path(tmp)
        model = args.model or export_model(args.variant, tmp / "model")
        from parnet_cpu.artifacts import ModelDir

        shape = ModelDir.open(model).input_shape()
        rows = []
        for mode in MODES:
            rows += run_mode(model, tmp, mode, args, shape)
    print()
    print_table(rows, ["mode", "concurrency", "completed", "throughput_rps", "p50_ms", "p99_ms", "mean_batch"])
    if not load.quiet:
        print("WARNING: other processes used the CPU during the run (see other_load_during_run)")
    payload = {
        "benchmark": "serve_load",
        "description": "closed-loop HTTP clients on loopback against parnet-cpu serve; one image per request; "
                       "latency = request sent to response received at the client",
        "endpoint": args.endpoint, "model": str(args.model) if args.model else f"{args.variant} (random weights)",
        "input_shape": list(shape), "precision": "fp32", "modes": MODES,
        "requests_per_level_max": args.requests, "seconds_per_level_max": args.seconds, "warmup": args.warmup,
        "client": "httpx.AsyncClient on the same machine as the server (shares its cores)",
        "machine": machine_summary(usable_cores()), "busy_processes_at_start": busy,
        "other_load_during_run": load.summary(), "machine_was_quiet": load.quiet,
        "wall_seconds": round(time.time() - t_start, 1), "results": rows,
    }
    print(f"wrote {write_result('serve_load', payload)} ({payload['wall_seconds']} s)")


if __name__ == "__main__":
    main()
