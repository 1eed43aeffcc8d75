"""The embedding API: Runtime.preprocess/classify/infer_async, the public Batcher, worker pools
(cores="share:N") and examples/fastapi_app.py under real uvicorn with two workers, against serve."""
from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image


REPO = Path(__file__).resolve().parents[1]
PHOTOS = sorted((REPO / "calibration" / "sample").glob("*.jpg"))
START_TIMEOUT = 90.0

pytestmark = pytest.mark.usefixtures("own_lease_namespace")


@pytest.fixture(scope="module")
def model_dir(narrow_copy, tmp_path_factory) -> Path:
    return narrow_copy(tmp_path_factory.mktemp("embed") / "narrow")


@pytest.fixture(scope="module")
def rt(model_dir):
    """In-process single graph on every core (closed before the server tests take the cores)."""
    from parnet_cpu import Runtime

    r = Runtime(model_dir, plan="single", precision="fp32")
    yield r
    r.close()


def assert_same_answer(a: list[dict], b: list[dict], tol: float = 1e-6) -> None:
    """Two top-k answers (serve's shape) agree up to float noise from another batch size or thread
    count: the same probabilities, the same classes except where two are tied within `tol`."""
    pa, pb = [p["probability"] for p in a], [p["probability"] for p in b]
    np.testing.assert_allclose(pa, pb, rtol=0, atol=tol)
    ia, ib = [p["index"] for p in a], [p["index"] for p in b]
    for pos, (x, y) in enumerate(zip(ia, ib)):
        if x != y:  # only a near-tie may swap places or drop out at the k-th place
            prob_x = pa[pos]
            alt = [pb[ib.index(x)]] if x in ib else [pb[-1]]
            assert abs(prob_x - alt[0]) <= 2 * tol, (a, b)
    for p, q in zip(a, b):
        if p["index"] == q["index"]:
            assert p["label"] == q["label"]


# ---------------------------------------------------------------------------------------------- preprocess

def test_preprocess_every_input_kind_gives_the_files_tensor(rt):
    from parnet_cpu.data import load_and_preprocess

    path = PHOTOS[0]
    want = load_and_preprocess(path, rt.preprocess_config)
    data = path.read_bytes()
    pil = Image.open(path)
    for x in (path, str(path), data, bytearray(data), memoryview(data), pil, np.asarray(pil.convert("RGB"))):
        np.testing.assert_array_equal(rt.preprocess(x), want)
    assert rt.preprocess(path).shape == rt.input_shape == tuple(rt.preprocess_config.output_shape)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "CMYK", "I;16", "1", "PA"])
def test_a_decoded_image_in_any_mode_follows_the_decoders_rules(rt, mode):
    """A PIL image in an unusual mode answers as the same pixels sent as a file would (alpha onto white,
    16-bit scaled, palette...), not as Pillow's plain convert("RGB")."""
    base = Image.open(PHOTOS[1]).convert("RGBA").resize((80, 60))
    base.putalpha(Image.linear_gradient("L").resize((80, 60)))
    img = base if mode == "RGBA" else base.convert(mode) if mode not in ("I;16",) else base.convert("L").convert("I;16")
    buf = io.BytesIO()
    (img.convert("RGBA") if mode == "PA" else img).save(buf, "TIFF" if mode == "CMYK" else "PNG")  # PA: no format
    np.testing.assert_array_equal(rt.preprocess(img), rt.preprocess(buf.getvalue()))


def test_exif_orientation_applies_to_a_pil_image_as_to_its_file(rt, tmp_path):
    img = Image.open(PHOTOS[2]).convert("RGB").resize((90, 50))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif.tobytes())
    from_file = rt.preprocess(path)
    np.testing.assert_array_equal(rt.preprocess(Image.open(path)), from_file)
    assert not np.array_equal(rt.preprocess(np.asarray(Image.open(path))), from_file)  # raw pixels: no tag


