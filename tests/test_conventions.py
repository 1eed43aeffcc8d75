"""Issue 26: the conventions operators already know, through the real entry points.

Item 7: OpenVINO's compiled-model cache (engine.CompileCache), on a really read-only model folder (a read-only
bind mount in a private mount namespace, `unshare -m`: root is refused too), in real Runtime processes (the
single graph in the process, and the multi-stream plan's pinned workers); corrupt, planted and unrecorded blobs.
Item 8: /metrics of a real `parnet-cpu serve` process (process metrics, the queue-wait histogram, no `_created`
series, OpenMetrics on request). Item 9: Triton's config and statistics extensions read by tritonclient.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import NARROW, slow_param

REPO = Path(__file__).resolve().parents[1]
SIZE = NARROW["input_size"]

CACHE_SCRIPT = r'''
import json, os, sys, warnings
import numpy as np
from parnet_cpu.artifacts import ModelDir
from parnet_cpu.runtime import Runtime
from parnet_cpu.runtime.plan import PlanCache
CPUS = sorted(os.sched_getaffinity(0))
if __name__ == "__main__":
    model, plan, plan_cache = sys.argv[1], sys.argv[2], sys.argv[3]
    kw = dict(plan="multistream", cores=[[CPUS[0]], [CPUS[-1]], [CPUS[0]]]) if plan == "multi" else dict(plan="single")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Runtime(model, precision="fp32", **kw) as rt:
            x = np.random.default_rng(0).standard_normal((2, 3, SIZE_, SIZE_)).astype(np.float32)
            out = rt.infer(x)
            compiled = getattr(rt, "_compiled", None)  # the in-process single graph (workers compile their own)
            hit = bool(compiled.get_property("LOADED_FROM_CACHE")) if compiled is not None else None
            cache = rt.compile_cache
    md = ModelDir.open(model)
    pc = PlanCache(md)
    key = pc.key([CPUS[0]], "fp32", md.ir_path("fp32"))
    if plan_cache == "record":
        pc.record(key, {"choice": "single", "note": "recorded by the test"})
    print(json.dumps({"cache": str(cache.dir) if cache else None, "blobs": cache.blobs() if cache else [],
                      "hit": hit, "kind": rt.plan.kind, "logits": out.tolist(), "plan_cache": str(pc.path),
                      "plan_entry": pc.lookup(key), "warnings": [f"{w.category.__name__}: {w.message}" for w in caught]}))
'''.replace("SIZE_", str(SIZE))


def unshare_works() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


needs_unshare = pytest.mark.skipif(not unshare_works(), reason="needs root and `unshare -m` to mount a model "
                                   "folder read-only (a read-only bind mount refuses root too)")


def read_only(folder: Path) -> list[str]:
    return ["unshare", "-m", "sh", "-c", f'mount --bind "{folder}" "{folder}" && '
            f'mount -o remount,bind,ro "{folder}" && exec "$@"', "sh"]


def start(model: Path, env: dict, plan: str = "single", plan_cache: str = "-", wrap: list[str] | None = None) -> dict:
    """One Runtime start in a fresh process (what a restarted server or a new replica is)."""
    r = subprocess.run([*(wrap or []), sys.executable, "-c", CACHE_SCRIPT, str(model), plan, plan_cache],
                       capture_output=True, text=True, timeout=300, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO), **env})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def model_dir(narrow_copy, tmp_path_factory) -> Path:
    return narrow_copy(tmp_path_factory.mktemp("conv") / "narrow")


@pytest.fixture(scope="module")
def reference(model_dir) -> np.ndarray:
    """Logits with the cache off: what every cached start must give, bit for bit."""
    out = start(model_dir, {"PARNET_CPU_COMPILE_CACHE": "off"})
    assert out["cache"] is None and out["blobs"] == []
    return np.array(out["logits"], np.float32)


def copy_of(model_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(model_dir, dst)
    return dst


# ---------------------------------------------------------------------------------------------- item 7

@pytest.mark.slow
@needs_unshare
def test_read_only_model_folder_caches_in_the_user_cache_and_the_next_start_imports(model_dir, reference, tmp_path):
    """A model folder mounted read-only (KServe, docker -v ...:ro): the compiled models and the plan choice go
    to $XDG_CACHE_HOME/parnet-cpu (0700 folders), keyed by the model; the next start imports the blobs
    (LOADED_FROM_CACHE) and finds the plan entry; the answers equal the uncached ones bit for bit."""
    xdg = tmp_path / "xdg"
    before = sorted(os.listdir(model_dir))
    env = {"XDG_CACHE_HOME": str(xdg)}
    first = start(model_dir, env, plan_cache="record", wrap=read_only(model_dir))
    cache = Path(first["cache"])
    assert cache.is_relative_to(xdg / "parnet-cpu" / "models"), first["cache"]
    assert first["blobs"] and all((cache / b).is_file() for b in first["blobs"]), first
    assert first["hit"] is False and first["plan_cache"].startswith(str(xdg / "parnet-cpu" / "models"))
    for d in [xdg / "parnet-cpu", *[p for p in cache.parents if p.is_relative_to(xdg / "parnet-cpu")], cache]:
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    assert sorted(os.listdir(model_dir)) == before  # nothing written into the model folder
    second = start(model_dir, env, wrap=read_only(model_dir))
    assert second["cache"] == first["cache"] and second["blobs"] == first["blobs"]  # nothing compiled anew
    assert second["hit"] is True
    assert second["plan_entry"] == {"choice": "single", "note": "recorded by the test"}  # not measured again
    for out in (first, second):
        np.testing.assert_array_equal(np.array(out["logits"], np.float32), reference)
    assert not any("CompileCache" in w for w in first["warnings"] + second["warnings"]), first["warnings"]


@pytest.mark.slow
def test_writable_folder_caches_beside_the_model_for_the_workers_too(model_dir, reference, tmp_path):
    """A writable model folder keeps its cache in compile_cache/ (one folder per precision, CPU and OpenVINO);
    the multi-stream plan's pinned workers compile through the same cache: the second start adds no blob and
    answers the same. `verify` still passes (the cache is not a model file)."""
    model = copy_of(model_dir, tmp_path)
    env = {"XDG_CACHE_HOME": str(tmp_path / "unused")}
    single = start(model, env)
    assert Path(single["cache"]).parent == model / "compile_cache" and single["cache"].split("/")[-1].startswith("fp32-")
    multi = start(model, env, plan="multi")
    assert multi["kind"] == "multistream" and len(multi["blobs"]) > len(single["blobs"])  # the stages' blobs
    again = start(model, env, plan="multi")
    assert again["blobs"] == multi["blobs"]
    for out in (single, multi, again):
        np.testing.assert_allclose(np.array(out["logits"], np.float32), reference, rtol=1e-5, atol=1e-5)
    assert not (tmp_path / "unused").exists()
    r = subprocess.run([sys.executable, "-m", "parnet_cpu", "verify", str(model)], capture_output=True, text=True,
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stdout + r.stderr


def _flip(path: Path) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    for off in (len(data) // 3, len(data) // 2):
        data[off:off + 64] = bytes(b ^ 0x55 for b in data[off:off + 64])
    path.write_bytes(bytes(data))


def test_corrupt_truncated_planted_blobs_are_removed_and_compiled_again(model_dir, reference, tmp_path):
    """OpenVINO itself recompiles a truncated or foreign blob, but imports one with flipped bits in its weights
    without a word (logits off by ~1e26, measured). Every blob is recorded with its sha256: a flipped, truncated,
    planted or linked blob, and a garbled record, are removed before OpenVINO reads them; the start compiles
    again and answers exactly as without a cache."""
    model = copy_of(model_dir, tmp_path)
    env = {"XDG_CACHE_HOME": str(tmp_path / "unused")}
    warm = start(model, env)
    cache = Path(warm["cache"])
    blobs = [cache / b for b in warm["blobs"]]
    assert len(blobs) == 2  # the dynamic-batch graph and the static full batch
    for blob in blobs:
        _flip(blob)  # same size, same header: only the digest tells
    (cache / "1234567890.blob").write_bytes(b"planted")
    (cache / "987654321.blob").symlink_to(blobs[0])
    after = start(model, env)
    np.testing.assert_array_equal(np.array(after["logits"], np.float32), reference)
    assert after["hit"] is False and sorted(after["blobs"]) == sorted(warm["blobs"])  # the same two, compiled again
    assert not (cache / "1234567890.blob").exists() and not (cache / "987654321.blob").is_symlink()
    record = json.loads((cache / "blobs.json").read_text())
    for name in after["blobs"]:
        assert hashlib.sha256((cache / name).read_bytes()).hexdigest() == record[name]["sha256"]
    (cache / "blobs.json").write_text("{not json")  # a garbled record trusts no blob
    for blob in blobs:
        os.chmod(blob, 0o644)
        blob.write_bytes(blob.read_bytes()[:1000])  # torn writes
    last = start(model, env)
    np.testing.assert_array_equal(np.array(last["logits"], np.float32), reference)
    assert sorted(last["blobs"]) == sorted(warm["blobs"])


@needs_unshare
@pytest.mark.parametrize("case", ["others_can_write", slow_param("relative_xdg_no_home"), slow_param("not_a_folder")])
def test_unusable_user_cache_starts_without_a_cache_and_says_why(model_dir, reference, tmp_path, case):
    """Read-only folder and a user cache that cannot be trusted or made (world-writable: anyone could plant a
    blob; no home; a file in the way): the start compiles from the IR, with one CompileCacheWarning naming it."""
    xdg = tmp_path / "xdg"
    env = {"XDG_CACHE_HOME": str(xdg)}
    if case == "others_can_write":
        (xdg / "parnet-cpu").mkdir(parents=True)
        os.chmod(xdg / "parnet-cpu", 0o777)
    elif case == "relative_xdg_no_home":
        env = {"XDG_CACHE_HOME": "relative/cache", "HOME": "relative-home"}
    else:
        xdg.mkdir()
        (xdg / "parnet-cpu").write_text("a file where the folder should be")
    out = start(model_dir, env, wrap=read_only(model_dir))
    assert out["cache"] is None
    np.testing.assert_array_equal(np.array(out["logits"], np.float32), reference)
    assert [w for w in out["warnings"] if w.startswith("CompileCacheWarning")], out["warnings"]
    assert not os.path.exists(os.path.join(REPO, "relative")) and not os.path.exists(os.path.join(REPO, "relative-home"))


# ---------------------------------------------------------------------------------------------- items 8 and 9

@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory, own_lease_namespace):
    from test_serve import ServerProcess

    srv = ServerProcess(model_dir, tmp_path_factory.mktemp("server"), "--max-wait-ms", "20", "--plan", "single",
                        "--precision", "fp32")
    yield srv
    srv.stop()


def v2_body(n: int, seed: int) -> dict:
    x = np.random.default_rng(seed).standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}


def send(url: str, sizes: list[int]) -> None:
    """Concurrent v2 infer requests of the given batch sizes (concurrent: the batcher groups them)."""
    with httpx.Client(base_url=url, timeout=60) as c, ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda i: c.post("/v2/models/parnet/infer", json=v2_body(sizes[i], i)).status_code,
                              range(len(sizes))))
    assert codes == [200] * len(sizes)


def samples(text: str, name: str) -> float:
    vals = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.split("{")[0].split(" ")[0] == name]
    assert vals, f"{name} not in /metrics"
    return sum(vals)


def test_metrics_process_queue_wait_no_created_and_openmetrics(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        before = c.get("/metrics").text
        send(server.url, [1, 2, 1, 3, 1, 1])
        r = c.get("/metrics")
        text = r.text
        assert r.headers["content-type"].startswith("text/plain")
        for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds",
                     "process_max_fds", "process_start_time_seconds"):
            assert samples(text, name) > 0, name
        assert samples(text, "parnet_queue_wait_seconds_count") - samples(before, "parnet_queue_wait_seconds_count") == 6
        assert samples(text, "parnet_queue_wait_seconds_sum") > 0
        assert 'parnet_queue_wait_seconds_bucket{le="0.002"}' in text
        assert not [line for line in text.splitlines() if "_created" in line]
        om = c.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0; charset=utf-8"})
        assert om.status_code == 200 and om.headers["content-type"].startswith("application/openmetrics-text")
        assert om.text.endswith("# EOF\n") and "parnet_queue_wait_seconds_bucket" in om.text
        assert "# TYPE parnet_requests counter" in om.text and not [ln for ln in om.text.splitlines() if "_created" in ln]
        # a scraper's Accept the library cannot parse, and any other type: the text format, never a 500
        for accept in ("application/openmetrics-text; version=abc", "text/plain; version=1.x", "*/*", "image/png"):
            r = c.get("/metrics", headers={"Accept": accept})
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), accept
            assert "parnet_queue_wait_seconds_count" in r.text


def test_triton_config_and_statistics_with_tritonclient(server):
    import tritonclient.http as tc
    from tritonclient.utils import InferenceServerException

    c = tc.InferenceServerClient(f"127.0.0.1:{server.port}")
    try:
        config = c.get_model_config("parnet")
        assert config["name"] == "parnet" and config["max_batch_size"] == 8
        assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "format": "FORMAT_NCHW",
                                    "dims": [3, SIZE, SIZE], "optional": False}]
        assert config["output"][0]["dims"] == [1000] and config["output"][0]["data_type"] == "TYPE_FP32"
        assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 20000
        assert c.get_model_config("parnet", model_version="1") == config
        for bad in (dict(model_name="other"), dict(model_name="parnet", model_version="2")):
            with pytest.raises(InferenceServerException, match="unknown model"):
                c.get_model_config(**bad)
            with pytest.raises(InferenceServerException, match="unknown model"):
                c.get_inference_statistics(**bad)

        before = c.get_inference_statistics("parnet")["model_stats"][0]
        sizes = [1, 2, 3, 1, 1, 4, 2, 1]
        send(server.url, sizes)
        after = c.get_inference_statistics("parnet")["model_stats"][0]
        assert after["name"] == "parnet" and after["version"] == "1"
        assert after["inference_count"] - before["inference_count"] == sum(sizes)
        executions = after["execution_count"] - before["execution_count"]
        assert 1 <= executions <= len(sizes)
        s0, s1 = before["inference_stats"], after["inference_stats"]
        for key in ("success", "queue", "compute_infer"):
            assert s1[key]["count"] - s0[key]["count"] == len(sizes), key
            assert s1[key]["ns"] > s0[key]["ns"], key
        assert s1["success"]["ns"] >= s1["compute_infer"]["ns"] and s1["fail"] == s0["fail"]
        assert after["last_inference"] >= before["last_inference"] and after["last_inference"] > 0
        batched = sum(b["compute_infer"]["count"] for b in after["batch_stats"])
        assert batched == after["execution_count"]
        assert sum(b["batch_size"] * b["compute_infer"]["count"] for b in after["batch_stats"]) == after["inference_count"]
        everything = c.get_inference_statistics()  # GET /v2/models/stats: every model (this one)
        assert [m["name"] for m in everything["model_stats"]] == ["parnet"]
    finally:
        c.close()


def test_batch_failures_are_counted_as_triton_fail_and_queue_wait():
    """A batch the runtime fails: its requests count as `fail` (and their queue wait is still observed)."""
    from concurrent.futures import Future

    from parnet_cpu.serve.batcher import DynamicBatcher
    from parnet_cpu.serve.metrics import ServeMetrics

    metrics = ServeMetrics(max_batch=4)

    def submit(batch):
        f = Future()
        f.set_exception(RuntimeError("stage failed"))
        return f

    async def main():
        b = DynamicBatcher(submit, max_batch=4, max_wait_s=0.001, on_batch=metrics.observe_batch,
                           on_item=metrics.observe_item)
        await b.start()
        futs = [b.enqueue(np.zeros((n, 3, 4, 4), np.float32)) for n in (1, 2)]
        results = await asyncio.gather(*futs, return_exceptions=True)
        await b.close()
        return results

    results = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) for r in results)
    stats = metrics.model_stats
    assert (stats.fail.count, stats.success.count, stats.inference_count, stats.execution_count) == (2, 0, 0, 0)
    assert stats.queue.count == 2
    assert "parnet_queue_wait_seconds_count 2.0" in metrics.render().decode()
