"""HTTP server: the real server on a free loopback port, driven by real HTTP clients.

One shared server (subprocess, the CLI code path) answers the protocol, classification, bad-input,
concurrency, metrics and log tests; overload and disconnect tests run the app in-process with a
runtime stub whose inference waits on a gate (so queue states are deterministic); the drain test
sends SIGTERM to a server of its own.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from conftest import NARROW

REPO = Path(__file__).resolve().parents[1]
PHOTOS = sorted((REPO / "calibration" / "sample").glob("*.jpg"))
SHAPE = (3, NARROW["input_size"], NARROW["input_size"])
MAX_BODY_MB = 1
START_TIMEOUT = 60.0

# Runs the server CLI in a subprocess and, once it answers ready, prints which heavy modules it loaded.
WRAPPER = """
import json, sys, threading, time, urllib.request
port = int(sys.argv[1])
def report():
    for _ in range(1200):
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status == 200:
                break
        except Exception:
            time.sleep(0.05)
    print("HEAVY_MODULES=" + json.dumps(sorted(m for m in ("torch", "torchvision", "nncf") if m in sys.modules)),
          flush=True)
threading.Thread(target=report, daemon=True).start()
from parnet_cpu.cli.serve import main
sys.exit(main(sys.argv[2:]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *SHAPE)).astype(np.float32)


def softmax(z: np.ndarray) -> np.ndarray:
    p = np.exp(z.astype(np.float64) - z.max())
    return p / p.sum()


def v2_json(x: np.ndarray, **extra) -> dict:
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
            **extra}


def v2_binary(x: np.ndarray) -> tuple[bytes, dict]:
    raw = x.astype("<f4").tobytes()
    head = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(raw)}}],
                       "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head))}


def parse_binary_logits(resp: httpx.Response) -> np.ndarray:
    n = int(resp.headers["inference-header-content-length"])
    head = json.loads(resp.content[:n])
    out = head["outputs"][0]
    assert out["parameters"]["binary_data_size"] == len(resp.content) - n
    return np.frombuffer(resp.content[n:], "<f4").reshape(out["shape"])


