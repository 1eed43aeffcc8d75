"""What every part of the benchmark shares: its settings and the throughput loop."""
from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class BenchConfig:
    batches: tuple[int, ...] = (1, 8)
    warmup: int = 2
    iters: int = 10
    min_seconds: float = 0.2
    engines: tuple[str, ...] | None = None  # None: DEFAULT_ENGINES plus the INT8 artifacts present
    require_quiet: bool = False  # refuse (NotQuietError) instead of marking a run on a busy machine
    quiet_wait_s: float = 10.0  # how long to wait for a busy machine to go quiet first


def throughput(run_many, n_requests: int, batch: int) -> float:
    """Images per second of `run_many(n_requests)` (requests of `batch` images each)."""
    t0 = time.perf_counter()
    run_many(n_requests)
    return n_requests * batch / (time.perf_counter() - t0)
