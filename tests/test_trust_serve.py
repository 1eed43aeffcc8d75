"""Issue 11, server classes 8 and 11: a dead worker turns the health endpoints to 503 within seconds and
requests fail fast with the cause; a stopped one gives 504, not a hang; request memory is bounded by the
declared tensor shape before the body is read; deep nesting is a client error; NaN is never written as
JSON; slow headers, slow bodies and too many connections are cut off.

Real `parnet-cpu serve` processes on 127.0.0.1, real worker processes (stopped with SIGSTOP, killed with
SIGKILL), raw sockets where a well-behaved client library cannot misbehave, httpx otherwise.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from conftest import NARROW, randomize_bn
from test_serve import ServerProcess, metric, parse_binary_logits, v2_binary, v2_json, wait_until

CPUS = sorted(os.sched_getaffinity(0))
SHAPE = (3, NARROW["input_size"], NARROW["input_size"])
HEADER_TIMEOUT, BODY_TIMEOUT, MAX_CONNECTIONS = 1.5, 2.0, 6
OVERFLOW_INPUT = 1e10  # the model's logits overflow float32 for inputs this large (finite ones)


pytestmark = pytest.mark.usefixtures("own_lease_namespace")  # conftest: leases are machine-wide


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A narrow ParNet whose classifier weights are scaled by 1e32: ordinary inputs give large but finite
    logits (the server's start-up check passes), inputs of 1e10 overflow float32 to inf/NaN."""
    import torch

    from parnet_cpu.export import export_model_dir
    from parnet_cpu.models.parnet import create_model

    torch.manual_seed(0)
    model = create_model("parnet_s", **NARROW)
    randomize_bn(model)
    with torch.no_grad():
        model.head.fc.weight.mul_(1e32)
        model.head.fc.bias.zero_()
    return export_model_dir(model, tmp_path_factory.mktemp("trust_serve") / "overflow")


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *SHAPE)).astype(np.float32)


