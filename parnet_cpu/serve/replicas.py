"""Replicas: N single-graph runtimes on disjoint leased core groups behind one `submit()`, for throughput.

A replica is a whole model on its own cores; requests go to the replica with the fewest batches in
flight. Against one runtime on all cores (lowest latency per request), replicas trade latency for
throughput: INT8 ParNet layers are too short to keep many cores busy at batch 1, so k small copies
usually answer more requests per second than one copy on k times the cores. `choose_replicas`
measures that trade-off at start-up and keeps the most replicas whose p99 meets a latency target.
Torch-free, like the rest of the server.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from parnet_cpu.runtime.cores import CoreSpecError
from parnet_cpu.runtime.leases import ProcessBound, available_cores, lease_transaction


def split_cores(cores: Sequence[Sequence[int]], replicas: int) -> list[list[int]]:
    """`replicas` disjoint groups of len(cores) // replicas physical cores each (NUMA order kept)."""
    if replicas < 1:
        raise CoreSpecError("replicas must be at least 1")
    per = len(cores) // replicas
    if per < 1:
        raise CoreSpecError(f"{replicas} replicas need at least {replicas} free physical cores, "
                            f"{len(cores)} are free")
    return [sorted(c for core in cores[i * per:(i + 1) * per] for c in core) for i in range(replicas)]


class ReplicaSet(ProcessBound):
    """N `Runtime`s (single graph each) on disjoint leased cores, answering like one Runtime."""

    def __init__(self, model_dir: str | Path, replicas: int, precision: str | None = None, max_batch: int = 8,
                 inflight: int = 2, use_smt: bool = False, share: bool = False, timeout: float | None = 60.0) -> None:
        from parnet_cpu.runtime import Runtime

        self.runtimes: list = []
        with lease_transaction():  # choose the groups and lease them with no other runtime in between
            self.groups = split_cores(available_cores(use_smt, share=share), replicas)
            try:
                for g in self.groups:
                    self.runtimes.append(Runtime(model_dir, cores=[g], plan="single", precision=precision,
                                                 max_batch=max_batch, inflight=inflight, share=share,
                                                 timeout=timeout))
            except BaseException:
                self.close()
                raise
        first = self.runtimes[0]
        self.model_dir, self.input_shape, self.precision = first.model_dir, first.input_shape, first.precision
        self.max_batch = first.max_batch
        self.inflight = sum(rt.inflight for rt in self.runtimes)
        self._busy = [0] * len(self.runtimes)
        self._lock = threading.Lock()
        self._next = 0
        self.stats = self  # the app reads `stats.summary()`

    def _pick(self) -> int:
        """The replica with the fewest batches in flight; ties rotate, so idle replicas share the work."""
        with self._lock:
            n = len(self.runtimes)
            i = min(range(n), key=lambda k: (self._busy[(self._next + k) % n], k))
            i = (self._next + i) % n
            self._next = (i + 1) % n
            self._busy[i] += 1
            return i

    def _done(self, i: int) -> None:
        with self._lock:
            self._busy[i] -= 1

    def submit(self, batch: np.ndarray) -> Future:
        i = self._pick()
        try:
            fut = self.runtimes[i].submit(batch)
        except BaseException:
            self._done(i)
            raise
        fut.add_done_callback(lambda _f, i=i: self._done(i))
        return fut

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.submit(batch).result()

    def summary(self) -> dict:
        """Stage times of every replica, keyed `replica<i>.<stage>`."""
        return {f"replica{i}.{k}": v for i, rt in enumerate(self.runtimes) for k, v in rt.stats.summary().items()}

    def failure(self) -> str | None:
        for i, rt in enumerate(self.runtimes):
            why = rt.failure() if hasattr(rt, "failure") else None
            if why:
                return f"replica {i}: {why}"
        return None

    def describe(self) -> dict:
        return {"replicas": len(self.runtimes), "precision": self.precision, "max_batch": self.max_batch,
                "inflight": self.inflight, "runtimes": [rt.describe() for rt in self.runtimes]}

    def close(self) -> None:
        for rt in self.runtimes:
            rt.close()

    def __enter__(self) -> "ReplicaSet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class LoadResult:
    clients: int
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def throughput_ips(self) -> float:
        return self.requests / self.seconds

    def to_dict(self) -> dict:
        return {"clients": self.clients, "requests": self.requests, "seconds": round(self.seconds, 3),
                "p50_ms": round(self.p50_ms, 3), "p99_ms": round(self.p99_ms, 3),
                "throughput_ips": round(self.throughput_ips, 1)}


