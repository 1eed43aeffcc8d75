"""IPEX's own runtime (CPUPool, Task, MultiStreamModule) against ours: ParNet FP32, one run, same cores.

    LD_PRELOAD=<ipex venv>/lib/libiomp5.so python benchmarks/ipex_runtime.py [--quick] [--model parnet_s]
        [--cores 0-7 | --cores 0-2:3-5:6-7] [--batches 1,8] [--warmup 5] [--iters 30] [--min-seconds 2]
        [--msm-streams N] [--seed 0] [--workdir DIR] [--json FILE]

`ipex.cpu.runtime` is the historical anchor for pinning work to core groups, so where IPEX is installed
(its own environment: `bash scripts/ipex_env.sh`; its runtime needs Intel OpenMP preloaded) this puts it
next to our runtime. Rows, all FP32, deploy form, random weights (fixed seed), the same CPUs:

- ov-latency              OpenVINO single graph, LATENCY hint, f32: the baseline of every ratio (as `bench`)
- ours-multistream        `parnet_cpu.Runtime(plan="multistream")` (as `bench`; its img/s: 2 requests in flight)
- ipex-single             `ipex.optimize` + `torch.jit.trace` + `freeze`, torch threads = cores, pinned (`pin`)
- ipex-task-streams       the IPEX analogue of ours: stem and tail on the main thread (pinned to all the
                          cores), the three streams concurrently as `Task`s, each on its own `CPUPool`
                          (the same groups as ours)
- ipex-multistreammodule  `MultiStreamModule(traced model, num_streams, CPUPool(all cores))`: the batch is
                          split across streams (at batch 1 there is nothing to split)

A Task's OpenMP team is as large as torch's thread count when the Task thread first runs a parallel ATen
op, not as its pool: IPEX pins a pool-sized team when the Task starts, then torch's per-thread lazy
thread-count initialisation resizes it, and the extra threads are pinned nowhere (measured: a 1-core
pool ran 2 threads, one of them on every CPU). So the two Task rows size each team to its pool (torch
thread count = pool size during the Task's first call); the `/default-teams` rows show IPEX as it
comes (torch threads = all cores throughout).

Checks (recorded; the script exits 1 after writing the JSON if one fails): ipex-task-streams logits
within 1e-4 relative L2 of the plain torch deploy model; every thread that burns CPU while one stream
Task runs alone is allowed only on that Task's cores (Cpus_allowed_list, /proc/self/task/*/status).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import threading
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import numpy as np

from common import RESULTS_DIR, OtherLoad, machine_summary, other_busy_processes, print_table, set_threads

IOMP_HINT = ("the IPEX runtime (CPUPool, Task, MultiStreamModule) needs Intel OpenMP preloaded. Run:\n"
             "  cd {repo} && LD_PRELOAD={venv}/lib/libiomp5.so PYTHONPATH={repo} {python} benchmarks/ipex_runtime.py "
             "[--quick]\n(IPEX environment: `bash scripts/ipex_env.sh`, which installs intel-openmp)")
MAX_REL_L2 = 1e-4  # ipex-task-streams vs plain torch deploy form, FP32
BUSY_SHARE = 0.05  # a thread using >= 5 % of a core during a probe window counts as working
DEFAULT_TEAMS = "/default-teams"
IPEX_ENGINES = ("ipex-single", "ipex-task-streams", "ipex-task-streams" + DEFAULT_TEAMS,
                "ipex-multistreammodule", "ipex-multistreammodule" + DEFAULT_TEAMS)
STREAM_NAMES = ("stream1", "stream2", "stream3")
# the `ParNet` stage methods each IPEX stage runs; inits1 is recomputed by streams 2 and 3, as in our
# runtime's default layout (`parnet_cpu.runtime.partition.RECOMPUTE_STAGES`)
STAGE_METHODS = {"stem": ("forward_stem",), "stream1": ("forward_stream1",),
                 "stream2": ("forward_inits1", "forward_stream2"), "stream3": ("forward_inits1", "forward_stream3")}


# ---------------------------------------------------------------------------------------------- set-up
def require_intel_openmp() -> None:
    """Exit with the command to use unless libiomp5 is mapped: without it IPEX's runtime is disabled."""
    with open("/proc/self/maps") as f:
        if "libiomp5" in f.read():
            return
    repo = Path(__file__).resolve().parents[1]
    sys.exit("ipex_runtime: " + IOMP_HINT.format(repo=repo, venv=sys.prefix, python=sys.executable))