def raw_request(port: int, head: bytes, body: bytes = b"", wait_s: float = 10.0) -> bytes:
    """Send `head` (+ the start of a body) on a raw socket and return what the server answers (b"" when
    it just closes) - without ever sending the rest."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(wait_s)
        sock.sendall(head + body)
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                head, sep, body = b"".join(chunks).partition(b"\r\n\r\n")
                length = [int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                          if line.startswith(b"content-length:")]
                if sep and length and len(body) >= length[0]:
                    break
        except socket.timeout:
            raise AssertionError(f"no answer within {wait_s} s (got {b''.join(chunks)[:200]!r})") from None
        except ConnectionResetError:
            pass
        return b"".join(chunks)


@pytest.fixture(scope="module")
def hardened(model_dir, tmp_path_factory):
    srv = ServerProcess(model_dir, tmp_path_factory.mktemp("hardened"), "--plan", "single", "--precision", "fp32",
                        "--max-body-mb", "64", "--header-timeout", str(HEADER_TIMEOUT),
                        "--body-timeout", str(BODY_TIMEOUT), "--max-connections", str(MAX_CONNECTIONS))
    yield srv
    srv.stop()


# ---------------------------------------------------------------------------------------------- class 8

def runtime_workers(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children(recursive=True)
            if "spawn_main" in " ".join(p.cmdline()) and "resource_tracker" not in " ".join(p.cmdline())]


@pytest.mark.slow
def test_c8_stopped_worker_504_killed_worker_restart_then_503_health(model_dir, tmp_path):
    """Multi-stream server, --runtime-restarts 1. A stopped worker: that batch fails with 504 after
    --infer-timeout (still ready: the worker may come back), and once it continues answers are bit-exact.
    A killed worker: ready turns 503 within seconds, the server replaces the runtime (log, metric) and
    answers bit-exactly again. The next killed worker exceeds the restarts: ready and live answer 503
    within seconds, requests fail fast with 503 naming the worker's pid and the signal."""
    from parnet_cpu.runtime import Runtime

    groups = [[CPUS[0]], [CPUS[-1]], [CPUS[0]]]
    x = images(3, seed=11)
    with Runtime(model_dir, cores=groups, plan="multistream", precision="fp32") as rt:
        ref = [rt.infer(x[i:i + 1]) for i in range(3)]  # the same plan, before the server holds the cores
    srv = ServerProcess(model_dir, tmp_path, "--plan", "multistream", "--cores", ":".join(str(g[0]) for g in groups),
                        "--precision", "fp32", "--infer-timeout", "2", "--max-wait-ms", "0",
                        "--runtime-restarts", "1")
    url = srv.url + "/v2/models/parnet/infer"

    def status(path: str) -> int:
        return httpx.get(srv.url + path, timeout=5).status_code

    def all_correct() -> bool:
        out = []
        for i in range(3):
            body, headers = v2_binary(x[i:i + 1])
            r = httpx.post(url, content=body, headers=headers, timeout=30)
            assert r.status_code == 200, r.text
            out.append(np.array_equal(parse_binary_logits(r), ref[i]))
        return all(out)

    try:
        workers = runtime_workers(srv.proc.pid)
        assert len(workers) == 4, [w.cmdline() for w in workers]
        assert all_correct()
        victim = workers[1]
        victim.send_signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            r = httpx.post(url, json=v2_json(x[:1]), timeout=30)
            assert r.status_code == 504 and "timed out" in r.json()["error"], r.text
            assert time.monotonic() - t0 < 8
            assert status("/v2/health/ready") == 200  # stopped is not dead
        finally:
            victim.send_signal(signal.SIGCONT)
        assert all_correct()

        victim.send_signal(signal.SIGKILL)  # first death: replaced
        wait_until(lambda: status("/v2/health/ready") == 503, 5, "ready to turn 503")
        assert status("/v2/health/live") == 200  # it will recover by itself
        wait_until(lambda: status("/v2/health/ready") == 200, 60, "the runtime to be restarted")
        assert all_correct()
        assert metric(httpx.get(srv.url + "/metrics").text, "parnet_runtime_restarts_total") == 1
        assert any(json.loads(line)["msg"] == "runtime restarted" for line in srv.logs())

        victim = runtime_workers(srv.proc.pid)[2]  # second death: no restarts left
        victim.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        wait_until(lambda: status("/v2/health/ready") == 503, 5, "ready to turn 503")
        wait_until(lambda: status("/v2/health/live") == 503, 5, "live to turn 503")
        assert time.monotonic() - t0 < 5
        t0 = time.monotonic()
        r = httpx.post(url, json=v2_json(x[:1]), timeout=30)
        assert r.status_code == 503 and time.monotonic() - t0 < 5
        assert f"pid {victim.pid}" in r.json()["error"] and "SIGKILL" in r.json()["error"], r.text
        assert metric(httpx.get(srv.url + "/metrics").text, "parnet_runtime_healthy") == 0
        assert any(json.loads(line)["msg"].startswith("runtime failed") for line in srv.logs())
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------------- class 11

