"""Start-up with and without OpenVINO's compiled-model cache: `Runtime(...)` construction (single graph in the
process, and the multi-stream plan's pinned workers) and `parnet-cpu serve` until /v2/health/ready answers,
each in a fresh process, in interleaved rounds of three conditions on the same model folder:

- `off`:  PARNET_CPU_COMPILE_CACHE=off, compiled from the IR (what every start cost before the cache);
- `cold`: an empty cache (the first start on a machine: compiles, then writes and records the blobs);
- `warm`: the cache `cold` just wrote (a restarted server, a second replica).

The model folder is mounted read-only (a bind mount in a private mount namespace, `unshare -m`, as KServe
and `docker -v ...:ro` mount it) when this runs as root, so the cache goes to the user cache folder
(XDG_CACHE_HOME, a fresh temporary folder per round); otherwise it goes to the model folder's own
compile_cache/, which `cold` removes first. Every start's logits for one fixed input are compared with `off`.

    python benchmarks/startup_cache.py --model DIR [--rounds 3] [--precision fp32] [--what runtime,multistream,serve]

Result: `benchmarks/results/startup_cache.json` (every start's seconds, medians per kind and condition,
warm/off ratios, whether the blobs were imported, the outputs check, the machine and its other load).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from common import OtherLoad, machine_summary, print_table, usable_cores, write_result

CHILD = r"""
import hashlib, json, os, sys, time
t0 = time.perf_counter()
import numpy as np
from parnet_cpu.runtime import Runtime
if __name__ == "__main__":
    model, precision, kind = sys.argv[1], sys.argv[2], sys.argv[3]
    kw = dict(plan="single") if kind == "runtime" else dict(plan="multistream", cores="0:1:0")
    t1 = time.perf_counter()
    with Runtime(model, precision=precision, share=True, **kw) as rt:
        t2 = time.perf_counter()
        x = np.random.default_rng(0).standard_normal((2, *rt.input_shape)).astype(np.float32)
        out = rt.infer(x)
        cache = rt.compile_cache
        compiled = getattr(rt, "_compiled", None)  # in-process only (the workers compile their own)
        hit = compiled.get_property("LOADED_FROM_CACHE") if compiled is not None else None
        print(json.dumps({"seconds": t2 - t1, "import_s": t1 - t0, "plan_kind": rt.plan.kind,
                          "cache_dir": str(cache.dir) if cache else None, "blobs": cache.blobs() if cache else [],
                          "loaded_from_cache": hit, "logits_sha256": hashlib.sha256(out.tobytes()).hexdigest()}))
"""


def read_only(model: Path) -> list[str]:
    """A prefix that runs a command with `model` mounted read-only, or [] when that needs privileges we lack."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return []
    return ["unshare", "-m", "sh", "-c", f'mount --bind "{model}" "{model}" && mount -o remount,bind,ro "{model}" '
            '&& exec "$@"', "sh"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_runtime(prefix: list[str], env: dict, model: Path, precision: str, kind: str) -> dict:
    r = subprocess.run([*prefix, sys.executable, "-c", CHILD, str(model), precision, kind], env=env,
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"{kind} start failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_serve(prefix: list[str], env: dict, model: Path, precision: str) -> dict:
    """Seconds from spawning `parnet-cpu serve` to its first 200 on /v2/health/ready."""
    port = free_port()
    cmd = [*prefix, sys.executable, "-m", "parnet_cpu", "serve", "--model-dir", str(model), "--port", str(port),
           "--plan", "single", "--precision", precision, "--share-cores"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited with {proc.returncode}:\n{proc.stderr.read()[-3000:]}")
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status == 200:
                    return {"seconds": time.perf_counter() - t0}
            except OSError:
                pass
            if time.perf_counter() - t0 > 900:
                raise RuntimeError("serve did not get ready within 900 s")
            time.sleep(0.02)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--what", default="runtime,multistream,serve",
                   help="runtime (single graph in the process), multistream (pinned workers), serve (ready time)")
    args = p.parse_args(argv)
    model = Path(args.model).resolve()
    kinds = [k.strip() for k in args.what.split(",") if k.strip()]
    prefix = read_only(model)
    where = "user cache (model folder read-only)" if prefix else "model folder's compile_cache/"
    rows, starts = [], []
    leases = tempfile.mkdtemp(prefix="startup-leases-")  # its own lease namespace: other runtimes here do not refuse it
    with OtherLoad(exclude_children=True) as load:
        for r in range(args.rounds):
            for kind in kinds:
                xdg = tempfile.mkdtemp(prefix="startup-xdg-")
                base = {**os.environ, "XDG_CACHE_HOME": xdg, "PARNET_CPU_LEASE_DIR": leases}
                if not prefix:
                    shutil.rmtree(model / "compile_cache", ignore_errors=True)
                for cond in ("off", "cold", "warm"):
                    env = {**base, "PARNET_CPU_COMPILE_CACHE": "off"} if cond == "off" else base
                    res = (run_serve(prefix, env, model, args.precision) if kind == "serve"
                           else run_runtime(prefix, env, model, args.precision, kind))
                    starts.append({"round": r, "kind": kind, "condition": cond, **res})
                    print(f"round {r} {kind:12s} {cond:5s} {res['seconds']:.2f} s", flush=True)
                shutil.rmtree(xdg, ignore_errors=True)
    for kind in kinds:
        med = {c: float(np.median([s["seconds"] for s in starts if s["kind"] == kind and s["condition"] == c]))
               for c in ("off", "cold", "warm")}
        same = {s.get("logits_sha256") for s in starts if s["kind"] == kind}
        rows.append({"kind": kind, "off_s": med["off"], "cold_s": med["cold"], "warm_s": med["warm"],
                     "warm_vs_off": med["warm"] / med["off"], "cold_vs_off": med["cold"] / med["off"],
                     "outputs_equal": None if kind == "serve" else len(same) == 1})
    print_table(rows, ["kind", "off_s", "cold_s", "warm_s", "warm_vs_off", "cold_vs_off", "outputs_equal"])
    manifest = json.loads((model / "parnet.json").read_text())
    path = write_result("startup_cache", {
        "benchmark": "startup_cache", "description": __doc__.split("\n\n")[0].replace("\n", " "),
        "model": {"folder": model.name, "config": manifest.get("config"), "precision": args.precision,
                  "ir_bin_sha256": hashlib.sha256((model / f"model_{args.precision}.bin").read_bytes()).hexdigest()},
        "cache_location": where, "rounds": args.rounds, "rows": rows, "starts": starts,
        "machine": machine_summary(usable_cores()), "other_load_during_run": load.summary(),
        "machine_was_quiet": load.quiet})
    shutil.rmtree(leases, ignore_errors=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