def test_bad_inputs_are_clear_errors(rt, tmp_path):
    from parnet_cpu.data import ImageDecodeError, ImageTooLargeError

    with pytest.raises(ImageDecodeError, match="not a recognised image"):
        rt.preprocess(b"not an image at all")
    with pytest.raises(ImageDecodeError, match="empty"):
        rt.preprocess(b"")
    with pytest.raises(ImageDecodeError, match="file not found"):
        rt.preprocess(tmp_path / "missing.jpg")
    big = io.BytesIO()
    Image.new("L", (8000, 6000)).save(big, "PNG")  # 48 MP > the server's 40 MP default
    with pytest.raises(ImageTooLargeError, match="larger than the limit"):
        rt.preprocess(big.getvalue())
    with pytest.raises(ImageTooLargeError):
        rt.preprocess(Image.new("L", (8000, 6000)))
    assert rt.preprocess(big.getvalue(), max_pixels=None).shape == rt.input_shape
    with pytest.raises(ValueError, match="uint8"):
        rt.preprocess(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        rt.preprocess(np.zeros((10, 10, 3), np.int16))
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        rt.preprocess(np.zeros((10, 10, 5), np.uint8))
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        rt.preprocess(np.zeros((0, 10, 3), np.uint8))
    with pytest.raises(TypeError, match="encoded bytes, a path"):
        rt.preprocess(12345)


# ---------------------------------------------------------------------------------------------- classify

def test_classify_is_the_softmax_top_k_of_infer(rt):
    from parnet_cpu import TopK
    from parnet_cpu.data import load_paths

    x = load_paths(PHOTOS[:6], rt.preprocess_config)
    z = rt.infer(x).astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    got = rt.classify(PHOTOS[:6], top_k=4)
    assert [type(g) for g in got] == [TopK] * 6
    for row, g in zip(p, got):
        want = np.argsort(-row, kind="stable")[:4]
        assert list(g.indices) == want.tolist()
        np.testing.assert_allclose(g.probabilities, row[want], rtol=1e-12)
        assert list(g.labels) == [rt.class_names[i] for i in want] and g.label == rt.class_names[want[0]]
    assert rt.classify(x, top_k=4) == got  # a preprocessed batch answers the same
    assert rt.classify(PHOTOS[0].read_bytes(), top_k=4) == got[:1]  # one image: a list of one


@pytest.mark.parametrize("k", [0, -1, 1001, True, 2.5, "3"])  # None: the default (5, or every class if fewer)
def test_a_bad_top_k_is_refused_before_any_work(rt, k):
    with pytest.raises(ValueError, match=r"top_k must be an integer in 1\.\.1000"):
        rt.classify(b"garbage that would fail to decode", top_k=k)


# ---------------------------------------------------------------------------------------------- async

@pytest.fixture(scope="module")
def worker_rt(model_dir, rt):
    """A runtime whose graph runs in a pinned worker process (a hand-over per call, as on servers)."""
    from parnet_cpu import Runtime

    r = Runtime(model_dir, plan="single", precision="fp32", cores=[[0]], share=True, inflight=2)
    assert not r._inproc
    yield r
    r.close()


@pytest.mark.parametrize("which", ["rt", "worker_rt"])
def test_a_cancelled_await_never_hands_its_result_to_a_later_call(which, request):
    r = request.getfixturevalue(which)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((int(rng.integers(1, 9)), *r.input_shape)).astype(np.float32) for _ in range(16)]
    ref = [r.infer(x) for x in xs]

    async def main() -> int:
        cancelled = 0
        for i in range(0, len(xs), 2):
            victim = asyncio.ensure_future(r.infer_async(xs[i]))
            await asyncio.sleep([0, 0.0005, 0.002, 0.01][i % 4])  # before, during and after the run
            victim.cancel()
            try:
                await victim
            except asyncio.CancelledError:
                cancelled += 1
            nxt = await asyncio.gather(r.infer_async(xs[i + 1]), r.infer_async(xs[(i + 3) % len(xs)]))
            np.testing.assert_array_equal(nxt[0], ref[i + 1])
            np.testing.assert_array_equal(nxt[1], ref[(i + 3) % len(xs)])
        return cancelled

    assert asyncio.run(main()) >= 1  # at least some awaits were really cancelled


def test_classify_async_equals_classify(rt):
    want = rt.classify(PHOTOS[:5], top_k=3)

    async def main():
        return await asyncio.gather(*(rt.classify_async(p, top_k=3) for p in PHOTOS[:5]))

    assert [a[0] for a in asyncio.run(main())] == want


def test_public_batcher_batches_concurrent_calls_with_runtime_answers(rt):
    from parnet_cpu import Batcher

    want = {p.name: rt.classify(p, top_k=5)[0].predictions() for p in PHOTOS}

    async def main():
        async with Batcher(rt, max_batch=8, max_wait_ms=20) as b:
            got = await asyncio.gather(*(b.classify(p.read_bytes(), top_k=5) for p in PHOTOS))
            return got, b.stats

    got, stats = asyncio.run(main())
    assert stats.images == len(PHOTOS) and stats.batches < len(PHOTOS)  # really batched
    for p, g in zip(PHOTOS, got):
        assert_same_answer(g[0].predictions(), want[p.name])


