"""Multi-stream runtime: stage equality with the single graph, real pinning read from /proc,
concurrency, lifecycle and core-spec errors. Uses real worker processes and OpenVINO."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import rel_l2, slow_param
from parnet_cpu.runtime import Runtime, RuntimeClosedError
from parnet_cpu.runtime.cores import CoreSpecError, parse_groups, proportional_sizes
from parnet_cpu.runtime.engine import CompileOptions, compile_model
from parnet_cpu.system.cpuinfo import parse_cpu_list

CPUS = sorted(os.sched_getaffinity(0))
# three stream groups on whatever this machine has (2 cores here: groups overlap, explicitly allowed)
GROUPS = [[CPUS[0]], [CPUS[-1]], [CPUS[0]]]


@pytest.fixture(scope="module")
def model_dir(narrow_int8_copy, tmp_path_factory) -> Path:
    """The narrow model in FP32 and INT8 (conftest's session folder: NNCF's quantizers where the default options
    put them; test_quantize covers the calibrated pipeline)."""
    return narrow_int8_copy(tmp_path_factory.mktemp("rt") / "narrow")


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 64, 64)).astype(np.float32)


@pytest.mark.parametrize("inits1,precision", [("recompute", "fp32"), ("share", "int8"),
                                              slow_param("recompute", "int8"), slow_param("share", "fp32")])
def test_multistream_equals_single_graph(model_dir, precision, inits1, monkeypatch):
    # INT8 with f32 leftovers: the cut itself must change nothing. (With bf16 leftovers, the default where
    # the CPU has bf16, each stage rounds its own float ops, so results agree to bf16 precision only.)
    monkeypatch.setenv("PARNET_CPU_INT8_LEFTOVERS", "f32")
    x = images(4)
    with Runtime(model_dir, cores=GROUPS, precision=precision, plan="multistream", inits1=inits1) as rt:
        assert rt.plan.kind == "multistream"
        got = rt.infer(x)
        ref = compile_model(rt.ir_path, CompileOptions(precision=precision))(x)[0]
        stages = set(rt.stats.summary())
    if precision == "fp32":
        assert rel_l2(got, ref) <= 1e-5
    else:
        assert (got.argmax(1) == ref.argmax(1)).all()
        assert rel_l2(got, ref) <= 1e-3  # stage boundaries sit at the graph's own quantizers: measured 0.0
    expected = {"stem", "stream1", "stream2", "stream3", "tail"} | ({"inits1"} if inits1 == "share" else set())
    assert stages == expected


def test_every_inference_thread_stays_in_its_group(model_dir):
    with Runtime(model_dir, cores=GROUPS, plan="multistream") as rt:
        rt.infer(images(1))  # make sure the inference threads exist
        aff = rt.thread_affinity()
    assert set(aff) == {"stem+tail", "stream1", "stream2", "stream3"}
    for name, info in aff.items():
        assert len(info["threads"]) >= 2, name  # main thread + OpenVINO's
        for tid, allowed in info["threads"].items():
            assert set(parse_cpu_list(allowed)) <= set(info["cpus"]), (name, tid, allowed)
        # the worker process is a different process, pinned as a whole
        assert info["pid"] != os.getpid()


def test_single_graph_owning_every_cpu_runs_in_process(model_dir):
    """A single-graph plan on all the CPUs the process may use runs in the process (no hand-over);
    on fewer CPUs it keeps a pinned worker. Both give the single graph's results."""
    x = images(3, seed=5)
    ref = compile_model(Path(model_dir) / "model_fp32.xml", CompileOptions(precision="fp32"))(x)[0]
    before = os.sched_getaffinity(0)
    cpu = min(before)
    os.sched_setaffinity(0, {cpu})  # this thread, and the threads OpenVINO starts from it, may use one CPU
    try:
        with Runtime(model_dir, precision="fp32", plan="single") as rt:
            assert rt.plan.cpus == [cpu] and "in this process" in rt.plan.reason
            got = rt.infer(x)
            rows = np.concatenate([f.result() for f in [rt.submit(x[i:i + 1]) for i in range(3)]])
            aff = rt.thread_affinity()["model"]
            assert rt.message_round_trip_ms() == 0.0
    finally:
        os.sched_setaffinity(0, before)
    assert aff["pid"] == os.getpid()
    assert rel_l2(got, ref) <= 1e-5 and rel_l2(rows, ref) <= 1e-5
    if len(before) > 1:
        with Runtime(model_dir, precision="fp32", plan="single", cores=[[cpu]]) as rt:
            assert "in this process" not in rt.plan.reason
            assert rt.thread_affinity()["model"]["pid"] != os.getpid()
            assert rel_l2(rt.infer(x), ref) <= 1e-5


def test_concurrent_callers_get_their_own_results(model_dir):
    x = images(16, seed=3)
    ref = compile_model(Path(model_dir) / "model_fp32.xml", CompileOptions(precision="fp32"))(x)[0]
    results: dict[int, np.ndarray] = {}
    with Runtime(model_dir, cores=GROUPS, precision="fp32", plan="multistream", inflight=3) as rt:
        def call(i: int) -> None:
            results[i] = rt.infer(x[i:i + 1]) if i % 2 else rt.submit(x[i:i + 1]).result()

        threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i in range(16):
        assert rel_l2(results[i], ref[i:i + 1]) <= 1e-5