def metric(text: str, name: str, labels: str = "") -> float:
    """Sum of the samples of `name` whose label set contains `labels` (Prometheus text format)."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if labels in line:
                total += float(line.rsplit(" ", 1)[1])
                found = True
    assert found, f"{name}{{{labels}}} not in /metrics"
    return total


def wait_until(cond, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def model_dir(narrow_copy, tmp_path_factory) -> Path:
    return narrow_copy(tmp_path_factory.mktemp("serve") / "narrow")


@pytest.fixture(scope="module")
def reference(model_dir) -> dict:
    """Runtime.infer on the photographs and on random tensors, before any server holds the cores."""
    from parnet_cpu.artifacts import ModelDir
    from parnet_cpu.data import load_and_preprocess
    from parnet_cpu.runtime import Runtime

    cfg = ModelDir.open(model_dir).preprocess_config()
    x = images(200, seed=7)
    with Runtime(model_dir, plan="single", precision="fp32") as rt:
        photos = {p.name: rt.infer(load_and_preprocess(p, cfg)[None])[0] for p in PHOTOS}
        random = np.concatenate([rt.infer(x[i:i + 8]) for i in range(0, len(x), 8)])
    return {"photos": photos, "x": x, "logits": random}


class ServerProcess:
    def __init__(self, model_dir: Path, tmp: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stdout, self.stderr = tmp / "stdout.log", tmp / "stderr.log"
        cmd = [sys.executable, "-c", WRAPPER, str(self.port), "--model-dir", str(model_dir), "--port", str(self.port),
               *args]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with open(self.stdout, "wb") as out, open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, env=env)
        try:
            wait_until(self._ready, START_TIMEOUT, "server ready")
        except BaseException:
            self.stop()
            raise AssertionError(f"server did not start:\n{self.stderr.read_text()[-3000:]}") from None

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.stderr.read_text()[-3000:]}")
        try:
            return httpx.get(self.url + "/v2/health/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def logs(self) -> list[str]:
        return [line for line in self.stderr.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def server(model_dir, reference, tmp_path_factory):
    srv = ServerProcess(model_dir, tmp_path_factory.mktemp("server"), "--max-wait-ms", "5", "--max-queue", "512",
                        "--max-body-mb", str(MAX_BODY_MB), "--plan", "single", "--precision", "fp32")
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


# ---------------------------------------------------------------------------------------------- boundary

def test_server_process_loads_no_torch(server):
    wait_until(lambda: "HEAVY_MODULES=" in server.stdout.read_text(), 10, "module report")
    line = next(ln for ln in server.stdout.read_text().splitlines() if ln.startswith("HEAVY_MODULES="))
    assert json.loads(line.split("=", 1)[1]) == []


# ---------------------------------------------------------------------------------------------- v2 protocol

def test_v2_with_triton_client(server, reference):
    import tritonclient.http as tc  # a test dependency: the protocol check must run, not skip
    from tritonclient.utils import InferenceServerException

    c = tc.InferenceServerClient(f"127.0.0.1:{server.port}")
    try:
        assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("parnet")
        assert not c.is_model_ready("other")
        assert "binary_tensor_data" in c.get_server_metadata()["extensions"]
        meta = c.get_model_metadata("parnet")
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, *SHAPE]}]
        assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 1000]}]
        assert c.get_model_metadata("parnet", model_version="1")["name"] == "parnet"
        x, ref = reference["x"][:3], reference["logits"][:3]
        for binary_in in (True, False):
            for binary_out in (True, False):
                inp = tc.InferInput("input", list(x.shape), "FP32")
                inp.set_data_from_numpy(x, binary_data=binary_in)
                result = c.infer("parnet", [inp], outputs=[tc.InferRequestedOutput("logits", binary_data=binary_out)],
                                 request_id="req-7")
                np.testing.assert_allclose(result.as_numpy("logits"), ref, rtol=1e-4, atol=1e-5)
                assert result.get_response()["id"] == "req-7"
        with pytest.raises(InferenceServerException, match="unknown model"):
            c.get_model_metadata("other")
        bad = tc.InferInput("input", [1, 3, 8, 8], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 3, 8, 8), np.float32))
        with pytest.raises(InferenceServerException, match="shape"):
            c.infer("parnet", [bad])
    finally:
        c.close()


def test_v2_json_follows_the_spec(client, reference):
    # health: status code is the answer, body empty
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/parnet/ready", "/v2/models/parnet/versions/1/ready"):
        r = client.get(path)
        assert (r.status_code, r.content) == (200, b""), path
    assert client.get("/v2/models/other/ready").status_code == 404
    meta = client.get("/v2/models/parnet").json()
    # the spec's fields, plus "parameters" (the protocol's extension slot) carrying the preprocessing
    assert set(meta) == {"name", "versions", "platform", "inputs", "outputs", "parameters"}
    assert meta["parameters"]["preprocessing"]["center_crop"] == SHAPE[1]
    assert client.get("/v2").json()["name"] == "parnet-cpu"

    x, ref = reference["x"][:2], reference["logits"][:2]
    r = client.post("/v2/models/parnet/infer", json=v2_json(x, id="abc"))
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"model_name", "model_version", "id", "outputs"}
    assert (body["model_name"], body["model_version"], body["id"]) == ("parnet", "1", "abc")
    (out,) = body["outputs"]
    assert (out["name"], out["datatype"], out["shape"]) == ("logits", "FP32", [2, 1000])
    np.testing.assert_allclose(np.asarray(out["data"], np.float32).reshape(2, 1000), ref, rtol=1e-4, atol=1e-5)
    assert "id" not in client.post("/v2/models/parnet/infer", json=v2_json(x)).json()

    # nested (row-major) data is accepted too, and the versioned path
    nested = {"inputs": [{"name": "input", "shape": [1, *SHAPE], "datatype": "FP32", "data": x[:1].tolist()}]}
    r = client.post("/v2/models/parnet/versions/1/infer", json=nested)
    np.testing.assert_allclose(np.asarray(r.json()["outputs"][0]["data"]).reshape(1, 1000), ref[:1], rtol=1e-4, atol=1e-5)


def test_v2_binary_extension_and_large_requests(client, reference):
    # 20 images: more than --max-batch, split over batches and reassembled in order
    x, ref = reference["x"][:20], reference["logits"][:20]
    body, headers = v2_binary(x)
    r = client.post("/v2/models/parnet/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    np.testing.assert_allclose(parse_binary_logits(r), ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- classify

def test_classify_photographs_matches_runtime(client, reference):
    for photo in PHOTOS:
        with open(photo, "rb") as fh:
            r = client.post("/v1/classify?top_k=5", files={"file": (photo.name, fh, "image/jpeg")})
        assert r.status_code == 200, (photo.name, r.text)
        preds = r.json()["predictions"]
        p = softmax(reference["photos"][photo.name])
        assert len(preds) == 5
        kth = np.sort(p)[-5]
        for pred in preds:
            assert pred["probability"] == pytest.approx(p[pred["index"]], rel=1e-4, abs=1e-9), photo.name
            assert pred["probability"] >= kth - 1e-7, photo.name  # it is one of the reference's top 5
        assert preds[0]["index"] == int(p.argmax()) or p.max() - preds[0]["probability"] < 1e-7
        from parnet_cpu.data import imagenet_class_names

        assert preds[0]["label"] == imagenet_class_names()[preds[0]["index"]]
        assert [q["probability"] for q in preds] == sorted((q["probability"] for q in preds), reverse=True)
    # raw image body instead of a form
    photo = PHOTOS[0]
    r = client.post("/v1/classify?top_k=1", content=photo.read_bytes(), headers={"content-type": "image/jpeg"})
    assert r.json()["predictions"][0]["index"] == int(reference["photos"][photo.name].argmax())


# ---------------------------------------------------------------------------------------------- bad input

def test_bad_requests_get_json_4xx_and_do_not_disturb_others(server, client, reference):
    x = reference["x"][:1]
    good = v2_json(x)
    cases = {
        "wrong shape": (400, {"json": v2_json(np.zeros((1, 3, 8, 8), np.float32))}),
        "zero batch": (400, {"json": {"inputs": [{**good["inputs"][0], "shape": [0, *SHAPE], "data": []}]}}),
        "fp64 dtype": (400, {"json": {"inputs": [{**good["inputs"][0], "datatype": "FP64"}]}}),
        "int8 dtype": (400, {"json": {"inputs": [{**good["inputs"][0], "datatype": "INT8"}]}}),
        "wrong input name": (400, {"json": {"inputs": [{**good["inputs"][0], "name": "images"}]}}),
        "unknown output": (400, {"json": {**good, "outputs": [{"name": "probs"}]}}),
        "too few values": (400, {"json": {"inputs": [{**good["inputs"][0], "data": [1.0, 2.0]}]}}),
        "strings": (400, {"json": {"inputs": [{**good["inputs"][0], "data": ["a"] * int(np.prod(x.shape))}]}}),
        "nan": (400, {"content": json.dumps(v2_json(np.full_like(x, np.nan))).encode()}),
        "not json": (400, {"content": b"{nope"}),
        "no inputs": (400, {"json": {"outputs": []}}),
        "bad header length": (400, {"content": b"{}", "headers": {"Inference-Header-Content-Length": "99"}}),
    }
    with ThreadPoolExecutor(8) as pool:  # good requests in flight while the bad ones arrive
        oks = [pool.submit(client.post, "/v2/models/parnet/infer", json=v2_json(reference["x"][i:i + 1]))
               for i in range(16)]
        for name, (status, kwargs) in cases.items():
            r = client.post("/v2/models/parnet/infer", **kwargs)
            assert r.status_code == status, (name, r.status_code, r.text)
            assert isinstance(r.json()["error"], str) and r.json()["error"], name
        for i, fut in enumerate(oks):
            r = fut.result()
            assert r.status_code == 200
            np.testing.assert_allclose(np.asarray(r.json()["outputs"][0]["data"]), reference["logits"][i],
                                       rtol=1e-4, atol=1e-5)

    assert client.post("/v2/models/other/infer", json=good).status_code == 404
    assert client.get("/v2/models/parnet/infer").status_code == 405
    assert client.get("/nowhere").json() == {"error": "Not Found"}


def test_bad_images_and_oversized_bodies(client):
    jpeg = PHOTOS[0].read_bytes()
    for name, data in {"garbage": b"hello, not an image" * 10, "truncated": jpeg[: len(jpeg) // 2],
                       "empty": b"", "gif": b"GIF89a" + b"\0" * 64}.items():
        r = client.post("/v1/classify", files={"file": ("x.jpg", data, "image/jpeg")})
        assert r.status_code == 400, (name, r.text)
        assert "cannot decode image" in r.json()["error"], name
    assert client.post("/v1/classify", content=b"{}", headers={"content-type": "application/json"}).status_code == 415
    assert client.post("/v1/classify", files={"note": (None, "text only")}).status_code == 400
    assert client.post("/v1/classify?top_k=0", content=jpeg).status_code == 400
    assert client.post("/v1/classify?top_k=1001", content=jpeg).status_code == 400

    big = b"\0" * (MAX_BODY_MB * 1024 * 1024 + 1)
    r = client.post("/v1/classify", content=big, headers={"content-type": "image/jpeg"})
    assert r.status_code == 413 and "limit" in r.json()["error"]

    def chunks():  # no Content-Length: refused mid-stream
        for _ in range(MAX_BODY_MB * 4 + 1):
            yield b"\0" * (256 * 1024)

    r = client.post("/v2/models/parnet/infer", content=chunks())
    assert r.status_code == 413 and "limit" in r.json()["error"]
    assert client.get("/v2/health/ready").status_code == 200


# ---------------------------------------------------------------------------------------------- concurrency

@pytest.mark.slow
def test_200_concurrent_requests_get_their_own_answers(server, reference):
    x, ref = reference["x"], reference["logits"]

    async def one(client: httpx.AsyncClient, i: int) -> np.ndarray:
        if i % 2:
            body, headers = v2_binary(x[i:i + 1])
            r = await client.post("/v2/models/parnet/infer", content=body, headers=headers)
            assert r.status_code == 200, r.text
            return parse_binary_logits(r)[0]
        r = await client.post("/v2/models/parnet/infer", json=v2_json(x[i:i + 1], id=str(i)))
        assert r.status_code == 200 and r.json()["id"] == str(i), r.text
        return np.asarray(r.json()["outputs"][0]["data"], np.float32)

    async def main() -> list[np.ndarray]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(200)))

    before = httpx.get(server.url + "/metrics").text
    got = np.stack(asyncio.run(main()))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    assert (got.argmax(1) == ref.argmax(1)).all()
    after = httpx.get(server.url + "/metrics").text
    batches = metric(after, "parnet_batch_size_count") - metric(before, "parnet_batch_size_count")
    imgs = metric(after, "parnet_batch_size_sum") - metric(before, "parnet_batch_size_sum")
    assert imgs == 200
    assert batches < 200  # concurrent requests were batched together


# ---------------------------------------------------------------------------------------------- observability

def test_metrics_and_json_logs(server, client):
    text = client.get("/metrics").text
    assert metric(text, "parnet_requests_total", 'status="200"') > 0
    assert metric(text, "parnet_requests_total", 'endpoint="/v2/models/{name}/infer",method="POST",status="400"') > 0
    assert metric(text, "parnet_requests_total", 'status="413"') > 0
    assert metric(text, "parnet_request_duration_seconds_count", 'endpoint="/v1/classify"') > 0
    assert metric(text, "parnet_batch_size_bucket", 'le="8.0"') > 0
    assert metric(text, "parnet_queue_depth_images") == 0
    assert metric(text, "parnet_runtime_stage_median_seconds", 'stage="model"') > 0
    assert 'parnet_model_info{model="parnet",precision="fp32"' in text
    records = [json.loads(line) for line in server.logs()]  # every line is one JSON object
    assert any(r["msg"] == "ready" and r["runtime"]["plan"]["kind"] == "single" for r in records)
    access = [r for r in records if r["msg"] == "request"]
    assert access and {"method", "path", "status", "duration_ms"} <= set(access[0])


# ---------------------------------------------------------------------------------------------- batcher alone

def test_batcher_groups_in_order_splits_and_bounds_the_queue():
    from parnet_cpu.serve.batcher import DynamicBatcher, QueueFullError

    sizes: list[int] = []
    pool = ThreadPoolExecutor(1)

    def submit(batch: np.ndarray) -> Future:
        sizes.append(len(batch))
        return pool.submit(lambda: np.repeat(batch[:, :, 0, 0], 5, axis=1))

    async def main():
        b = DynamicBatcher(submit, max_batch=4, max_wait_s=0.2, max_queue=12, inflight=1)
        await b.start()
        counts = [1, 2, 1, 6]  # 6 > max_batch: split 4 + 2
        futs = [b.enqueue(np.full((n, 1, 1, 1), i, np.float32)) for i, n in enumerate(counts)]
        with pytest.raises(QueueFullError):
            b.enqueue(np.zeros((3, 1, 1, 1), np.float32))  # 10 queued + 3 > 12
        out = await asyncio.gather(*futs)
        t0 = time.perf_counter()
        single = await b.enqueue(np.full((1, 1, 1, 1), 9, np.float32))  # alone: waits max_wait for company
        waited = time.perf_counter() - t0
        await b.close()
        return counts, out, single, waited

    try:
        counts, out, single, waited = asyncio.run(main())
    finally:
        pool.shutdown()
    for i, (n, logits) in enumerate(zip(counts, out)):
        assert logits.shape == (n, 5) and (logits == i).all()
    assert sizes == [4, 4, 2, 1]  # FIFO, never more than max_batch, nothing reordered
    assert (single == 9).all() and 0.15 < waited < 2.0


# ---------------------------------------------------------------------------------------------- overload, disconnect

class GatedRuntime:
    """Stands in for `Runtime`: answers `logits[i, :] = batch[i, 0, 0, 0]` once `gate` is set."""

    def __init__(self, model_dir: Path) -> None:
        from parnet_cpu.artifacts import ModelDir

        self.model_dir = ModelDir.open(model_dir)
        self.input_shape, self.precision, self.max_batch, self.inflight = SHAPE, "fp32", 1, 1
        self.stats = SimpleNamespace(summary=lambda: {})
        self.gate = threading.Event()
        self.seen: list[float] = []
        self._pool = ThreadPoolExecutor(1)

    def submit(self, batch: np.ndarray) -> Future:
        self.seen.extend(batch[:, 0, 0, 0].tolist())
        return self._pool.submit(self._run, batch.copy())

    def _run(self, batch: np.ndarray) -> np.ndarray:
        self.gate.wait(20)
        return np.repeat(batch[:, :1, 0, 0], 1000, axis=1)

    def describe(self) -> dict:
        return {"stub": True}

    def close(self) -> None:
        self.gate.set()
        self._pool.shutdown()


@pytest.fixture
def gated(model_dir):
    """The app on a real uvicorn server in a thread, over a `GatedRuntime`: one batch of one at a time."""
    import uvicorn

    from parnet_cpu.serve import ServeConfig, create_app

    rt = GatedRuntime(model_dir)
    app = create_app(ServeConfig(model=str(model_dir), max_batch=1, max_wait_ms=0, max_queue=2, access_log=False),
                     runtime=rt)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    wait_until(lambda: srv.started, 10, "in-process server")
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", port=port, rt=rt)
    finally:
        rt.gate.set()
        srv.should_exit = True
        thread.join(15)


def one_image(value: float) -> dict:
    return v2_json(np.full((1, *SHAPE), value, np.float32))


def queued(url: str) -> float:
    return metric(httpx.get(url + "/metrics").text, "parnet_queue_depth_images")


def test_full_queue_answers_503_at_once(gated):
    url = gated.url + "/v2/models/parnet/infer"
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(httpx.post, url, json=one_image(1.0), timeout=30)
        wait_until(lambda: gated.rt.seen == [1.0], what="first batch in the runtime")
        waiting = [pool.submit(httpx.post, url, json=one_image(v), timeout=30) for v in (2.0, 3.0)]
        wait_until(lambda: queued(gated.url) == 2, what="queue full")
        t0 = time.perf_counter()
        r = httpx.post(url, json=one_image(4.0), timeout=30)
        assert time.perf_counter() - t0 < 1.0
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "queue is full" in r.json()["error"]
        r = httpx.post(gated.url + "/v1/classify", content=PHOTOS[0].read_bytes(), timeout=30)
        assert r.status_code == 503
        gated.rt.gate.set()
        for fut, value in zip([first, *waiting], (1.0, 2.0, 3.0)):
            r = fut.result()
            assert r.status_code == 200 and r.json()["outputs"][0]["data"][0] == value
    text = httpx.get(gated.url + "/metrics").text
    assert metric(text, "parnet_rejected_requests_total") == 2
    assert metric(text, "parnet_requests_total", 'status="503"') == 2


def test_disconnected_client_is_dropped_before_inference(gated):
    url = gated.url + "/v2/models/parnet/infer"
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(httpx.post, url, json=one_image(1.0), timeout=30)
        wait_until(lambda: gated.rt.seen == [1.0], what="first batch in the runtime")
        body = json.dumps(one_image(2.0)).encode()
        with socket.create_connection(("127.0.0.1", gated.port)) as sock:  # send a request, then hang up
            sock.sendall(b"POST /v2/models/parnet/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            wait_until(lambda: queued(gated.url) == 1, what="request queued")
        wait_until(lambda: queued(gated.url) == 0, what="request dropped")
        later = pool.submit(httpx.post, url, json=one_image(3.0), timeout=30)
        gated.rt.gate.set()
        assert first.result().status_code == 200 and later.result().status_code == 200
    assert gated.rt.seen == [1.0, 3.0]  # the abandoned image never reached the runtime
    text = httpx.get(gated.url + "/metrics").text
    assert metric(text, "parnet_dropped_images_total") == 1
    wait_until(lambda: 'status="499"' in httpx.get(gated.url + "/metrics").text, 5, "499 recorded")


# ---------------------------------------------------------------------------------------------- drain

@pytest.mark.slow
def test_sigterm_drains_in_flight_requests(model_dir, reference, tmp_path):
    import psutil

    cpus = sorted(os.sched_getaffinity(0))
    groups = f"{cpus[0]}:{cpus[-1]}:{cpus[0]}"  # multi-stream: worker processes that must stop too
    # the module's shared server leases every core: this second server shares them, as it must ask to
    srv = ServerProcess(model_dir, tmp_path, "--max-wait-ms", "1500", "--plan", "multistream", "--cores", groups,
                        "--precision", "fp32", "--share-cores")
    try:
        workers = psutil.Process(srv.proc.pid).children(recursive=True)
        assert workers
        x = reference["x"][:3]
        with ThreadPoolExecutor(3) as pool:
            futs = [pool.submit(httpx.post, srv.url + "/v2/models/parnet/infer", json=v2_json(x[i:i + 1]), timeout=30)
                    for i in range(3)]
            wait_until(lambda: queued(srv.url) == 3, what="requests queued")
            srv.proc.send_signal(signal.SIGTERM)
            for i, fut in enumerate(futs):
                r = fut.result()
                assert r.status_code == 200, r.text
                np.testing.assert_allclose(r.json()["outputs"][0]["data"], reference["logits"][i], rtol=1e-4, atol=1e-5)
        assert srv.proc.wait(20) in (0, -signal.SIGTERM)
        with pytest.raises(httpx.ConnectError):
            httpx.get(srv.url + "/v2/health/live", timeout=2)
        wait_until(lambda: all(not w.is_running() or w.status() == psutil.STATUS_ZOMBIE for w in workers), 10,
                   "runtime workers to exit")
        assert any(json.loads(line)["msg"] == "draining" for line in srv.logs())
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------------- CLI

def test_cli_arguments_and_errors(tmp_path, capsys):
    import argparse

    from parnet_cpu.cli import serve

    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--model-dir", "m"])
    assert (args.host, args.port, args.max_batch, args.max_wait_ms, args.max_queue, args.cores_per_stream) == \
        ("127.0.0.1", 8000, 8, 2.0, 256, "auto")
    assert args.handler is serve.run
    assert serve.main(["--model-dir", str(tmp_path)]) == 2
    assert "not a parnet-cpu model folder" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="^2$"):  # a number out of range is a usage error (parnet_cpu.options)
        serve.main(["--model-dir", str(tmp_path), "--max-batch", "0"])
    with pytest.raises(SystemExit):
        serve.main(["--model-dir", str(tmp_path), "--cores-per-stream", "0"])
