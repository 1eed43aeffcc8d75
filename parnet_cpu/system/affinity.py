"""Facts about processes and CPUs: which CPUs each thread of this process may run on, and pinning them all.

Used by the runtime's pinned workers, the pinned child harness (`parnet_cpu.perf.pinned`) and the
competing engines of `bench`.
"""
from __future__ import annotations

import os


def thread_affinities() -> dict[int, str]:
    """Cpus_allowed_list of every thread of this process, straight from /proc."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("Cpus_allowed_list:"):
                        out[int(tid)] = line.split(":", 1)[1].strip()
        except FileNotFoundError:  # thread ended meanwhile
            pass
    return out


def pin_process(cpus) -> None:
    """Confine every thread of this process to `cpus`. sched_setaffinity(0) moves only the calling
    thread; threads started while the worker was being unpickled (numpy's BLAS pool) need their own
    call. Threads created later inherit the mask."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:
            pass
