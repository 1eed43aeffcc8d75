"""Latency measurement shared by `bench`, `demo` and the benchmark scripts (torch-free)."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np


def measure_latency(fn: Callable[[], object], warmup: int = 3, iters: int = 20, min_seconds: float = 0.0,
                    batch: int = 1) -> dict:
    """Run `fn` `warmup` times, then at least `iters` times and `min_seconds`; latency stats in ms.

    Percentiles follow benchmark_app's practice of reporting median/avg/min/max, plus p90/p99."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < iters or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    a = np.asarray(samples)
    return {"iters": len(a), "batch": batch, "median_ms": float(np.median(a)), "mean_ms": float(a.mean()),
            "min_ms": float(a.min()), "max_ms": float(a.max()), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "throughput_ips": float(batch * 1e3 / np.median(a))}
