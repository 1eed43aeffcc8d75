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
    rounds: int = 5  # engines alternate A B C A B C ...; iters and min_seconds are split over the rounds
    calib_dir: str | None = None  # images ort-int8 calibrates on (default: the shipped calibration photos)

    def per_round(self) -> tuple[int, float]:
        """(iterations, minimum seconds) of one engine in one round."""
        rounds = max(1, self.rounds)
        return max(2, -(-self.iters // rounds)), self.min_seconds / rounds


def throughput(run_many, n_requests: int, batch: int) -> float:
    """Images per second of `run_many(n_requests)` (requests of `batch` images each)."""
    t0 = time.perf_counter()
    run_many(n_requests)
    return n_requests * batch / (time.perf_counter() - t0)