def closed_loop(submit: Callable[[np.ndarray], Future], x: np.ndarray, clients: int, seconds: float,
                warmup: int = 3) -> LoadResult:
    """`clients` callers, each sending `x` and waiting for the answer, for `seconds`: latency per request
    (p50/p99) and requests per second. The same load for replicas and for the alternatives."""
    for _ in range(warmup):
        submit(x).result()
    lat: list[float] = []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client() -> None:
        mine = []
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            submit(x).result()
            mine.append(time.perf_counter() - t0)
        with lock:
            lat.extend(mine)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.array(lat) * 1e3
    return LoadResult(clients, len(lat), wall, float(np.percentile(ms, 50)), float(np.percentile(ms, 99)))


def replica_counts(free_cores: int) -> list[int]:
    """Replica counts worth trying: for each group size, as many groups as the free cores hold."""
    return sorted({free_cores // per for per in range(1, free_cores + 1)})


def choose_replicas(model_dir: str | Path, p99_ms: float | None = None, seconds: float = 1.5, log=None,
                    **kwargs) -> tuple[ReplicaSet, dict]:
    """`--replicas auto`: measure each replica count under a closed-loop load of two callers per replica
    and keep the highest throughput whose p99 meets `p99_ms` (default: 1.5x the p50 of one replica on all
    the free cores answering one caller at batch 1). When none meets it: the count with the lowest p99, and
    the returned dict has `target_met` False and a `warning` naming the target and what was measured.
    Returns the running set and what was measured."""
    free = len(available_cores(kwargs.get("use_smt", False), share=kwargs.get("share", False)))
    if free < 1:
        raise CoreSpecError("no free core for the replicas")
    rows, target = [], p99_ms
    for n in replica_counts(free):
        with ReplicaSet(model_dir, n, **kwargs) as rs:  # one count at a time: each needs the same cores
            x = np.zeros((1, *rs.input_shape), np.float32)
            if target is None:
                target = 1.5 * closed_loop(rs.runtimes[0].submit, x, 1, seconds / 2).p50_ms
            res = closed_loop(rs.submit, x, 2 * n, seconds)
        rows.append({"replicas": n, "cores_per_replica": free // n, **res.to_dict(), "meets_p99": res.p99_ms <= target})
        if log:
            log(f"replicas {n}: {res.throughput_ips:.0f} img/s, p50 {res.p50_ms:.2f} ms, p99 {res.p99_ms:.2f} ms")
    fitting = [r for r in rows if r["meets_p99"]]
    info: dict = {"p99_target_ms": round(target, 3), "measured": rows, "target_met": bool(fitting)}
    if fitting:
        chosen = max(fitting, key=lambda r: r["throughput_ips"])["replicas"]
    else:  # nothing meets it: the count closest to it, and the caller says so loudly (a WARNING, not INFO)
        best = min(rows, key=lambda r: r["p99_ms"])
        chosen = best["replicas"]
        info["warning"] = (f"no replica count meets the p99 target of {target:g} ms: the lowest p99 measured is "
                           f"{best['p99_ms']:.2f} ms ({chosen} replica(s), {best['throughput_ips']:.0f} img/s); "
                           f"starting {chosen} replica(s) anyway - raise --p99-ms or give the server more cores")
    info["chosen"] = chosen
    return ReplicaSet(model_dir, chosen, **kwargs), info
