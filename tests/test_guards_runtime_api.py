"""Hostile pass on issue 21, defects 5, 6, 8, 10 and 11: the Runtime's Python API at its doors.

5: objects that own this process's resources (Runtime, CoreLease, the batchers) refuse copy, deepcopy and
   pickling with the fix (`leases.ProcessBound`): a copy's close() freed the original's leases and shared memory.
6: a CPU list names no CPU beyond the bound (`cpuinfo.cpu_id_limit`) and is never expanded before the check.
8: one input check (`runtime.check_images`: shape, dtype, finite in FP32) behind every entry, the server's too.
10: a per-call `timeout` is checked by `options` (the one validation layer) before the call.
11: a relative PARNET_CPU_LEASE_DIR is refused (it named a different folder in each working directory).

Real OpenVINO runtimes (single graph in this process; multi-stream on worker processes), a real `parnet-cpu
serve` process and HTTP client, real subprocesses under a real address-space limit for the CPU lists.
"""
from __future__ import annotations

import asyncio
import copy
import math
import multiprocessing as mp
import os
import pickle
import resource
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import NARROW, slow_param
from test_serve import REPO, ServerProcess, v2_binary

CPUS = sorted(os.sched_getaffinity(0))
GROUPS = [[CPUS[0]], [CPUS[-1]], [CPUS[0]]]  # three stream groups on 2 cores, as the other runtime tests
SHAPE = (3, NARROW["input_size"], NARROW["input_size"])

pytestmark = pytest.mark.usefixtures("own_lease_namespace")  # conftest: leases are machine-wide


@pytest.fixture(scope="module")
def model_dir(narrow_copy, tmp_path_factory) -> Path:
    return narrow_copy(tmp_path_factory.mktemp("guards_api") / "narrow")


@pytest.fixture(scope="module", params=["single", "multistream"])
def rt(request, model_dir):
    from parnet_cpu.runtime import Runtime

    kw = {"plan": "single"} if request.param == "single" else {"plan": "multistream", "cores": GROUPS, "share": True}
    with _no_fail():
        runtime = Runtime(model_dir, max_batch=4, **kw)
    yield runtime
    runtime.close()


class _no_fail:  # sharing warnings of the multi-stream groups on 2 cores are expected, not failures
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *SHAPE)).astype(np.float32)


# ---------------------------------------------------------------------------------------------- 5: copies

def test_5_runtime_refuses_copy_deepcopy_pickle_and_stays_whole(rt):
    """copy.copy(rt).close() stripped the original's leases (single) or killed the caller with SIGSEGV
    (multi-stream: the copy unmapped the shared memory); pickle.dumps gave a bare '_thread.lock' TypeError."""
    from parnet_cpu.runtime.leases import current_leases

    x = images(2)
    before = rt.infer(x)
    leased = {lease.cpu for lease in current_leases() if lease.pid == os.getpid()}
    assert leased, "the runtime holds its cores"
    for attempt in (copy.copy, copy.deepcopy, pickle.dumps, lambda r: pickle.dumps(r, protocol=0),
                    lambda r: copy.deepcopy({"runtimes": [r]})):  # inside a container too
        with pytest.raises(TypeError, match="cannot be copied or pickled") as err:
            attempt(rt)
        assert "Runtime" in str(err.value) and "model folder" in str(err.value)
    assert {lease.cpu for lease in current_leases() if lease.pid == os.getpid()} == leased
    np.testing.assert_array_equal(rt.infer(x), before)


def test_5_sending_a_runtime_to_a_spawned_process_names_the_fix(rt):
    """multiprocessing pickles a Process's arguments (spawn, forkserver): refused before any child starts."""
    proc = mp.get_context("spawn").Process(target=print, args=(rt,))
    with pytest.raises(TypeError, match="open a Runtime in the other process"):
        proc.start()
    assert proc.pid is None


