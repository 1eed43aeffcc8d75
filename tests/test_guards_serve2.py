"""Hostile pass on issue 21 (defects 7, 9, 12-ish, 14, 16, 17): no bound of the decode plan grows with a config
value (a tiny crop_pct once made a 100x100 upload allocate 16 GB); a client that aborts its upload is a
499, not a server 500 with tracebacks; a request cut by --graceful-timeout logs one line, no traceback; the
decode budget lets a small upload pass large ones waiting, yet a large one waiting gets a reservation; the
Triton `classification` output parameter is honoured and every unknown parameter is refused.

Real parts: real plans and Pillow images, real `parnet-cpu serve` processes, raw sockets, real pool threads.
"""
from __future__ import annotations

import asyncio
import io
import json
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import NARROW, GatedWork, eventually
from test_serve import REPO, ServerProcess, v2_json, wait_until

SHAPE = (3, NARROW["input_size"], NARROW["input_size"])

pytestmark = pytest.mark.usefixtures("own_lease_namespace")  # conftest: leases are machine-wide


@pytest.fixture(scope="module")
def model_dir(narrow_copy, tmp_path_factory) -> Path:
    return narrow_copy(tmp_path_factory.mktemp("guards2") / "narrow")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = ServerProcess(model_dir, tmp_path_factory.mktemp("guards2_server"), "--plan", "single", "--precision", "fp32")
    yield srv
    srv.stop()


