"""Quiet or refuse: no timing from a busy machine leaves this tool unmarked.

Every measuring command (`bench`, `profile`, `plan`'s profiling, the demo's speed half) goes through one
`LoadWatch` on the CPUs it times:

- before: other work on those CPUs is sampled (`system.load.wait_for_quiet`, read while this process
  sleeps) for at most `wait_s` seconds until it drops to `QUIET_LOAD` or below;
- during: between measurements (`sample()`), the busy time of those CPUs minus the CPU time of this
  process and its children (the load being measured) is what others used;
- a reading above `QUIET_LOAD` marks every row `machine_was_quiet: false` and prints a warning, or, with
  `require=True` (`--require-quiet`), raises `NotQuietError` (exit status 3) so no number comes out.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Sequence

from parnet_cpu.options import arg
from parnet_cpu.system.load import QUIET_LOAD, wait_for_quiet

NOT_QUIET_EXIT = 3  # exit status of a measuring command refused by --require-quiet
DEFAULT_WAIT_S = 10.0  # how long a busy machine is waited for before measuring anyway (or refusing)


class NotQuietError(RuntimeError):
    """Other work used the measured CPUs and `--require-quiet` was given."""


def _busy_seconds(cpus: Sequence[int]) -> float:
    """Non-idle seconds of `cpus` since boot (steal counts: on a VM it is other guests' work)."""
    import psutil

    wanted = set(cpus)
    return sum(t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)
               for c, t in enumerate(psutil.cpu_times(percpu=True)) if c in wanted)


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and every descendant (reaped children included): the measured work."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return total


class LoadWatch:
    """Other load on `cpus` before and during a measurement; see the module docstring."""

    def __init__(self, cpus: Sequence[int], require: bool = False, wait_s: float = DEFAULT_WAIT_S,
                 what: str = "measurement", log: Callable[[str], None] = print) -> None:
        self.cpus, self.require, self.wait_s, self.what, self.log = list(cpus), require, max(0.0, wait_s), what, log
        self.before: dict[int, float] = {}
        self.during: list[float] = []
        self._mark: tuple[float, float, float] | None = None

    def _snapshot(self) -> tuple[float, float, float]:
        return time.monotonic(), _busy_seconds(self.cpus), _own_cpu_seconds()

    def settle(self) -> "LoadWatch":
        """Wait (bounded) for the CPUs to be quiet; refuse or warn if they are not."""
        tries = 1 + int(self.wait_s / 0.7)  # each try samples 0.2 s, then pauses 0.5 s
        self.before = wait_for_quiet(self.cpus, tries=tries, pause=0.5)
        busiest = max(self.before.values(), default=0.0)
        if busiest > QUIET_LOAD:
            msg = (f"other work keeps CPUs {self._busy_cpus()} busy (up to {busiest:.2f} of a CPU, quiet is "
                   f"<= {QUIET_LOAD}) after waiting {self.wait_s:g} s")
            if self.require:
                raise NotQuietError(f"{msg}; refusing to measure (--require-quiet)")
            self.log(f"WARNING: {msg}; measuring anyway, every row is marked machine_was_quiet: false")
        self._mark = self._snapshot()
        return self

    def _busy_cpus(self) -> str:
        from parnet_cpu.system.cpuinfo import format_cpu_list

        return format_cpu_list(sorted(c for c, v in self.before.items() if v > QUIET_LOAD)) or "?"

    def sample(self) -> float:
        """Others' load (CPUs' worth per measured CPU) since the last sample or `settle`."""
        now = self._snapshot()
        if self._mark is None:
            self._mark = now
            return 0.0
        (t0, busy0, own0), (t1, busy1, own1) = self._mark, now
        self._mark = now
        if t1 - t0 < 0.05:
            return 0.0
        load = max(0.0, (busy1 - busy0) - (own1 - own0)) / ((t1 - t0) * max(1, len(self.cpus)))
        self.during.append(load)
        return load

    @property
    def quiet(self) -> bool:
        return max([*self.before.values(), *self.during], default=0.0) <= QUIET_LOAD

    def summary(self) -> dict:
        """What goes into the result JSON."""
        return {"threshold": QUIET_LOAD, "cpus": self.cpus, "waited_up_to_s": self.wait_s,
                "before": {str(c): round(v, 3) for c, v in self.before.items()},
                "during": [round(v, 3) for v in self.during],
                "max": round(max([*self.before.values(), *self.during], default=0.0), 3),
                "machine_was_quiet": self.quiet}

    def finish(self, rows: Sequence[dict] = ()) -> dict:
        """Mark `rows`, warn if others were busy during the run, and return the summary. With `require`,
        a busy run raises `NotQuietError` after the rows are marked (the caller may still save them)."""
        if self._mark is not None:
            self.sample()
        for r in rows:
            r["machine_was_quiet"] = self.quiet
        summary = self.summary()
        if not self.quiet and max(self.during, default=0.0) > QUIET_LOAD:
            msg = (f"other work used the measured CPUs during the {self.what} (up to {max(self.during):.2f} of a "
                   f"CPU each, quiet is <= {QUIET_LOAD}): the numbers are marked machine_was_quiet: false")
            self.log(f"WARNING: {msg}")
        return summary

    def check(self) -> None:
        """Raise `NotQuietError` if the run was not quiet and `require` was asked."""
        if self.require and not self.quiet:
            raise NotQuietError(f"the machine was not quiet during the {self.what} (other load up to "
                                f"{self.summary()['max']:.2f} of a CPU): the numbers are not valid (--require-quiet)")


def refuse(command: str, exc: NotQuietError) -> int:
    """Say why a measuring command refused and return its exit status."""
    print(f"parnet-cpu {command}: not quiet: {exc}", file=sys.stderr)
    return NOT_QUIET_EXIT


def add_quiet_args(p) -> None:
    """The two flags every measuring command shares."""
    p.add_argument("--require-quiet", action="store_true",
                   help=f"refuse (exit {NOT_QUIET_EXIT}) instead of measuring when other work uses the measured CPUs "
                        f"(more than {QUIET_LOAD} of a CPU) before or during the run")
    p.add_argument("--quiet-wait", type=arg("quiet_wait"), default=DEFAULT_WAIT_S, metavar="S",
                   help=f"seconds to wait for a busy machine to go quiet before measuring (default {DEFAULT_WAIT_S:g})")