def test_5_leases_and_batchers_refuse_copies_too(rt):
    """Not in the pass: a copied CoreLease's release() closed the original's lock files; a copied batcher
    shares its queue, task and runtime slots."""
    from parnet_cpu.runtime.leases import CoreLease, current_leases
    from parnet_cpu.serve.batcher import Batcher, DynamicBatcher

    with _no_fail():
        lease = CoreLease([CPUS[0]], share=True)
    try:
        for attempt in (copy.copy, copy.deepcopy, pickle.dumps):
            with pytest.raises(TypeError, match="CoreLease cannot be copied"):
                attempt(lease)
        assert any(entry.pid == os.getpid() and entry.cpu == CPUS[0] for entry in current_leases())
    finally:
        lease.release()
    for batcher in (Batcher(rt), DynamicBatcher(rt.submit, max_batch=2)):
        for attempt in (copy.copy, copy.deepcopy, pickle.dumps):
            with pytest.raises(TypeError, match=f"{type(batcher).__name__} cannot be copied.*Batcher on it"):
                attempt(batcher)



def test_5_replica_sets_refuse_copies_too():
    """A ReplicaSet owns several Runtimes: a copy's close() would close the original's. Checked on a bare
    instance (no runtimes started), since copy and pickle refuse before looking at any state."""
    from parnet_cpu.serve.replicas import ReplicaSet

    bare = ReplicaSet.__new__(ReplicaSet)
    for attempt in (copy.copy, copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError, match="ReplicaSet cannot be copied"):
            attempt(bare)

# ---------------------------------------------------------------------------------------------- 6: CPU lists

BOUNDED = r'''
import resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # the old code needed 22 GB: a MemoryError here
t0 = time.monotonic()
{body}
print("SECONDS", time.monotonic() - t0)
'''


def bounded(body: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BOUNDED.format(body=body)], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


@pytest.mark.parametrize("spec", ["0-1000000000", slow_param("0-10000000:0:0"), slow_param("0:1-4096"), "9" * 5000,
                                  slow_param("0,4096"), slow_param("4095-4096")],
                         ids=lambda spec: spec if len(spec) < 20 else f"{len(spec)} digits")
def test_6_a_cpu_list_beyond_the_bound_is_refused_before_expanding(spec):
    """'0-1000000000' grew a 22 GB set (OOM-killed); '0-10000000:0:0' took 1.3 GB and 10 s before its error.
    Others not in the pass: a bound exactly one past the limit, a 5000-digit id (int() refuses > 4300)."""
    from parnet_cpu.runtime.cores import parse_groups

    r = bounded(f"from parnet_cpu.runtime.cores import parse_groups, CoreSpecError\n"
                f"try:\n    parse_groups({spec!r})\nexcept CoreSpecError as exc:\n    print('REFUSED', exc)")
    assert r.returncode == 0 and "REFUSED" in r.stdout, (r.stdout, r.stderr[-2000:])
    assert "beyond 4095" in r.stdout and "Traceback" not in r.stderr
    assert float(r.stdout.split("SECONDS")[1]) < 5
    assert parse_groups("0-4095")[0] == list(range(4096))  # the bound itself is a CPU list


def test_6_ranges_repeated_many_times_cost_their_length_only():
    """Not in the pass: 20000 repeats of the widest range (expanded once each before) and overlapping
    ranges; the answer is the same sorted unique list."""
    from parnet_cpu.system.cpuinfo import parse_cpu_list

    assert parse_cpu_list(",".join(["0-4095"] * 20000)) == list(range(4096))
    assert parse_cpu_list("8-12,0-3,2-9,11") == list(range(13))
    with pytest.raises(ValueError, match="invalid CPU list"):
        parse_cpu_list("\u0660-\u0663")  # Arabic-Indic digits are not a CPU list


def test_6_runtime_and_serve_refuse_a_huge_cpu_range(model_dir):
    """The pass's own entries: Runtime(cores=..., share=True) and `serve --cores`, each under 3 GiB."""
    r = bounded(f"from parnet_cpu.runtime import Runtime\nfrom parnet_cpu.runtime.cores import CoreSpecError\n"
                f"try:\n    Runtime({str(model_dir)!r}, cores='0-1000000000', share=True)\n"
                f"except CoreSpecError as exc:\n    print('REFUSED', exc)")
    assert "REFUSED" in r.stdout and "beyond 4095" in r.stdout, (r.stdout, r.stderr[-2000:])
    serve = subprocess.run([sys.executable, "-m", "parnet_cpu", "serve", "--model-dir", str(model_dir), "--cores",
                            "0-1000000000", "--port", "0"], capture_output=True, text=True, timeout=120, cwd=REPO,
                           preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30)))
    assert serve.returncode == 2 and "beyond 4095" in serve.stderr, serve.stderr[-2000:]
    assert "Traceback" not in serve.stderr