def import_ipex_runtime():
    """IPEX, checked to be installed and to have its runtime extension enabled."""
    from parnet_cpu.quantization.ipex_backend import INSTALL_HINT

    # IPEX imports torch's inductor, which otherwise starts a pool of compile-worker processes that
    # burn CPU next to the measurements; nothing here compiles with inductor
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    try:
        import intel_extension_for_pytorch as ipex
    except Exception as exc:  # ImportError, or IPEX's own check against the installed torch
        sys.exit(f"ipex_runtime: {INSTALL_HINT} ({type(exc).__name__}: {exc})")
    if not ipex.cpu.runtime.is_runtime_ext_enabled():
        repo = Path(__file__).resolve().parents[1]
        sys.exit("ipex_runtime: IPEX reports its runtime extension disabled; "
                 + IOMP_HINT.format(repo=repo, venv=sys.prefix, python=sys.executable))
    return ipex


def resolve_cores(spec: str | None) -> tuple[list[list[int]] | None, str]:
    """Stream groups (None: our Runtime sizes them by cost) and how they were chosen.

    `--cores 0-7` confines this process, hence the planner and every engine, to those CPUs;
    `--cores 0-2:3-5:6-7` gives the three stream groups. Otherwise `runtime.leases` decides: groups
    sized by cost with >= 3 physical cores, overlapping single-core groups below that."""
    from parnet_cpu.runtime.leases import stream_groups_for_this_machine
    from parnet_cpu.runtime.cores import parse_groups, validate_groups
    from parnet_cpu.system.affinity import pin_process
    from parnet_cpu.system.cpuinfo import parse_cpu_list

    if spec and (":" in spec or ";" in spec):
        groups = parse_groups(spec)
        validate_groups(groups)
        pin_process(sorted({c for g in groups for c in g}))
        return groups, "explicit core groups (--cores)"
    if spec:
        cpus = parse_cpu_list(spec)
        validate_groups([cpus])
        pin_process(cpus)
    return stream_groups_for_this_machine()


def build_model_dir(model: str, seed: int, folder: Path) -> Path:
    """Model folder (FP32 IR + deploy weights) of `model` with random weights drawn from `seed`."""
    import torch

    from parnet_cpu.export import export_model_dir
    from parnet_cpu.models.parnet import create_model

    torch.manual_seed(seed)
    net = create_model(model, pretrained=False)
    source = {"model": model, "checkpoint": None, "weights": f"random, torch.manual_seed({seed})"}
    return export_model_dir(net, folder / f"{model}-seed{seed}", source, overwrite=True)


def images(batch: int, shape: tuple[int, ...]) -> np.ndarray:
    """The input `parnet_cpu.bench` times every engine on (same seed), so all rows see the same data."""
    return np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# --------------------------------------------------------------------------- thread-affinity evidence