def test_batcher_cancellation_drops_or_discards_never_misroutes(worker_rt):
    from parnet_cpu import Batcher

    r = worker_rt
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((1, *r.input_shape)).astype(np.float32) for _ in range(40)]
    ref = [r.infer(x) for x in xs]

    async def main():
        b = Batcher(r, max_batch=4, max_wait_ms=1)  # started by its first call
        tasks = [asyncio.ensure_future(b.infer(x)) for x in xs]
        await asyncio.sleep(0.003)
        for t in tasks[::3]:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await b.close()
        return results, b.stats

    results, stats = asyncio.run(main())
    for i, res in enumerate(results):
        if isinstance(res, asyncio.CancelledError):
            assert i % 3 == 0
        else:
            np.testing.assert_allclose(res, ref[i], rtol=1e-5, atol=1e-6)  # its own logits, nobody else's
    assert stats.images + stats.dropped_images <= len(xs)


def test_batcher_refuses_bad_options_and_inputs(rt):
    from parnet_cpu import Batcher

    for kw in ({"max_wait_ms": float("nan")}, {"max_wait_ms": float("inf")}, {"max_wait_ms": -1},
               {"max_batch": 0}, {"max_batch": 2.5}, {"max_batch": True}):
        with pytest.raises(ValueError):
            Batcher(rt, **kw)
    assert Batcher(rt, max_batch=10_000).max_batch == rt.max_batch  # never more than the runtime takes

    async def main():
        async with Batcher(rt) as b:
            with pytest.raises(ValueError, match="expected images of shape"):
                await b.infer(np.zeros((2, 3, 9, 9), np.float32))
            with pytest.raises(ValueError, match="float32"):
                await b.infer(np.zeros((1, *rt.input_shape), np.uint8))
            with pytest.raises(ValueError, match="top_k"):
                await b.classify(PHOTOS[0], top_k=0)
            ok = await b.infer(np.zeros(rt.input_shape, np.float32))  # the collector survived the bad calls
            assert ok.shape == (1, rt.num_classes)

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------- worker pools

POOL_CHILD = textwrap.dedent("""
    import json, sys, time
    from parnet_cpu import Runtime
    try:
        rt = Runtime(sys.argv[1], cores=sys.argv[2])
    except Exception as exc:
        print("REFUSED " + json.dumps(str(exc)), flush=True)
        sys.exit(3)
    print("CPUS " + json.dumps(rt.plan.cpus), flush=True)
    sys.stdin.read()  # hold the lease until the parent closes stdin
""")