def test_c11_body_larger_than_its_declared_shape_is_refused_before_it_is_read(hardened):
    """A 40 MB body declaring one 3x64x64 image (49 KB as binary, ~400 KB at most as JSON) is answered 413
    after its first 128 KB: the rest is never read, let alone parsed (it is never even sent here)."""
    values = ("0.123456789," * 12000).encode()
    json_start = b'{"inputs": [{"name": "input", "shape": [1, 3, 64, 64], "datatype": "FP32", "data": [' + values
    head = (b"POST /v2/models/parnet/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 40000000\r\n\r\n")
    answer = raw_request(hardened.port, head, json_start[:128 * 1024])
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"declared" in answer

    header = json.dumps({"inputs": [{"name": "input", "shape": [1, *SHAPE], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 4 * int(np.prod(SHAPE))}}]}).encode()
    head = (b"POST /v2/models/parnet/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            + f"Inference-Header-Content-Length: {len(header)}\r\nContent-Length: 40000000\r\n\r\n".encode())
    answer = raw_request(hardened.port, head, header + b"\0" * 100_000)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    # a body that fits its shape is still served
    x = images(2, seed=3)
    assert httpx.post(hardened.url + "/v2/models/parnet/infer", json=v2_json(x), timeout=30).status_code == 200
    body, headers = v2_binary(x)
    assert httpx.post(hardened.url + "/v2/models/parnet/infer", content=body, headers=headers,
                      timeout=30).status_code == 200


def test_c11_deeply_nested_json_is_a_client_error(hardened):
    url = hardened.url + "/v2/models/parnet/infer"
    for body in (b"[" * 100_000 + b"]" * 100_000,
                 b'{"inputs": [{"name": "input", "shape": [1, 3, 64, 64], "datatype": "FP32", "data": '
                 + b"[" * 50_000 + b"0" + b"]" * 50_000 + b"}]}"):
        r = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 400, r.text
        assert "nested too deeply" in r.json()["error"]
    assert httpx.get(hardened.url + "/v2/health/live").status_code == 200


def test_c11_non_finite_logits_are_never_written_as_bare_nan(hardened):
    """Finite inputs for which the model's logits overflow: the answer is valid (strict) JSON with an error,
    in the JSON and in the binary protocol; ordinary inputs still get their (large, finite) logits."""
    def strict(text: str):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in the response"))

    x = np.full((1, *SHAPE), OVERFLOW_INPUT, np.float32)
    url = hardened.url + "/v2/models/parnet/infer"
    r = httpx.post(url, json=v2_json(x), timeout=30)
    assert r.status_code == 500 and "non-finite" in strict(r.text)["error"], r.text[:300]
    body, headers = v2_binary(x)
    r = httpx.post(url, content=body, headers=headers, timeout=30)
    assert r.status_code == 500 and "non-finite" in strict(r.text)["error"]
    r = httpx.post(url, json=v2_json(images(1, seed=4)), timeout=30)
    assert r.status_code == 200 and np.isfinite(strict(r.text)["outputs"][0]["data"]).all()
    assert httpx.get(hardened.url + "/v2/health/ready").status_code == 200  # the model's answer, not a failure


@pytest.mark.slow
def test_c11_slow_headers_and_slow_bodies_are_cut_off(hardened):
    t0 = time.monotonic()
    assert raw_request(hardened.port, b"") == b""  # connects, sends nothing: closed
    assert raw_request(hardened.port, b"POST /v2/models/parnet/infer HTTP/1.1\r\nHost: x\r\n") == b""
    assert time.monotonic() - t0 < 2 * HEADER_TIMEOUT + 4
    t0 = time.monotonic()
    answer = raw_request(hardened.port, b"POST /v2/models/parnet/infer HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n", b'{"inputs": ')
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert BODY_TIMEOUT - 0.5 < time.monotonic() - t0 < BODY_TIMEOUT + 4
    assert httpx.get(hardened.url + "/v2/health/ready").status_code == 200


def test_c11_connection_limit(hardened):
    """With --max-connections open, a further request is answered 503 at once; when they go, 200 again."""
    idle = [socket.create_connection(("127.0.0.1", hardened.port)) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)
        r = httpx.get(hardened.url + "/v2/health/live", timeout=5)
        assert r.status_code == 503
    finally:
        for s in idle:
            s.close()
    wait_until(lambda: httpx.get(hardened.url + "/v2/health/live", timeout=5).status_code == 200, 10,
               "connections to be released")


def test_c11_limits_are_flags_with_defaults():
    import argparse

    from parnet_cpu.cli import serve

    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--model-dir", "m"])
    assert (args.max_connections, args.header_timeout, args.body_timeout, args.infer_timeout,
            args.runtime_restarts) == (256, 10.0, 60.0, 60.0, 3)
    with pytest.raises(SystemExit, match="^2$"):  # a number out of range is a usage error (parnet_cpu.options)
        serve.main(["--model-dir", "m", "--header-timeout", "0"])