# ---------------------------------------------------------------------------------------------- 8: inputs

NON_FINITE = "NaN or infinity"


def bad_batches() -> dict[str, np.ndarray]:
    x = images(3, seed=1)
    nan, inf, ninf, big = x.copy(), x.copy(), x.copy(), x.astype(np.float64)
    nan[:] = np.nan  # the pass's case: all NaN
    inf[2, 1, 5, 7] = np.inf  # one value of the last image
    ninf[0, 0, 0, 0] = -np.inf
    big[1, 2, 3, 4] = 1e39  # finite in float64, beyond FP32: inf once cast
    return {"all NaN": nan, "one +inf": inf, "one -inf": ninf, "beyond FP32 (float64)": big,
            "one NaN, float16": x.astype(np.float16) * np.float16(np.nan)}


def first_bad(batch: np.ndarray) -> int:
    with np.errstate(over="ignore"):
        return int(np.flatnonzero(~np.isfinite(batch.astype(np.float32)).reshape(len(batch), -1).all(1))[0])


def test_8_every_runtime_entry_refuses_non_finite_images(rt):
    """An all-NaN batch got finite logits from infer (the ReLU swallows NaN); the server refused it with 400.
    Every entry now refuses through the one check, names the images, and the runtime answers on, unchanged."""
    from parnet_cpu.runtime.runtime import InputError

    x = images(3, seed=1)
    good = rt.infer(x)
    entries = {"infer": rt.infer, "submit": lambda b: rt.submit(b).result(), "classify": rt.classify,
               "infer_async": lambda b: asyncio.run(rt.infer_async(b)),
               "classify_async": lambda b: asyncio.run(rt.classify_async(b, top_k=2)),
               "one image (C, H, W)": lambda b: rt.infer(b[first_bad(b)]),
               "more than max_batch": lambda b: rt.infer(np.concatenate([b, b]))}
    for what, batch in bad_batches().items():
        for name, entry in entries.items():
            with pytest.raises(InputError, match=NON_FINITE) as err:
                entry(batch)
            assert "image(s)" in str(err.value), (what, name)
    with pytest.raises(InputError, match=r"image\(s\) 2 of 3"):
        rt.infer(bad_batches()["one +inf"])
    np.testing.assert_array_equal(rt.infer(x), good)
    np.testing.assert_array_equal(rt.infer(x.astype(np.float64)), good)  # finite float64 still fine


def test_8_a_bad_request_in_the_batcher_fails_alone(rt):
    """Not in the pass: the Batcher checks each request before it is batched, so a NaN request cannot fail
    the good requests that share its batch."""
    from parnet_cpu.runtime.runtime import InputError
    from parnet_cpu.serve.batcher import Batcher

    x, nan = images(1, seed=2), np.full((1, *SHAPE), np.nan, np.float32)

    async def main():
        async with Batcher(rt, max_wait_ms=50) as b:
            return await asyncio.gather(b.infer(x), b.infer(nan), b.infer(x), return_exceptions=True)

    first, bad, last = asyncio.run(main())
    assert isinstance(bad, InputError) and NON_FINITE in str(bad)
    np.testing.assert_array_equal(first, rt.infer(x))
    np.testing.assert_array_equal(last, first)