def _start_pool_child(model_dir, spec):
    return subprocess.Popen([sys.executable, "-c", POOL_CHILD, str(model_dir), spec], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


@pytest.mark.slow
def test_pool_workers_lease_disjoint_shares_and_one_too_many_is_told_the_option(model_dir, rt):
    import json

    rt.close()  # the pool takes the cores this module's runtime held
    n = len(os.sched_getaffinity(0))
    kids, lines = [], []
    try:
        for _ in range(n):  # one after another: each must find its share without knowing its index
            kids.append(_start_pool_child(model_dir, f"share:{n}"))
            lines.append(kids[-1].stdout.readline())
        extra = _start_pool_child(model_dir, f"share:{n}")
        out, err = extra.communicate(timeout=60)
        assert extra.returncode == 3 and f"all {n} shares of this worker pool" in out, (out, err)
        plain = subprocess.run([sys.executable, "-c", "from parnet_cpu import Runtime; import sys; "
                                f"Runtime({str(model_dir)!r})"], capture_output=True, text=True, cwd=REPO)
        assert plain.returncode != 0 and "cores='share:N'" in plain.stderr
        assert "During handling of the above exception" not in plain.stderr  # led by the real refusal
        assert plain.stderr.count("cores.CoreSpecError: ") == 1
    finally:
        for k in kids:
            k.stdin.close()
            k.wait(30)
    shares = [json.loads(line.split(" ", 1)[1]) for line in lines]
    assert all(line.startswith("CPUS ") for line in lines), lines
    flat = [c for s in shares for c in s]
    assert len(flat) == len(set(flat)) == n  # disjoint, every free core used


@pytest.mark.parametrize("spec", ["share:0", "share:x", "share:", "share:-2", "share:1.5"])
def test_a_bad_pool_spec_is_a_clear_error(model_dir, spec):
    from parnet_cpu import Runtime
    from parnet_cpu.runtime.cores import CoreSpecError

    with pytest.raises(CoreSpecError, match="share:N"):
        Runtime(model_dir, cores=spec)


def test_pool_refuses_multistream(model_dir):
    from parnet_cpu import Runtime

    with pytest.raises(ValueError, match="single graph"):
        Runtime(model_dir, cores="share:2", plan="multistream")


# ---------------------------------------------------------------------------------------------- the example

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"not ready within {START_TIMEOUT} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _pinned_cpus(pid: int) -> set[int]:
    """Union of the Cpus_allowed_list of every thread of `pid`'s runtime worker processes (its spawned
    children; multiprocessing's resource tracker, also a child, is not pinned and not a worker)."""
    from parnet_cpu.system.cpuinfo import parse_cpu_list

    kids = {k for f in Path(f"/proc/{pid}/task").glob("*/children") for k in f.read_text().split()}  # any thread's
    cpus: set[int] = set()
    for kid in kids:
        if b"spawn_main" not in Path(f"/proc/{kid}/cmdline").read_bytes():
            continue
        for status in Path(f"/proc/{kid}/task").glob("*/status"):
            line = next(ln for ln in status.read_text().splitlines() if ln.startswith("Cpus_allowed_list:"))
            cpus |= set(parse_cpu_list(line.split(":", 1)[1].strip()))
    return cpus


@pytest.mark.slow
def test_fastapi_example_two_uvicorn_workers_disjoint_cores_and_serves_answers(model_dir, rt, tmp_path):
    rt.close()
    n = len(os.sched_getaffinity(0))
    assert n >= 2, "needs two CPUs for two workers"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PARNET_MODEL_DIR": str(model_dir), "WEB_CONCURRENCY": "2"}
    log = tmp_path / "uvicorn.log"
    with open(log, "wb") as out:
        uv = subprocess.Popen([sys.executable, "-m", "uvicorn", "examples.fastapi_app:app", "--workers", "2",
                               "--port", str(port), "--no-access-log"], cwd=REPO, env=env, stdout=out, stderr=out)
    answers: dict[str, list[dict]] = {}
    try:
        _wait_ready(url + "/health", uv, log)
        seen: dict[int, list[int]] = {}
        deadline = time.monotonic() + START_TIMEOUT
        while len(seen) < 2 and time.monotonic() < deadline:  # each request on a new connection
            r = httpx.get(url + "/health", timeout=10)
            if r.status_code == 200:
                seen[r.json()["pid"]] = r.json()["cpus"]
            time.sleep(0.05)
        assert len(seen) == 2, f"only {seen} answered:\n{log.read_text()[-2000:]}"
        pinned = {pid: _pinned_cpus(pid) for pid in seen}
        assert all(pinned.values()) and not set.intersection(*pinned.values()), pinned  # disjoint, from /proc
        assert {pid: sorted(c) for pid, c in pinned.items()} == {pid: sorted(c) for pid, c in seen.items()}
        by_worker: dict[str, int] = {}
        for p in PHOTOS:
            for _ in range(3):  # new connections: the kernel spreads them over both workers
                r = httpx.post(url + "/classify?top_k=5", files={"file": (p.name, p.read_bytes(), "image/jpeg")},
                               timeout=60)
                assert r.status_code == 200, r.text
                by_worker[r.headers["x-worker-pid"]] = by_worker.get(r.headers["x-worker-pid"], 0) + 1
                if p.name in answers:
                    assert_same_answer(r.json()["predictions"], answers[p.name])
                answers[p.name] = r.json()["predictions"]
        assert len(by_worker) == 2, by_worker  # both workers classified
        bad = httpx.post(url + "/classify", content=b"not an image", timeout=30)
        assert bad.status_code == 400 and "cannot decode image" in bad.text
        assert httpx.post(url + "/classify?top_k=1001", content=PHOTOS[0].read_bytes(), timeout=30).status_code == 400
    finally:
        _stop(uv)
    # the same photos through `parnet-cpu serve`, once the pool has let the cores go
    port = _free_port()
    serve_log = tmp_path / "serve.log"
    with open(serve_log, "wb") as out:
        srv = subprocess.Popen([sys.executable, "-m", "parnet_cpu", "serve", "--model-dir", str(model_dir),
                                "--port", str(port), "--plan", "single", "--precision", "fp32"],
                               cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=out, stderr=out)
    try:
        _wait_ready(f"http://127.0.0.1:{port}/v2/health/ready", srv, serve_log)
        for p in PHOTOS:
            r = httpx.post(f"http://127.0.0.1:{port}/v1/classify?top_k=5", content=p.read_bytes(),
                           headers={"content-type": "image/jpeg"}, timeout=60)
            assert r.status_code == 200, r.text
            assert_same_answer(answers[p.name], r.json()["predictions"])
    finally:
        _stop(srv)
