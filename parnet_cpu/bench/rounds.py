"""The one interleaved timing loop: engines measured in alternating rounds (A B C A B C ...), ratios per round.

Timed one after another, engines on a shared machine are compared across minutes of drifting load: the
README's demo once printed the Runtime at 0.85x OpenVINO where an interleaved run a minute later gave
1.00x. Here every engine runs once per round, in turn, so drift hits all of them alike; each ratio is
taken within a round (A_r / B_r) and reported with its median and range over the rounds. Used by
`bench`, the demo's speed half and benchmarks/matrix_unit.py.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence, TypeVar

import numpy as np

T = TypeVar("T")


def interleaved_rounds(runners: Mapping[str, Callable[[], T]], rounds: int,
                       between: Callable[[], object] | None = None) -> tuple[dict[str, list[T]], dict[str, str]]:
    """Call every runner once per round, in order, `rounds` times; `between()` after each round (the
    quiet check samples there). A runner that raises is dropped from later rounds and its error kept:
    returns (results per runner, error message per failed runner)."""
    results: dict[str, list[T]] = {name: [] for name in runners}
    errors: dict[str, str] = {}
    for _ in range(max(1, rounds)):
        for name, run in runners.items():
            if name in errors:
                continue
            try:
                results[name].append(run())
            except Exception as exc:  # one engine failing must not lose the others' rounds
                errors[name] = f"{type(exc).__name__}: {exc}"
        if between is not None:
            between()
    return results, errors


def spread(values: Sequence[float]) -> dict:
    """Median and range of per-round values (what a ratio or a per-engine figure is reported with)."""
    a = np.asarray(values, dtype=float)
    return {"median": float(np.median(a)), "min": float(a.min()), "max": float(a.max()),
            "values": [round(float(v), 4) for v in a]}


def per_round_ratios(values: Sequence[float], base: Sequence[float]) -> dict:
    """`values[r] / base[r]` for each round both have, with its median and range."""
    return spread([v / b for v, b in zip(values, base)])


def combine_rounds(stats: Sequence[dict]) -> dict:
    """One engine's per-round `measure_latency` results as one row: the median of the round medians, the
    spread of the round medians and throughputs, and the extremes over every call."""
    med = [s["median_ms"] for s in stats]
    thr = [s["throughput_ips"] for s in stats]
    iters = sum(s["iters"] for s in stats)
    return {"iters": iters, "batch": stats[0]["batch"], "rounds": len(stats), "median_ms": float(np.median(med)),
            "mean_ms": sum(s["mean_ms"] * s["iters"] for s in stats) / iters,
            "min_ms": min(s["min_ms"] for s in stats), "max_ms": max(s["max_ms"] for s in stats),
            "p90_ms": float(np.median([s["p90_ms"] for s in stats])),
            "p99_ms": float(np.median([s["p99_ms"] for s in stats])),
            "throughput_ips": float(np.median(thr)), "round_median_ms": spread(med), "round_throughput_ips": spread(thr)}
