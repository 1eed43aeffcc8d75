"""Hot path before/after: the same calls on two source trees, measured in interleaved rounds in one run.

Why: guards (option validation, fork checks, bounded decoding, manifest digests) must cost nothing per call.
Timing two trees minutes apart on a shared machine measures the noise, so each round times tree A then tree B
(order alternating per round) and the ratio B/A is taken per round; the report gives its median and range.

    git worktree add /tmp/parnet-before <old-commit>
    python3 benchmarks/hotpath_ab.py --before /tmp/parnet-before [--rounds 8 --calls 40]

Measured per tree (each in its own process, importing parnet_cpu from that tree):
- `Runtime.infer` on one image, single graph (in-process) and multi-stream (three pinned workers);
- `serve`: `/v1/classify` with a shipped JPEG and KServe v2 binary `infer`, one request at a time.
Each tree exports its own narrow model folder (same seed), so a manifest format change does not matter.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHOTO = REPO / "parnet_cpu" / "assets" / "calibration_sample" / "cat_chelsea.jpg"

EXPORT = """
import sys, importlib.util
spec = importlib.util.spec_from_file_location("conftest_ab", sys.argv[1] + "/tests/conftest.py")
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
mod.export_narrow(sys.argv[2])
"""

# A long-lived worker: opens a Runtime, then answers "run N" with N call latencies in ms.
WORKER = """
import json, sys, time
import numpy as np
import parnet_cpu
from parnet_cpu.runtime import Runtime
folder, plan = sys.argv[1], sys.argv[2]
cpus = sorted(__import__("os").sched_getaffinity(0))
kw = dict(cores=[[cpus[0]], [cpus[-1]], [cpus[0]]], share=True) if plan == "multistream" else dict(share=True)
rt = Runtime(folder, plan=plan, precision="fp32", **kw)
x = np.random.default_rng(0).standard_normal((1, *rt.input_shape)).astype(np.float32)
for _ in range(10):
    rt.infer(x)
print(json.dumps({"ready": parnet_cpu.__file__, "plan": rt.plan.kind}), flush=True)
for line in sys.stdin:
    n = int(line)
    out = []
    for _ in range(n):
        t = time.perf_counter(); rt.infer(x); out.append((time.perf_counter() - t) * 1e3)
    print(json.dumps(out), flush=True)