def png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 120, 200)).save(buf, "PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- defect 7

def test_no_intermediate_of_any_plan_exceeds_the_limit_whatever_the_config():
    """The hostile case (crop_pct 0.001: a 64000x64000 intermediate for a 100x100 image) and configs and
    shapes nobody listed (a large input_size whose crop alone is over a small limit, thin and square images,
    grey and CMYK modes): either a plan whose every step is within the limit, or ImageTooLargeError."""
    from parnet_cpu.data.preprocess import ImageTooLargeError, PreprocessConfig, max_plan_bytes, plan_preprocess

    with pytest.raises(ImageTooLargeError, match="64000x64000 intermediate .* more than the limit of 40000000"):
        plan_preprocess((100, 100), "RGB", PreprocessConfig(input_size=64, crop_pct=0.001), max_pixels=40_000_000)
    with pytest.raises(ImageTooLargeError, match="no image fits"):
        max_plan_bytes(PreprocessConfig(input_size=64, crop_pct=0.001), 40_000_000)
    accepted = refused = 0
    for cfg in (PreprocessConfig(input_size=64, crop_pct=0.01), PreprocessConfig(input_size=4096, crop_pct=1.0),
                PreprocessConfig(input_size=224), PreprocessConfig(input_size=32, crop_pct=0.1, channels=1)):
        for limit in (100, 5_000, 1_000_000, 20_000_000, 40_000_000):
            for size in ((100, 100), (1, 30), (3000, 2), (2000, 2000), (6000, 6000), (640, 480)):
                for mode in ("RGB", "CMYK", "I;16", "P"):
                    try:
                        plan = plan_preprocess(size, mode, cfg, max_pixels=limit, fmt="JPEG")
                    except ImageTooLargeError:
                        refused += 1
                        continue
                    accepted += 1
                    assert all(w * h <= limit for _, w, h, _ in plan.steps), (cfg, limit, size, plan.steps)
                    assert plan.bytes <= max_plan_bytes(cfg, limit), (cfg, limit, size, mode)
    assert accepted and refused


def test_crop_pct_has_one_sane_range_in_options_and_the_manifest(tmp_path):
    """--crop-pct and the manifest's crop_pct: 0.1..1 (timm's crop_pct lie in 0.75..1); 0.001 and 0.05
    refused by the option layer and by the manifest schema, with the range named."""
    from parnet_cpu.artifacts import manifest_schema
    from parnet_cpu.options import OptionError, check

    for ok in (0.1, 0.875, 0.95, 1.0):
        assert check("crop_pct", ok) == ok
    for bad in (0.001, 0.05, 0.0999, 1.01):
        with pytest.raises(OptionError, match=r"\[0.1, 1\]"):
            check("crop_pct", bad)
    spec = manifest_schema().fields["config"].fields["crop_pct"]
    assert (spec.low, spec.high, spec.low_open) == (0.1, 1, False)
    out = subprocess.run([sys.executable, "-m", "parnet_cpu", "export", "--crop-pct", "0.001", "--out",
                          str(tmp_path / "m")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "crop" in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "m").exists()


def test_serve_refuses_at_start_a_pixel_limit_no_image_fits(model_dir, tmp_path):
    """A --max-image-pixels below the model's resize (73x73 for the 64 px narrow model) would refuse every
    upload: refused at start with the numbers, exit 2, no traceback."""
    out = subprocess.run([sys.executable, "-m", "parnet_cpu", "serve", "--model-dir", str(model_dir), "--port", "0",
                          "--plan", "single", "--share-cores", "--max-image-pixels", "5000"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "--max-image-pixels 5000" in out.stderr and "no image fits" in out.stderr, out.stderr[-3000:]
    assert "Traceback" not in out.stderr


# ---------------------------------------------------------------------------------------------- defect 9

def metric_count(srv: ServerProcess, endpoint: str, status: int) -> float:
    lines = httpx.get(srv.url + "/metrics", timeout=10).text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("parnet_requests_total{")
               and f'endpoint="{endpoint}"' in line and f'status="{status}"' in line)


def abort_upload(port: int, path: str, ctype: bytes, body: bytes, declared: int) -> None:
    """Send the head and part of a declared body, then close the socket."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: " + ctype +
                     b"\r\nContent-Length: " + str(declared).encode() + b"\r\n\r\n" + body)
        time.sleep(0.05)


def test_a_client_aborting_its_upload_is_a_499_not_a_server_error(server):
    """Half a body then close, on every body-reading route and body kind (raw image, multipart, v2 JSON, v2
    binary, chunked): counted as 499, no 500, no traceback, and the server answers normally afterwards."""
    img = png(100, 100)
    boundary = b"XyZ"
    multipart = (b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
                 b"Content-Type: image/png\r\n\r\n" + img + b"\r\n--XyZ--\r\n")
    x = np.zeros((1, *SHAPE), np.float32)
    v2 = json.dumps(v2_json(x)).encode()
    before = {ep: (metric_count(server, ep, 500), metric_count(server, ep, 499))
              for ep in ("/v1/classify", "/v2/models/{name}/infer")}
    cases = [("/v1/classify", b"image/png", img),
             ("/v1/classify", b"multipart/form-data; boundary=" + boundary, multipart),
             ("/v2/models/parnet/infer", b"application/json", v2),
             ("/v2/models/parnet/versions/1/infer", b"application/json", v2)]
    for _ in range(3):
        for path, ctype, body in cases:
            abort_upload(server.port, path, ctype, body[: len(body) // 2], len(body))
    # chunked, cut mid-chunk
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n" + f"{len(img):x}\r\n".encode() + img[:200])
        time.sleep(0.05)
    wait_until(lambda: metric_count(server, "/v1/classify", 499) - before["/v1/classify"][1] >= 7, 20, "7 aborts counted")
    wait_until(lambda: metric_count(server, "/v2/models/{name}/infer", 499) - before["/v2/models/{name}/infer"][1] >= 3,
               20, "3 aborts counted")
    for ep, (s500, _) in before.items():
        assert metric_count(server, ep, 500) == s500, ep
    log = server.stderr.read_text()
    assert "Traceback" not in log and "ClientDisconnect" not in log and "unhandled error" not in log, log[-3000:]
    r = httpx.post(server.url + "/v1/classify", content=img, headers={"content-type": "image/png"}, timeout=30)
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------------------------------------- defect 17

def infer(srv: ServerProcess, body: dict | bytes, headers: dict | None = None) -> httpx.Response:
    url = f"{srv.url}/v2/models/parnet/infer"
    if isinstance(body, bytes):
        return httpx.post(url, content=body, headers=headers, timeout=30)
    return httpx.post(url, json=body, timeout=30)


def test_triton_classification_is_honoured_in_json_and_binary(server):
    """`outputs[0].parameters.classification = k`: BYTES [N, k] of "value:index" strings, the k largest
    logits in order (as Triton's classification extension), in JSON and in the binary tensor extension."""
    x = np.random.default_rng(3).standard_normal((2, *SHAPE)).astype(np.float32)
    plain = infer(server, v2_json(x))
    assert plain.status_code == 200, plain.text
    logits = np.asarray(plain.json()["outputs"][0]["data"], np.float32).reshape(2, -1)
    k = 3
    r = infer(server, v2_json(x, outputs=[{"name": "logits", "parameters": {"classification": k}}]))
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["datatype"] == "BYTES" and out["shape"] == [2, k]
    rows = [out["data"][i * k:(i + 1) * k] for i in range(2)]
    for row, ref in zip(rows, logits):
        idx = [int(s.split(":")[1]) for s in row]
        assert idx == list(np.argsort(-ref, kind="stable")[:k])
        assert [float(s.split(":")[0]) for s in row] == pytest.approx([float(ref[i]) for i in idx], abs=1e-5)
    body = v2_json(x, outputs=[{"name": "logits", "parameters": {"classification": k, "binary_data": True}}])
    rb = infer(server, body)
    assert rb.status_code == 200, rb.text
    n = int(rb.headers["inference-header-content-length"])
    head, raw = json.loads(rb.content[:n]), rb.content[n:]
    assert head["outputs"][0]["parameters"]["binary_data_size"] == len(raw)
    strings, pos = [], 0
    while pos < len(raw):
        (length,) = struct.unpack_from("<I", raw, pos)
        strings.append(raw[pos + 4:pos + 4 + length].decode())
        pos += 4 + length
    assert strings == out["data"]


def test_unknown_or_invalid_parameters_are_refused_everywhere(server):
    """One check over every parameter: unknown request, input and output parameters (Triton's shared memory,
    sequence and priority ones among them) and invalid classification counts are 400s naming them."""
    x = np.zeros((1, *SHAPE), np.float32)
    num_classes = httpx.get(server.url + "/v2/models/parnet", timeout=10).json()["outputs"][0]["shape"][1]
    cases = {
        "classification 0": (v2_json(x, outputs=[{"name": "logits", "parameters": {"classification": 0}}]),
                             "'classification' must be an integer in 1.."),
        "classification too many": (v2_json(x, outputs=[{"name": "logits", "parameters": {
            "classification": num_classes + 1}}]), "'classification' must be an integer"),
        "classification str": (v2_json(x, outputs=[{"name": "logits", "parameters": {"classification": "5"}}]),
                               "'classification' must be an integer"),
        "classification bool": (v2_json(x, outputs=[{"name": "logits", "parameters": {"classification": True}}]),
                                "'classification' must be an integer"),
        "output top_k": (v2_json(x, outputs=[{"name": "logits", "parameters": {"top_k": 5}}]), "['top_k']"),
        "output shm": (v2_json(x, outputs=[{"name": "logits", "parameters": {"shared_memory_region": "r"}}]),
                       "['shared_memory_region']"),
        "request priority": (v2_json(x, parameters={"priority": 1, "sequence_id": 7}), "['priority', 'sequence_id']"),
        "request params not object": (v2_json(x, parameters=[1]), "'parameters' must be an object"),
    }
    inp = v2_json(x)
    inp["inputs"][0]["parameters"] = {"shared_memory_region": "r", "shared_memory_byte_size": 4}
    cases["input shm"] = (inp, "['shared_memory_byte_size', 'shared_memory_region']")
    for name, (body, words) in cases.items():
        r = infer(server, body)
        assert r.status_code == 400, (name, r.status_code, r.text)
        assert words in r.json()["error"], (name, r.text)
    ok = infer(server, v2_json(x, parameters={"binary_data_output": False},
                               outputs=[{"name": "logits", "parameters": {"binary_data": False, "classification": 1}}]))
    assert ok.status_code == 200 and len(ok.json()["outputs"][0]["data"]) == 1, ok.text
    assert "classification" in httpx.get(server.url + "/v2", timeout=10).json()["extensions"]


# ---------------------------------------------------------------------------------------------- defect 14

@pytest.mark.slow
def test_a_request_cut_by_the_graceful_timeout_logs_one_line_and_no_traceback(model_dir, tmp_path):
    """The JSON 500 as before, and the log says it in one warning: no `Exception in ASGI application`."""
    srv = ServerProcess(model_dir, tmp_path, "--plan", "single", "--precision", "fp32", "--graceful-timeout", "1",
                        "--share-cores")
    try:
        with socket.create_connection(("127.0.0.1", srv.port)) as sock:
            sock.settimeout(20)
            sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                         b"Content-Length: 100000\r\n\r\n" + png(100, 100)[:50])  # the rest never comes
            time.sleep(0.5)
            srv.proc.send_signal(signal.SIGTERM)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 500 ") and b"--graceful-timeout" in answer, answer[:300]
        srv.proc.wait(20)
    finally:
        srv.stop()
    log = srv.stderr.read_text()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
    assert log.count("cut at shutdown") == 1, log[-3000:]


# ---------------------------------------------------------------------------------------------- defect 16

def test_decode_budget_lets_small_decodes_pass_and_reserves_for_a_big_one_that_waited():
    """Real pool threads held on gates. Two big decodes hold 90 of 100; a third big one (60) waits; a small
    one (5) arriving after it runs at once (no head-of-line blocking). Once the big waiter has waited its
    patience, a further small one waits behind it (its reservation), and runs after it; total never over."""
    from parnet_cpu.serve.app import DecodeBudget

    gated = GatedWork()
    state, started, gates, work, until = gated.state, gated.started, gated.gates, gated.work, eventually

    async def main() -> None:
        budget, pool = DecodeBudget(100, patience_s=0.5), ThreadPoolExecutor(8)
        sizes = {"big1": 45, "big2": 45, "big3": 60, "small1": 5, "small2": 5, "small3": 10}
        for name in sizes:
            started[name], gates[name] = threading.Event(), threading.Event()

        def start(name: str) -> asyncio.Task:
            return asyncio.create_task(budget.run(sizes[name], pool, work, name, sizes[name]))

        tasks = {n: start(n) for n in ("big1", "big2")}
        await until(lambda: started["big1"].is_set() and started["big2"].is_set(), "big1, big2")
        tasks["big3"] = start("big3")
        await asyncio.sleep(0.05)
        tasks["small1"] = start("small1")  # fits beside the two big ones: runs though big3 waits
        await until(started["small1"].is_set, "small1 to pass the waiting big3")
        assert not started["big3"].is_set()
        gates["small1"].set()
        await asyncio.sleep(0.7)  # big3 has now waited its patience: it holds a reservation
        tasks["small2"] = start("small2")
        await asyncio.sleep(0.2)
        assert not started["small2"].is_set(), "a small decode starved a big one past its patience"
        gates["big1"].set()  # 45 free: big3 (60) does not fit yet; small2 still waits behind it
        await asyncio.sleep(0.2)
        assert not started["big3"].is_set() and not started["small2"].is_set()
        gates["big2"].set()
        await until(lambda: started["big3"].is_set() and started["small2"].is_set(), "big3, then small2")
        tasks["small3"] = start("small3")  # no one waits any more: straight through
        await until(started["small3"].is_set, "small3")
        for g in gates.values():
            g.set()
        assert [await tasks[n] for n in sizes] == list(sizes)
        await until(lambda: budget.used == 0, "all bytes given back")
        pool.shutdown()

    asyncio.run(main())
    assert state["peak"] <= 100


# ---------------------------------------------------------------------------------------------- defect 12

@pytest.mark.slow
def test_replicas_auto_with_a_target_nothing_meets_warns_with_what_was_measured(model_dir, caplog):
    """`--replicas auto` with a p99 target no count can meet started 1 replica with an INFO line only. Now a
    WARNING naming the target and the lowest p99 measured, `target_met` False in the logged JSON, and the
    count with the lowest p99 is started. (The target is set below the option's 1 ms floor on the frozen
    config, so that no machine can meet it; everything else is the real measurement.)"""
    import logging

    from parnet_cpu.serve.app import ServeConfig, open_replicas

    config = ServeConfig(model=str(model_dir), replicas="auto", p99_ms=1.0, share_cores=True, precision="fp32")
    object.__setattr__(config, "p99_ms", 1e-6)
    with caplog.at_level(logging.INFO, logger="parnet_cpu.serve"):
        rs = open_replicas(config)
    try:
        records = [r for r in caplog.records if "p99 target" in r.getMessage()]
        assert len(records) == 1 and records[0].levelno == logging.WARNING, caplog.text
        rec = records[0]
        assert rec.target_met is False and "lowest p99 measured is" in rec.getMessage()
        best = min(rec.measured, key=lambda r: r["p99_ms"])
        assert rec.chosen == best["replicas"] == len(rs.runtimes)
        assert not any(r.getMessage() == "replicas chosen" for r in caplog.records)
    finally:
        rs.close()


def test_classify_query_parameters_are_checked_not_ignored(server):
    """Second hostile pass: `?TOP_K=3` and `?topk=2` answered the default 5, `top_k=5&top_k=7` answered 7.
    One check over the query string: unknown, repeated or non-plain values are 400s naming them."""
    jpeg = (REPO / "parnet_cpu" / "assets" / "calibration_sample" / "cat_chelsea.jpg").read_bytes()
    head = {"content-type": "image/jpeg"}
    for query, words in {"TOP_K=3": "unknown query parameter(s) 'TOP_K'", "topk=2": "'topk'",
                         "top_k=5&top_k=7": "'top_k' given more than once", "top_k=5&debug=1": "'debug'",
                         "top_k=%205": "top_k must be an integer", "top_k=5_0": "top_k must be an integer",
                         "top_k=%EF%BC%93": "top_k must be an integer"}.items():
        r = httpx.post(f"{server.url}/v1/classify?{query}", content=jpeg, headers=head, timeout=30)
        assert r.status_code == 400 and words in r.json()["error"], (query, r.status_code, r.text)
    ok = httpx.post(f"{server.url}/v1/classify?top_k=3", content=jpeg, headers=head, timeout=30)
    assert ok.status_code == 200 and len(ok.json()["predictions"]) == 3, ok.text