def thread_cpu_ticks() -> dict[int, int]:
    """user+system clock ticks of every thread of this process (/proc/self/task/*/stat)."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[int(tid)] = int(fields[11]) + int(fields[12])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def busy_threads(fn: Callable[[], Any], seconds: float) -> dict:
    """Threads that burned CPU while `fn` ran repeatedly for `seconds`, with their Cpus_allowed_list.

    IPEX's Task and OpenMP threads carry no names, so they are told apart by CPU time: one thing runs
    at a time, and the threads doing its work are the busy ones. Python threads (the load sampler)
    are marked and left out of the checks."""
    from parnet_cpu.system.affinity import thread_affinities

    time.sleep(0.5)  # let OpenMP teams of earlier work stop spinning (KMP_BLOCKTIME defaults to 200 ms)
    main, hz = threading.get_native_id(), os.sysconf("SC_CLK_TCK")
    python_threads = {t.native_id for t in threading.enumerate()} - {main}
    before, t0, calls = thread_cpu_ticks(), time.perf_counter(), 0
    while calls < 3 or time.perf_counter() - t0 < seconds:
        fn()
        calls += 1
    wall, after, affinity = time.perf_counter() - t0, thread_cpu_ticks(), thread_affinities()
    threads = []
    for tid, ticks in sorted(after.items()):
        share = (ticks - before.get(tid, 0)) / hz / wall
        if share >= BUSY_SHARE:
            kind = "main" if tid == main else "python" if tid in python_threads else "native"
            threads.append({"tid": tid, "thread": kind, "core_share": round(share, 2),
                            "cpus_allowed_list": affinity.get(tid, "?")})
    return {"seconds": round(wall, 2), "calls": calls, "threads_in_process": len(after), "busy_threads": threads}


def allowed(thread: dict) -> set[int]:
    from parnet_cpu.system.cpuinfo import parse_cpu_list

    return set(parse_cpu_list(thread["cpus_allowed_list"]))


def probe_alone(name: str, task, cores: list[int], arg, seconds: float) -> dict:
    """One Task run alone: its busy threads (the caller waits, so not the main thread) must be
    allowed only on its pool's cores, and be no more than the pool has cores."""
    seen = busy_threads(lambda: task(arg).get(), seconds)
    workers = [t for t in seen["busy_threads"] if t["thread"] == "native"]
    ok = bool(workers) and len(workers) <= len(cores) and all(allowed(t) <= set(cores) for t in workers)
    return {"task": name, "pool_cores": cores, **seen, "ok": ok}


def probe_together(fn: Callable[[], Any], cores: list[int], seconds: float) -> dict:
    """Everything running at once: IPEX pins each thread of a pool's team to one core of the pool, so
    every busy non-Python thread must be allowed on exactly one of `cores`."""
    seen = busy_threads(fn, seconds)
    workers = [t for t in seen["busy_threads"] if t["thread"] != "python"]
    ok = bool(workers) and all(len(allowed(t)) == 1 and allowed(t) <= set(cores) for t in workers)
    return {**seen, "ok": ok}


