"""The one pinned child-process harness (`parnet_cpu.perf.pinned`): results and exceptions come back,
and a child that crashes, is killed or hangs gives the parent a clear error within seconds, never a hang."""
from __future__ import annotations

import os
import signal
import time

import pytest

from parnet_cpu.perf.pinned import PinnedChildError, PinnedChildTimeout, run_pinned

CPUS = sorted(os.sched_getaffinity(0))


def affinity_and_args(*args):
    return sorted(os.sched_getaffinity(0)), args


def raise_value_error():
    raise ValueError("boom")


def exit_without_answer():
    os._exit(3)


def kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def sleep_forever():
    time.sleep(600)


def test_result_comes_back_from_a_child_pinned_to_the_cpus():
    cpus, args = run_pinned(affinity_and_args, (1, "two"), CPUS[-1:])
    assert cpus == CPUS[-1:] and args == (1, "two")


def test_exception_in_the_child_is_reported_by_type_and_message():
    with pytest.raises(PinnedChildError, match=r"^ValueError: boom$"):
        run_pinned(raise_value_error, (), CPUS)


@pytest.mark.parametrize("target, how", [(exit_without_answer, "exit code 3"), (kill_self, "killed by signal 9")])
def test_crashed_child_fails_fast_instead_of_hanging(target, how):
    t0 = time.monotonic()
    with pytest.raises(PinnedChildError, match=f"crashy: the child process died without answering \\({how}\\)"):
        run_pinned(target, (), CPUS, timeout_s=120, what="crashy")
    # the parent's copy of the child's pipe end is closed: end-of-file as soon as the child is gone
    assert time.monotonic() - t0 < 30


@pytest.mark.slow
def test_hung_child_is_killed_after_the_timeout():
    t0 = time.monotonic()
    with pytest.raises(PinnedChildTimeout, match="sleepy: no answer in 3 s"):
        run_pinned(sleep_forever, (), CPUS, timeout_s=3, what="sleepy")
    assert time.monotonic() - t0 < 30


def test_a_failing_bench_engine_becomes_error_rows():
    from parnet_cpu.bench import BenchConfig, run_pinned_engine

    rows = run_pinned_engine("warp-drive", "/nonexistent", "fp32", CPUS, BenchConfig(batches=(1, 2)), None)
    assert rows == [{"engine": "warp-drive", "batch": b, "error": "ValueError: unknown engine 'warp-drive'"}
                    for b in (1, 2)]