def test_closed_runtime_and_bad_inputs(model_dir):
    rt = Runtime(model_dir, cores=GROUPS, plan="multistream", max_batch=2)
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 3, 64, 64\)"):
        rt.infer(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match="at least one image"):
        rt.infer(np.zeros((0, 3, 64, 64), np.float32))
    rt.close()
    with pytest.raises(RuntimeClosedError, match="closed"):
        rt.infer(images(1))
    with pytest.raises(RuntimeClosedError):
        rt.submit(images(1))
    rt.close()  # idempotent


def test_bad_core_specs(model_dir):
    n = len(CPUS)
    with pytest.raises(CoreSpecError, match=f"may use {n}"):
        Runtime(model_dir, cores_per_stream=n, plan="multistream")
    with pytest.raises(CoreSpecError, match="not usable"):
        Runtime(model_dir, cores=[[CPUS[0]], [CPUS[0]], [4096]])
    with pytest.raises(CoreSpecError, match="3 groups"):
        Runtime(model_dir, cores=[[CPUS[0]], [CPUS[-1]]])
    with pytest.raises(ValueError, match="^cores_per_stream: .*must be >= 1"):
        Runtime(model_dir, cores_per_stream=0)
    with pytest.raises(CoreSpecError):
        parse_groups("0-x:1")
    assert parse_groups("0-3:4-7;8,10") == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 10]]
    assert proportional_sizes([1.0, 1.25, 1.25], 16) == [5, 6, 5] or sum(proportional_sizes([1, 1.25, 1.25], 16)) == 16


@pytest.mark.slow
def test_two_runtimes_never_share_cores(model_dir):
    with Runtime(model_dir, plan="single") as first:
        assert set(first.plan.cpus) == set(CPUS)
        with pytest.raises(CoreSpecError, match="already used by another Runtime"):
            Runtime(model_dir, plan="single")
    with Runtime(model_dir, plan="single") as again:  # released on close
        assert again.plan.kind == "single"


@pytest.mark.slow
def test_auto_plan_is_never_slower_than_single(model_dir):
    with Runtime(model_dir) as rt:
        x = images(2)
        ref = compile_model(rt.ir_path, CompileOptions(precision=rt.precision))(x)[0]
        assert (rt.infer(x).argmax(1) == ref.argmax(1)).all()
        if len(CPUS) < 3:
            assert rt.plan.kind == "single" and "at least 3 physical cores" in rt.plan.reason
        else:
            assert "auto" in rt.plan.reason


def test_runtime_side_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys, parnet_cpu.runtime, parnet_cpu.data, parnet_cpu.evaluation, parnet_cpu.system.cpuinfo; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("plan", ["multistream", "single"])
def test_batches_larger_than_max_batch_are_split_in_order(model_dir, plan):
    """A batch of 2 * max_batch + 1 images runs as chunks of max_batch: the same logits, in the same order,
    as the chunks sent one by one (infer and submit alike)."""
    x = images(5, seed=7)
    cores = GROUPS if plan == "multistream" else None
    with Runtime(model_dir, cores=cores, precision="fp32", plan=plan, max_batch=2) as rt:
        chunks = np.concatenate([rt.infer(x[0:2]), rt.infer(x[2:4]), rt.infer(x[4:5])])
        whole = rt.infer(x)
        submitted = rt.submit(x).result()
    assert whole.shape == submitted.shape == (5, chunks.shape[1])
    np.testing.assert_array_equal(whole, chunks)
    np.testing.assert_array_equal(submitted, chunks)


GUARDLESS = """\
import numpy as np
from parnet_cpu.runtime import Runtime

rt = Runtime({model!r}, cores={cores!r}, plan="multistream")
print(rt.infer(np.zeros((1, 3, 64, 64), np.float32)).shape)
rt.close()
"""


def test_script_without_main_guard_fails_at_once_naming_the_guard(model_dir, tmp_path):
    """Worker processes are spawned, so each imports the main script again: a script that creates the Runtime
    at its top level, without `if __name__ == "__main__":`, must fail at once and name the line to add
    (not hang until the start timeout). The same script with the guard runs."""
    import subprocess
    import sys
    import time

    script = tmp_path / "embed.py"
    script.write_text(GUARDLESS.format(model=str(model_dir), cores=GROUPS))
    t0 = time.monotonic()
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert run.returncode != 0 and time.monotonic() - t0 < 60
    assert 'if __name__ == "__main__":' in run.stderr and "embed.py, line 4" in run.stderr, run.stderr

    body = GUARDLESS.format(model=str(model_dir), cores=GROUPS).split("\n\n", 1)
    guarded = body[0] + "\n\nif __name__ == \"__main__\":\n" + "".join(f"    {ln}\n" for ln in body[1].splitlines())
    script.write_text(guarded)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0 and "(1, " in run.stdout, run.stderr