# ------------------------------------------------------------------------------------- IPEX engines
def stage_module(model, methods: tuple[str, ...]):
    """One single-input stage of ParNet as its own nn.Module, so it can be traced and run as a Task."""
    import torch

    class Stage(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for name in methods:
                x = getattr(self.model, name)(x)
            return x

    return Stage().eval()


def tail_module(model):
    import torch

    class Tail(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, y1: torch.Tensor, y2: torch.Tensor, y3: torch.Tensor) -> torch.Tensor:
            return self.model.forward_tail(y1, y2, y3)

    return Tail().eval()


def trace_frozen(module, *example):
    """TorchScript as IPEX deploys FP32: trace, freeze, and two runs so the JIT applies its fusions."""
    import torch

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.freeze(torch.jit.trace(module, example, check_trace=False))
        traced(*example), traced(*example)
    return traced


def size_team(task, cores: int, *args) -> None:
    """First call of a Task with torch's thread count = its pool size: torch sizes a thread's OpenMP
    team from its global count on that thread's first parallel op, overriding IPEX's pool-sized team."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(cores)
    try:
        task(*args).get()
    finally:
        torch.set_num_threads(before)


class TaskStreams:
    """ParNet on IPEX's runtime the way ours runs it: stem, then the three streams concurrently as
    `Task`s on their own `CPUPool`s, then the tail; stem and tail on the caller's thread."""

    def __init__(self, ipex, optimized, groups: list[list[int]], x, pool_sized_teams: bool) -> None:
        import torch

        rt = ipex.cpu.runtime
        self.stem = trace_frozen(stage_module(optimized, STAGE_METHODS["stem"]), x)
        with torch.no_grad():
            s = self.stem(x)
            streams = [trace_frozen(stage_module(optimized, STAGE_METHODS[n]), s) for n in STREAM_NAMES]
            self.tail = trace_frozen(tail_module(optimized), *[m(s) for m in streams])
            self.pools = [rt.CPUPool(core_ids=list(g)) for g in groups]
            self.tasks = [rt.Task(m, p) for m, p in zip(streams, self.pools)]
            if pool_sized_teams:
                for task, pool in zip(self.tasks, self.pools):
                    size_team(task, len(pool.core_ids), s)

    def __call__(self, x):
        s = self.stem(x)
        futures = [task(s) for task in self.tasks]  # submit all, then wait
        return self.tail(*[f.get() for f in futures])

    def probe(self, x, cores: list[int], seconds: float) -> dict:
        s = self.stem(x)
        alone = [probe_alone(n, t, p.core_ids, s, seconds) for n, t, p in zip(STREAM_NAMES, self.tasks, self.pools)]
        together = probe_together(lambda: self(x), cores, seconds)
        return {"per_task": alone, "whole_forward": together, "ok": all(a["ok"] for a in alone) and together["ok"]}


class IpexEngines:
    """The IPEX rows, built per batch (traced at the shape they run) on an `ipex.optimize`d model."""

    def __init__(self, ipex, deploy, input_shape: tuple[int, ...], groups: list[list[int]], cpus: list[int],
                 msm_streams: int) -> None:
        import torch

        self.ipex, self.input_shape, self.groups, self.msm_streams = ipex, input_shape, groups, msm_streams
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.optimized = ipex.optimize(deploy.eval(), dtype=torch.float32)
        self.main_pool = ipex.cpu.runtime.CPUPool(core_ids=list(cpus))
        self._full: dict[int, Any] = {}

    def pinned(self, engine: str):
        """The caller's thread and its OpenMP team on all the cores (IPEX's `pin`) where it computes:
        ipex-single, and stem and tail of ipex-task-streams (ours runs them on all the groups' cores)."""
        return nullcontext() if engine.startswith("ipex-multistreammodule") else self.ipex.cpu.runtime.pin(self.main_pool)

    def full(self, batch: int):
        if batch not in self._full:
            import torch

            self._full[batch] = trace_frozen(self.optimized, torch.zeros(batch, *self.input_shape))
        return self._full[batch]

    def build(self, engine: str, x):
        if engine == "ipex-single":
            return self.full(x.shape[0])
        sized = not engine.endswith(DEFAULT_TEAMS)
        if engine.startswith("ipex-task-streams"):
            return TaskStreams(self.ipex, self.optimized, self.groups, x, sized)
        return self.multistream_module(x, sized)

    def multistream_module(self, x, pool_sized_teams: bool):
        """`MultiStreamModule` over all the cores; each stream gets batch / num_streams images, so the
        model is traced at that (rounded-up) batch."""
        mini = max(1, math.ceil(x.shape[0] / self.msm_streams))
        msm = self.ipex.cpu.runtime.MultiStreamModule(self.full(mini), num_streams=self.msm_streams,
                                                      cpu_pool=self.main_pool)
        if pool_sized_teams:
            for task in getattr(msm, "tasks", []):  # none when num_streams == 1 (runs on the caller)
                size_team(task, len(task.cpu_pool.core_ids), x[:mini])
        return msm

    def probe(self, engine: str, model, x, seconds: float) -> dict | None:
        if engine.startswith("ipex-task-streams"):
            return model.probe(x, self.main_pool.core_ids, seconds)
        if engine.startswith("ipex-multistreammodule"):
            together = probe_together(lambda: model(x), self.main_pool.core_ids, seconds)
            return {"whole_forward": together, "ok": together["ok"]}
        return None

    def info(self, engine: str, model) -> dict:
        """What the row ran on, read back from IPEX's objects (pools drop cores the process cannot use)."""
        import torch

        teams = {} if engine == "ipex-single" else {
            "teams": "torch threads = all cores (as IPEX comes)" if engine.endswith(DEFAULT_TEAMS)
            else "pool-sized (torch threads = pool size at each Task's first call)"}
        if engine == "ipex-single":
            return {"torch_threads": torch.get_num_threads(), "cores": self.main_pool.core_ids}
        if engine.startswith("ipex-task-streams"):
            return {**teams, "stream_pools": [p.core_ids for p in model.pools], "stem_tail_cores": self.main_pool.core_ids}
        used = model.used_num_streams  # set by the forward just run
        return {**teams, "num_streams": model.num_streams, "streams_used": used,
                "stream_pools": [t.cpu_pool.core_ids for t in getattr(model, "tasks", [])] or [self.main_pool.core_ids],
                "note": (f"batch {model.split_size} < {model.num_streams} streams: {used} stream(s) used"
                         if used < model.num_streams else f"batch split over {used} streams")}


# ------------------------------------------------------------------------------------------ measuring
def bench_ipex(engines: IpexEngines, reference: dict[int, np.ndarray], cfg, probe_seconds: float,
               log) -> tuple[list[dict], dict]:
    """The IPEX rows in `parnet_cpu.bench`'s format (one request at a time: img/s = batch / median), each
    with its output error against plain torch; thread evidence of the Task engines at the largest batch."""
    import torch

    from parnet_cpu.runtime.timing import measure_latency

    rows, evidence = [], {}
    for b in cfg.batches:
        x = torch.from_numpy(images(b, engines.input_shape))
        for engine in IPEX_ENGINES:
            log(f"{engine}: batch {b} ...")
            try:
                model = engines.build(engine, x)
                with torch.no_grad(), engines.pinned(engine):
                    error = rel_l2(model(x).numpy(), reference[b])
                    info = {"rel_l2_vs_torch": error, **engines.info(engine, model)}
                    stats = measure_latency(lambda: model(x), cfg.warmup, cfg.iters, cfg.min_seconds, batch=b)
                    rows.append({"engine": engine, "precision": "fp32", **info, **stats,
                                 "throughput_mode": "one request at a time"})
                    if b == max(cfg.batches) and (found := engines.probe(engine, model, x, probe_seconds)):
                        evidence[engine] = {"batch": b, **found}
            except Exception as exc:  # reported as a row, the benchmark goes on
                rows.append({"engine": engine, "batch": b, "precision": "fp32", "error": f"{type(exc).__name__}: {exc}"})
    return rows, evidence


def add_ratios(rows: list[dict]) -> None:
    """Latency and throughput against ov-latency at the same batch, as `parnet_cpu.bench` defines them."""
    base = {r["batch"]: r for r in rows if r["engine"] == "ov-latency" and "error" not in r}
    for r in rows:
        if r["batch"] in base and "error" not in r:
            r["latency_ratio_vs_ov_latency"] = r["median_ms"] / base[r["batch"]]["median_ms"]
            r["throughput_ratio_vs_ov_latency"] = r["throughput_ips"] / base[r["batch"]]["throughput_ips"]


def plan_groups_of(plan: dict | None) -> list[list[int]] | None:
    """The stream groups our Runtime used (from `Plan.describe()`)."""
    from parnet_cpu.system.cpuinfo import parse_cpu_list

    if not plan:
        return None
    by_name = {w["name"]: parse_cpu_list(w["cpus"]) for w in plan["workers"]}
    return [by_name[n] for n in STREAM_NAMES]


def table_rows(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        if "error" in r:
            out.append({"engine": r["engine"], "batch": r["batch"], "note": "error: " + r["error"][:80]})
            continue
        out.append({"engine": r["engine"], "batch": r["batch"], "p50 ms": r["median_ms"], "p90 ms": r["p90_ms"],
                    "p99 ms": r["p99_ms"], "img/s": r["throughput_ips"],
                    "lat x": r.get("latency_ratio_vs_ov_latency"), "thr x": r.get("throughput_ratio_vs_ov_latency"),
                    "note": r.get("note", "")})
    return out


def run_checks(rows: list[dict], evidence: dict, batches: tuple[int, ...]) -> dict:
    """Output agreement and pinning of ipex-task-streams (the pass/fail of the run); the evidence of
    the other Task engines is recorded alongside, as findings."""
    streams = [r for r in rows if r["engine"] == "ipex-task-streams" and "error" not in r]
    outputs_ok = len(streams) == len(batches) and all(r["rel_l2_vs_torch"] <= MAX_REL_L2 for r in streams)
    return {
        "outputs": {"max_rel_l2": MAX_REL_L2, "reference": "plain torch deploy model (eager, FP32)",
                    "ipex_task_streams": {r["batch"]: r["rel_l2_vs_torch"] for r in streams}, "ok": outputs_ok},
        "task_pinning": {"method": "per-thread CPU time (/proc/self/task/*/stat) during a probe window, "
                                   "affinity from /proc/self/task/*/status (Cpus_allowed_list)",
                         "ok": evidence.get("ipex-task-streams", {}).get("ok", False), "engines": evidence},
    }


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="parnet_s", help="registered ParNet variant (random weights)")
    ap.add_argument("--cores", default=None, help="CPU list ('0-7') or three stream groups ('0-2:3-5:6-7'); "
                                                  "default: all usable physical cores")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=30, help="minimum timed calls per measurement")
    ap.add_argument("--min-seconds", type=float, default=2.0, help="minimum timed seconds per measurement")
    ap.add_argument("--msm-streams", type=int, default=None,
                    help="MultiStreamModule streams (default: one per core, IPEX's AUTO)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    ap.add_argument("--workdir", default=None, help="where the model folder goes (default: a temporary folder)")
    ap.add_argument("--json", default=None, help="result file (default benchmarks/results/ipex_runtime_<model>.json)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 warm-up, 3 calls, short probes")
    args = ap.parse_args(argv)
    if args.quick:
        args.warmup, args.iters, args.min_seconds = 1, 3, 0.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_intel_openmp()
    ipex = import_ipex_runtime()
    import openvino as ov
    import torch

    from parnet_cpu.artifacts import ModelDir
    from parnet_cpu.outputs import write_json
    from parnet_cpu.bench import BenchConfig, run_bench
    from parnet_cpu.export import load_deploy_model
    from parnet_cpu.system.cpuinfo import format_cpu_list

    def log(msg: str) -> None:
        print(msg, flush=True)

    groups, how = resolve_cores(args.cores)
    cfg = BenchConfig(batches=tuple(int(b) for b in args.batches.split(",")), warmup=args.warmup, iters=args.iters,
                      min_seconds=args.min_seconds, engines=("multistream", "ov-latency"))
    busy_before = other_busy_processes()
    if busy_before:
        log(f"WARNING: other busy processes, timings are not trustworthy: {busy_before}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, OtherLoad(exclude_children=True) as load:
        log(f"{args.model}: random weights (seed {args.seed}) -> FP32 model folder ...")
        model_dir = build_model_dir(args.model, args.seed, Path(args.workdir or tmp))
        ours = run_bench(model_dir, "auto", groups, "fp32", cfg, log=log)  # ours-multistream and ov-latency
        groups = plan_groups_of(ours["plan"]) or groups
        if groups is None:
            raise SystemExit(f"ipex_runtime: our runtime did not start, so there are no stream groups: {ours['rows']}")
        cpus = sorted({c for g in groups for c in g})
        threads = set_threads(len(cpus))
        shape = ModelDir.open(model_dir).input_shape()
        deploy = load_deploy_model(model_dir)
        with torch.no_grad():
            reference = {b: deploy(torch.from_numpy(images(b, shape))).numpy() for b in cfg.batches}
        engines = IpexEngines(ipex, deploy, shape, groups, cpus, args.msm_streams or len(cpus))
        ipex_rows, evidence = bench_ipex(engines, reference, cfg, 0.5 if args.quick else 2.0, log)
    rows = ours["rows"] + ipex_rows
    for r in rows:
        if r["engine"] == "multistream":
            r["engine"], r["throughput_mode"] = "ours-multistream", f"{r['inflight']} requests in flight"
            r["note"] = f"img/s: {r['inflight']} requests in flight"
        elif r["engine"] == "ov-latency":
            r["throughput_mode"] = "one request at a time"
    add_ratios(rows)
    checks = run_checks(rows, evidence, cfg.batches)
    machine = machine_summary(threads)
    machine["ipex"] = ipex.__version__
    payload = {
        "benchmark": "ipex_runtime", "quick": args.quick,
        "description": "IPEX's runtime (CPUPool/Task/MultiStreamModule) vs our multi-stream Runtime and the "
                       "OpenVINO single graph, same CPUs, one run; ratios against ov-latency at the same batch "
                       "(latency: p50 / p50 of ov-latency; throughput: img/s / img/s of ov-latency)",
        "model": args.model, "weights": f"random, torch.manual_seed({args.seed})",
        "precision": "fp32 everywhere (OpenVINO: INFERENCE_PRECISION_HINT=f32; torch/IPEX: float32)",
        "settings": {**vars(args), "batches": list(cfg.batches)},
        "cores": {"cpus": format_cpu_list(cpus), "stream_groups": [format_cpu_list(g) for g in groups],
                  "stem_tail": format_cpu_list(cpus), "how_chosen": how, "ours_plan": ours["plan"],
                  "msm_streams": engines.msm_streams},
        "versions": {"torch": torch.__version__, "ipex": ipex.__version__, "openvino": ov.get_version(),
                     "python": machine["python"]},
        "environment": {k: os.environ[k] for k in ("LD_PRELOAD", "KMP_AFFINITY", "KMP_BLOCKTIME", "OMP_NUM_THREADS",
                                                   "TORCHINDUCTOR_COMPILE_THREADS") if k in os.environ},
        "machine": machine, "busy_processes_at_start": busy_before,
        "other_load_during_run": load.summary(), "machine_was_quiet": load.quiet,
        "wall_seconds": round(time.perf_counter() - t0, 1), "rows": rows, "checks": checks,
    }
    path = Path(args.json) if args.json else RESULTS_DIR / f"ipex_runtime_{args.model}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, payload)
    report(payload, cpus, groups, log)
    log(f"wrote {path} ({payload['wall_seconds']} s)")
    return 0 if checks["outputs"]["ok"] and checks["task_pinning"]["ok"] else 1


def report(payload: dict, cpus: list[int], groups: list[list[int]], log) -> None:
    from parnet_cpu.system.cpuinfo import format_cpu_list

    checks = payload["checks"]
    log(f"\nCPU: {payload['machine']['cpu']} | CPUs {format_cpu_list(cpus)} | stream groups "
        f"{' / '.join(format_cpu_list(g) for g in groups)} ({payload['cores']['how_chosen']}) | FP32 | "
        f"{payload['model']}, random weights")
    log("lat x = p50 / p50 of ov-latency (< 1: faster); thr x = img/s / img/s of ov-latency (> 1: more)")
    print_table(table_rows(payload["rows"]),
                ["engine", "batch", "p50 ms", "p90 ms", "p99 ms", "img/s", "lat x", "thr x", "note"])
    errors = ", ".join(f"batch {b}: {e:.1e}" for b, e in checks["outputs"]["ipex_task_streams"].items())
    log(f"outputs: ipex-task-streams vs torch, rel L2 {errors} (<= {MAX_REL_L2}): "
        f"{'ok' if checks['outputs']['ok'] else 'FAILED'}")
    for engine, ev in checks["task_pinning"]["engines"].items():
        log(f"pinning: {engine}: every busy thread on its pool's cores: {'yes' if ev['ok'] else 'NO'}")
    if payload["quick"]:
        log("--quick: few iterations, a smoke test, not a measurement")
    if not payload["machine_was_quiet"]:
        log(f"WARNING: other processes used the CPU during the run ({payload['other_load_during_run']}): "
            "timings are not trustworthy")


if __name__ == "__main__":
    sys.exit(main())