rt.close()
"""


def env_for(src: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(src)}


def export(src: Path, folder: Path) -> None:
    subprocess.run([sys.executable, "-c", EXPORT, str(src), str(folder)], env=env_for(src), cwd=src, check=True,
                   capture_output=True)


class RuntimeWorker:
    def __init__(self, src: Path, folder: Path, plan: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, str(folder), plan], env=env_for(src), cwd=src,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        hello = json.loads(self.proc.stdout.readline())
        if not hello["ready"].startswith(str(src)):
            raise SystemExit(f"worker imported {hello['ready']}, not the tree {src}")
        self.kind = hello["plan"]

    def run(self, n: int) -> list[float]:
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, src: Path, folder: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        with open(log, "wb") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", "parnet_cpu", "serve", "--model-dir", str(folder),
                                          "--port", str(self.port), "--share-cores", "--no-access-log",
                                          "--log-level", "warning"], env=env_for(src), cwd=src, stdout=fh, stderr=fh)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server from {src} exited: {log.read_text()[-2000:]}")
            try:
                if urllib.request.urlopen(self.url + "/v2/health/ready", timeout=1).status == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise SystemExit(f"server from {src} did not start")

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> float:
        req = urllib.request.Request(self.url + path, data=body, headers=headers, method="POST")
        t = time.perf_counter()
        with urllib.request.urlopen(req, timeout=60) as resp:
            resp.read()
            if resp.status != 200:
                raise SystemExit(f"{path}: HTTP {resp.status}")
        return (time.perf_counter() - t) * 1e3

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def v2_binary(shape: tuple[int, ...]) -> tuple[bytes, dict[str, str]]:
    import numpy as np

    raw = np.random.default_rng(0).standard_normal(shape).astype("<f4").tobytes()
    head = json.dumps({"inputs": [{"name": "input", "shape": list(shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}


def interleave(a, b, rounds: int) -> dict:
    """Time a() and b() in alternating order; per-round medians and the per-round ratio b/a."""
    ma, mb, ratios = [], [], []
    for r in range(rounds):
        first, second = (a, b) if r % 2 == 0 else (b, a)
        x, y = first(), second()
        ta, tb = (x, y) if r % 2 == 0 else (y, x)
        ma.append(statistics.median(ta))
        mb.append(statistics.median(tb))
        ratios.append(mb[-1] / ma[-1])
    return {"before_median_ms": statistics.median(ma), "after_median_ms": statistics.median(mb),
            "ratio_after_over_before": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
            "rounds": rounds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", type=Path, required=True, help="source tree of the older commit (a git worktree)")
    ap.add_argument("--after", type=Path, default=REPO, help="source tree of the newer commit (default: this one)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--calls", type=int, default=40, help="calls per tree per round")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "hotpath_ab.json")
    args = ap.parse_args()
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    for name, src in trees.items():
        if not (src / "parnet_cpu" / "__init__.py").is_file():
            raise SystemExit(f"--{name} {src}: not a parnet-cpu source tree")
    sys.path.insert(0, str(trees["after"]))
    from parnet_cpu.system.cpuinfo import machine_summary

    results: dict = {"trees": {k: str(v) for k, v in trees.items()}, "machine": machine_summary(),
                     "calls_per_round": args.calls, "note": "narrow ParNet-S (64x64), batch 1, FP32"}
    commits = {}
    for name, src in trees.items():
        try:
            commits[name] = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"],
                                           capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commits[name] = None
    results["commits"] = commits
    with tempfile.TemporaryDirectory(prefix="parnet-ab-") as tmp:
        folders = {name: Path(tmp) / name for name in trees}
        for name, src in trees.items():
            export(src, folders[name])
        for plan in ("single", "multistream"):
            w = {name: RuntimeWorker(trees[name], folders[name], plan) for name in trees}
            try:
                results[f"runtime_{plan}"] = interleave(lambda: w["before"].run(args.calls),
                                                        lambda: w["after"].run(args.calls), args.rounds)
            finally:
                for x in w.values():
                    x.close()
        servers = {name: Server(trees[name], folders[name], Path(tmp) / f"{name}.log") for name in trees}
        try:
            jpeg = PHOTO.read_bytes()
            body, head = v2_binary((1, 3, 64, 64))

            def classify(s: Server):
                return lambda: [s.post("/v1/classify?top_k=5", jpeg, {"Content-Type": "image/jpeg"})
                                for _ in range(args.calls)]

            def v2(s: Server):
                return lambda: [s.post("/v2/models/parnet/infer", body, head) for _ in range(args.calls)]

            results["serve_classify_jpeg"] = interleave(classify(servers["before"]), classify(servers["after"]),
                                                        args.rounds)
            results["serve_v2_binary"] = interleave(v2(servers["before"]), v2(servers["after"]), args.rounds)
        finally:
            for s in servers.values():
                s.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'case':24s} {'before ms':>10s} {'after ms':>10s} {'after/before (median, range)':>32s}")
    for key, r in results.items():
        if isinstance(r, dict) and "ratio_after_over_before" in r:
            q = r["ratio_after_over_before"]
            print(f"{key:24s} {r['before_median_ms']:10.3f} {r['after_median_ms']:10.3f} "
                  f"{q['median']:12.3f} ({q['min']:.3f}-{q['max']:.3f})")
    print(f"machine: {results['machine'].get('cpu')}; written {args.out}")


if __name__ == "__main__":
    main()
