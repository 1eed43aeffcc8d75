"""What other work costs on given CPUs right now, read from /proc/stat while this process sleeps.

Facts about the machine's load, used wherever a timing must not be taken under other work: `Runtime`'s
auto plan, `bench`, `profile` and `plan`'s profiling (`parnet_cpu.bench.quiet` decides what to do about it).
"""
from __future__ import annotations

import time
from typing import Sequence

QUIET_LOAD = 0.25  # other work above a quarter of a CPU on a measured CPU makes a measurement unreliable


def _proc_stat_cpus() -> dict[int, tuple[int, int]]:
    """Per CPU (busy, total) jiffies from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3:4].isdigit():
                name, *vals = line.split()
                v = [int(x) for x in vals]
                idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
                out[int(name[3:])] = (sum(v[:8]) - idle, sum(v[:8]))
    return out


def other_load(cpus: Sequence[int], seconds: float = 0.2) -> dict[int, float]:
    """Busy fraction of each CPU over `seconds` while this process sleeps: what other work costs there
    (0 = quiet, 1 = a full CPU busy). Read from /proc/stat; an unreadable file counts as quiet."""
    try:
        a = _proc_stat_cpus()
        time.sleep(seconds)
        b = _proc_stat_cpus()
    except OSError:
        return {}
    out = {}
    for c in cpus:
        if c in a and c in b and b[c][1] > a[c][1]:
            out[c] = (b[c][0] - a[c][0]) / (b[c][1] - a[c][1])
    return out


def wait_for_quiet(cpus: Sequence[int], tries: int = 3, pause: float = 0.5) -> dict[int, float]:
    """Load of `cpus` once it is below QUIET_LOAD, or the last reading after `tries` (the caller decides
    not to keep a measurement taken under it)."""
    load: dict[int, float] = {}
    for i in range(tries):
        load = other_load(cpus)
        if max(load.values(), default=0.0) <= QUIET_LOAD:
            break
        if i + 1 < tries:
            time.sleep(pause)
    return load


