"""Shared helpers for the benchmark scripts: thread setup, timing, machine summary, result files.

Every benchmark runs PyTorch and OpenVINO with the same thread count (default: every usable
physical core, as `parnet_cpu.system.cpuinfo` sees it) and records it, together with the CPU model
and library versions, in its JSON result.
"""
from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def usable_cores() -> int:
    """Physical cores this process may use (affinity, cgroup cpuset and CPU quota respected)."""
    from parnet_cpu.system.cpuinfo import describe_machine, usable_physical_cores

    return max(1, len(usable_physical_cores(describe_machine(query_openvino=False))))


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (default: all usable cores) and return the number, which the
    caller must also pass to OpenVINO (`CompileOptions(num_threads=...)`)."""
    import torch

    n = int(threads) if threads else usable_cores()
    torch.set_num_threads(n)
    return n


def time_callable(fn: Callable[[], Any], warmup: int = 5, iters: int = 50, min_seconds: float = 0.0) -> dict[str, float]:
    """`parnet_cpu.runtime.timing.measure_latency` with the short keys the benchmark tables use."""
    from parnet_cpu.runtime.timing import measure_latency

    m = measure_latency(fn, warmup, max(1, iters), min_seconds)
    return {"p50": m["median_ms"], "p90": m["p90_ms"], "p99": m["p99_ms"], "mean": m["mean_ms"],
            "min": m["min_ms"], "max": m["max_ms"], "iters": m["iters"]}


def machine_summary(threads: int) -> dict[str, Any]:
    """The machine record every report shares (`parnet_cpu.system.cpuinfo.machine_summary`: cpu, isa_level,
    sockets, physical_cores, logical_cpus, usable_cpus, openvino, python, system), plus, alongside, what a
    benchmark adds: the thread counts used, the ISA flags, OpenVINO's device name and capabilities, the cgroup
    CPU budget, torch's version and the date."""
    import torch

    from parnet_cpu.system.cpuinfo import describe_machine
    from parnet_cpu.system.cpuinfo import machine_summary as shared_summary

    info = describe_machine()
    return {
        **shared_summary(info),
        "threads_used": threads,
        "torch_threads": torch.get_num_threads(),
        "openvino_inference_num_threads": threads,
        "isa": {k: v for k, v in info.isa.items() if v},
        "openvino_device_name": info.openvino.full_device_name if info.openvino else None,
        "openvino_capabilities": info.openvino.optimization_capabilities if info.openvino else None,
        "cpu_quota_budget": info.cpu_budget,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def other_busy_processes(threshold: float = 20.0) -> list[str]:
    """Other processes using more than `threshold` % CPU right now (timings taken meanwhile are suspect)."""
    import psutil

    procs = [p for p in psutil.process_iter(["pid", "name"]) if p.pid != os.getpid()]
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(0.5)
    busy = []
    for p in procs:
        try:
            pct = p.cpu_percent(None)
        except psutil.Error:
            continue
        if pct > threshold:
            busy.append(f"{p.info['name']} (pid {p.pid}, {pct:.0f}% CPU)")
    return busy


class OtherLoad:
    """Context manager sampling, once a second in a background thread, the CPU time used by every
    *other* process (summed per process, so this process's own accounting cannot leak in), in % of
    all CPUs; `summary()` goes into the result JSON. With `exclude_children`, this process's own
    child processes (servers, bench workers: the load being measured) are not counted either."""

    def __init__(self, interval: float = 1.0, exclude_children: bool = False) -> None:
        import psutil

        self.interval, self.samples, self._stop = interval, [], threading.Event()
        self.exclude_children = exclude_children
        self._ncpu = psutil.cpu_count() or 1
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _others(self) -> dict[int, tuple[float, float]]:
        """pid -> (create_time, user+system CPU seconds) of every other process."""
        import psutil

        me = psutil.Process()
        ours = {me.pid} | ({c.pid for c in me.children(recursive=True)} if self.exclude_children else set())
        out = {}
        for p in psutil.process_iter():
            if p.pid in ours:
                continue
            try:
                t = p.cpu_times()
                out[p.pid] = (p.create_time(), t.user + t.system)
            except psutil.Error:
                pass
        return out

    def _run(self) -> None:
        prev_t, prev = time.time(), self._others()
        while not self._stop.wait(self.interval):
            now, cur = time.time(), self._others()
            used = 0.0
            for pid, (created, cpu) in cur.items():
                if pid in prev and prev[pid][0] == created:
                    used += max(0.0, cpu - prev[pid][1])
                elif created >= prev_t - 0.01:  # started since the last sample
                    used += cpu
            self.samples.append(100.0 * used / ((now - prev_t) * self._ncpu))
            prev_t, prev = now, cur

    def __enter__(self) -> "OtherLoad":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, Any]:
        a = np.asarray(self.samples or [0.0])
        return {"others_cpu_percent_mean": round(float(a.mean()), 1), "others_cpu_percent_max": round(float(a.max()), 1),
                "seconds_over_10_percent": int((a > 10).sum()), "samples": len(self.samples)}

    @property
    def quiet(self) -> bool:
        s = self.summary()
        return s["others_cpu_percent_mean"] < 5 and s["seconds_over_10_percent"] <= 3


def kernel_counts(compiled, types: Sequence[str] = ("Convolution", "FullyConnected")) -> dict[str, int]:
    """How many layers of `types` the compiled OpenVINO model runs with each "type:precision:kernel"
    (read back from the runtime graph via `runtime_layers`)."""
    from parnet_cpu.runtime.engine import runtime_layers

    counts: dict[str, int] = {}
    for layer in runtime_layers(compiled):
        if layer["type"] in types:
            key = f"{layer['type']}:{layer['precision']}:{layer['kernel']}"
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def write_result(name: str, payload: dict) -> Path:
    """Write `benchmarks/results/<name>.json` (indent 2) and return its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def json_safe(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats become strings ("inf"), which strict JSON readers accept."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 1000 else f"{value:.0f}"
    return "-" if value is None else str(value)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """Print `rows` as an aligned text table with the given column keys (missing values as "-")."""
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