def test_8_the_server_refuses_with_the_same_check(model_dir, tmp_path):
    """The v2 endpoint calls `check_images` (no copy of the rule): its 400 carries the Runtime's own words."""
    from parnet_cpu.runtime.runtime import InputError, check_images

    srv = ServerProcess(model_dir, tmp_path, "--plan", "single", "--precision", "fp32", "--share-cores")
    try:
        url = f"{srv.url}/v2/models/parnet/infer"
        for what, batch in bad_batches().items():
            if batch.dtype != np.float32:
                continue  # the wire format is FP32 only
            with pytest.raises(InputError) as err:
                check_images(batch, SHAPE)
            body, headers = v2_binary(batch)
            r = httpx.post(url, content=body, headers=headers, timeout=60)
            assert r.status_code == 400, (what, r.text)
            assert r.json()["error"] == f"input 'input': {err.value}", what
        body, headers = v2_binary(images(1))
        assert httpx.post(url, content=body, headers=headers, timeout=60).status_code == 200
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------------- 10: timeout

@pytest.mark.parametrize("timeout", [math.nan, -1, 0, -math.inf, "5", True, 1e9, 1e-6, [5]])
def test_10_a_bad_per_call_timeout_is_an_option_error(rt, timeout):
    """nan and -1 gave an immediate InferenceTimeout blaming a healthy worker; "5" a bare TypeError. Others
    not in the pass: 0, -inf, True, beyond a day, under a millisecond, a list. Refused before the call, by
    every entry (submit at once, not in its future)."""
    from parnet_cpu.options import OptionError

    x = images(1)
    for entry in (lambda: rt.infer(x, timeout=timeout), lambda: rt.submit(x, timeout=timeout),
                  lambda: rt.classify(x, timeout=timeout), lambda: asyncio.run(rt.infer_async(x, timeout))):
        with pytest.raises(OptionError, match=r"^timeout: .*math\.inf \(no limit\)") as err:
            entry()
        assert err.value.option == "timeout"
    assert rt.healthy()


def test_10_good_timeouts_still_run(rt):
    x = images(1)
    want = rt.infer(x)
    for timeout in (None, 30, 30.0, np.float64(30), math.inf, np.inf):
        np.testing.assert_array_equal(rt.infer(x, timeout=timeout), want)
    np.testing.assert_array_equal(rt.submit(x, timeout=math.inf).result(), want)


# ---------------------------------------------------------------------------------------------- 11: lease dir

@pytest.mark.parametrize("value", [" ", "leases", "./leases", "../x/leases", "~/leases"])
def test_11_a_relative_lease_dir_is_refused(model_dir, tmp_path, monkeypatch, value):
    """' ' and 'leases' were created under the current folder: runtimes started from two folders shared
    cores unwarned. Not in the pass: './', '../' and an unexpanded '~' (no shell expanded it)."""
    from parnet_cpu.runtime import Runtime
    from parnet_cpu.runtime.leases import LeaseDirError, current_leases

    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("PARNET_CPU_LEASE_DIR", value)
    with pytest.raises(LeaseDirError, match="relative path.*absolute path"):
        Runtime(model_dir, plan="single")
    with pytest.raises(LeaseDirError, match="relative path"):
        current_leases()
    assert list(work.iterdir()) == [] and not (tmp_path / "x").exists()


def test_11_an_absolute_lease_dir_still_works(model_dir, tmp_path, monkeypatch):
    from parnet_cpu.runtime.leases import current_leases, lease_dir

    monkeypatch.setenv("PARNET_CPU_LEASE_DIR", str(tmp_path / "abs" / "leases"))
    assert lease_dir() == tmp_path / "abs" / "leases" and lease_dir().is_dir()
    assert current_leases() == []



def test_3_numpy_scalars_become_plain_numbers_in_runtime_and_config(model_dir):
    """Second hostile pass: Runtime(max_batch=np.int64(8)) passed the check but kept the numpy scalar, which
    OpenVINO's reshape refused with its own TypeError. The checked (plain) values are the ones kept."""
    from parnet_cpu.runtime import Runtime
    from parnet_cpu.serve.app import ServeConfig

    with _no_fail(), Runtime(model_dir, plan="single", share=True, max_batch=np.int64(2), inflight=np.int32(1),
                             timeout=np.float32(30)) as runtime:
        assert type(runtime.max_batch) is int and type(runtime.inflight) is int and type(runtime.timeout) is float
        assert runtime.infer(np.zeros((2, *runtime.input_shape), np.float32)).shape[0] == 2
    assert type(ServeConfig(model="m", max_batch=np.int64(4)).max_batch) is int
