"""Issue 21, server classes 2, 6 and 9: the v2 JSON decoder checks nesting against the declared shape and
takes only JSON numbers; connections are capped below the file-descriptor limit and a flood of one log
line stays small; model names that cannot be routed are refused; every error the HTTP layer itself makes
(invalid HTTP, over the connection cap, --graceful-timeout running out) is JSON like the app's.

Real `parnet-cpu serve` processes on 127.0.0.1 (one under a real RLIMIT_NOFILE), raw sockets where a
well-behaved client library cannot misbehave, httpx otherwise.
"""
from __future__ import annotations

import io
import json
import logging
import resource
import signal
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import NARROW
from test_serve import REPO, ServerProcess, v2_binary, v2_json, wait_until
from test_trust_serve import raw_request

SHAPE = (3, NARROW["input_size"], NARROW["input_size"])
NAME = "ParNet_s-1.2"  # unusual but routable: the module's server serves it
MAX_CONNECTIONS = 4

pytestmark = pytest.mark.usefixtures("own_lease_namespace")  # conftest: leases are machine-wide


@pytest.fixture(scope="module")
def model_dir(narrow_copy, tmp_path_factory) -> Path:
    return narrow_copy(tmp_path_factory.mktemp("guards") / "narrow")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = ServerProcess(model_dir, tmp_path_factory.mktemp("guards_server"), "--plan", "single", "--precision", "fp32",
                        "--name", NAME, "--max-connections", str(MAX_CONNECTIONS))
    yield srv
    srv.stop()


def limited_server(monkeypatch, nofile: tuple[int, int], *args) -> ServerProcess:
    """A `ServerProcess` whose process starts under RLIMIT_NOFILE = nofile (soft, hard)."""
    with monkeypatch.context() as m:
        m.setattr(subprocess, "Popen", partial(subprocess.Popen, preexec_fn=lambda: resource.setrlimit(
            resource.RLIMIT_NOFILE, nofile)))
        return ServerProcess(*args)


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *SHAPE)).astype(np.float32)


def infer(srv: ServerProcess, body: dict | bytes) -> httpx.Response:
    url = f"{srv.url}/v2/models/{NAME}/infer"
    if isinstance(body, bytes):
        return httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=30)
    return httpx.post(url, json=body, timeout=30)


def tensor(data, shape, **extra) -> dict:
    return {"inputs": [{"name": "input", "shape": list(shape), "datatype": "FP32", "data": data}], **extra}


def logits(r: httpx.Response) -> np.ndarray:
    assert r.status_code == 200, r.text
    return np.asarray(r.json()["outputs"][0]["data"], np.float32)


def json_error(answer: bytes, status: int) -> str:
    """The `error` of a raw HTTP answer, asserting its status and that its body is JSON."""
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), answer[:300]
    assert b"content-type: application/json" in head.lower(), answer[:300]
    return json.loads(body)["error"]


# ---------------------------------------------------------------------------------------------- class 2

def test_c2_nested_data_must_match_the_declared_shape(server):
    """NHWC-nested numbers under an NCHW shape were answered 200 with the logits of the same numbers read flat;
    every other mismatch of nesting and shape (batch, rows, depth) is a 400 naming the input and dimension.
    Flat data and data nested exactly as the shape give the same logits as the binary protocol."""
    x = images(2, seed=1)
    ref = logits(infer(server, v2_json(x)))
    assert np.array_equal(logits(infer(server, tensor(x.tolist(), x.shape))), ref)
    body, headers = v2_binary(x)
    r = httpx.post(f"{server.url}/v2/models/{NAME}/infer", content=body, headers=headers, timeout=30)
    n = int(r.headers["inference-header-content-length"])
    assert np.array_equal(np.frombuffer(r.content[n:], "<f4"), ref)

    one = x[:1]
    ragged = one.tolist()
    ragged[0][2][5] = ragged[0][2][5][:-1]
    wrong = {
        "NHWC under NCHW": (one.transpose(0, 2, 3, 1).tolist(), one.shape, "dimension 1"),
        "HWC per image, batch 2": (x.transpose(0, 2, 3, 1).tolist(), x.shape, "dimension 1"),
        "one image, shape says 2": (one.tolist(), x.shape, "dimension 0"),
        "no batch level": (one[0].tolist(), one.shape, "dimension 0"),
        "a row too short": (ragged, one.shape, "dimension 3"),
        "rows flattened": (one.reshape(1, 3, -1).tolist(), one.shape, "dimension 2"),
        "one level too deep": (one[..., None].tolist(), one.shape, "nested deeper"),
        "flat, one value short": (one.ravel().tolist()[:-1], one.shape, "needs"),
    }
    for case, (data, shape, says) in wrong.items():
        r = infer(server, tensor(data, shape))
        assert r.status_code == 400, (case, r.text[:300])
        assert "'input'" in r.json()["error"] and says in r.json()["error"], (case, r.json()["error"])
    assert httpx.get(server.url + "/v2/health/ready").status_code == 200


@pytest.mark.slow
def test_c2_only_json_numbers_are_numbers(server):
    """Strings, booleans, null, objects and NaN/Infinity were read as numbers (or crashed the parse); now a
    400, flat or nested, anywhere in the tensor. JSON integers are numbers. A boolean parameter must be a
    JSON boolean too ("false" was true)."""
    x = images(1, seed=2)
    flat = x.ravel().tolist()
    ref = logits(infer(server, v2_json(x)))
    for bad in ("0.5", True, False, None, {}, [0.5]):
        for where in (0, len(flat) // 2, len(flat) - 1):
            data = list(flat)
            data[where] = bad
            r = infer(server, tensor(data, x.shape))
            assert r.status_code == 400, (bad, where, r.text[:200])
            says = "dimension 0" if isinstance(bad, list) and where == 0 else "JSON numbers"  # a list first: nested
            assert says in r.json()["error"], r.json()
        nested = x.tolist()
        nested[0][1][2][3] = bad
        assert infer(server, tensor(nested, x.shape)).status_code == 400, bad
    text = json.dumps(tensor(flat, x.shape))
    for constant in ("NaN", "Infinity", "-Infinity"):
        r = infer(server, text.replace(repr(flat[7]), constant, 1).encode())
        assert r.status_code == 400 and constant in r.json()["error"], r.text[:200]
    for huge in ("1e39", "1" + "0" * 400):  # beyond float32, beyond any float
        r = infer(server, text.replace(repr(flat[7]), huge, 1).encode())
        assert r.status_code == 400 and "range" in r.json()["error"], r.text[:200]
    ints = np.round(x * 3)
    assert np.array_equal(logits(infer(server, tensor([int(v) for v in ints.ravel()], x.shape))),
                          logits(infer(server, v2_json(ints))))
    r = infer(server, v2_json(x, parameters={"binary_data_output": "false"}))
    assert r.status_code == 400 and "true or false" in r.json()["error"]
    assert np.array_equal(logits(infer(server, v2_json(x, parameters={"binary_data_output": False}))), ref)


# ---------------------------------------------------------------------------------------------- class 9

REFUSED_NAMES = ["team/parnet", "", "../x", ".", "..", "a b", " parnet", "parnet\n", "%2F", "parnet%2Fx", "a?b",
                 "a#b", "a\\b", "modèle", "名前", "-parnet", "_x", "x" * 129, "\u200bparnet"]
ROUTED_NAMES = ["parnet", NAME, "a", "A1", "v2.model", "a..b", "x-_.y", "x" * 128]


def test_c9_names_that_cannot_be_routed_are_refused_by_the_flag_and_the_config(model_dir, capsys):
    """`--name team/parnet`, "" or "../x" (and names nobody listed) were served: ready said 200 while every
    model URL was 404. The CLI flag and `ServeConfig` refuse them with the same message; names they accept
    are what the v2 routes match."""
    from starlette.routing import Match

    from parnet_cpu.cli import serve
    from parnet_cpu.serve.app import ServeConfig, create_app

    for name in REFUSED_NAMES:
        with pytest.raises(ValueError, match="cannot be routed"):
            ServeConfig(model=str(model_dir), name=name)
        with pytest.raises(SystemExit) as exit_:
            serve.main(["--model-dir", str(model_dir), f"--name={name}"])
        assert exit_.value.code == 2
        assert "cannot be routed" in capsys.readouterr().err, name
    for name in ROUTED_NAMES:
        app = create_app(ServeConfig(model=str(model_dir), name=name), runtime=object())
        for path in (f"/v2/models/{name}/infer", f"/v2/models/{name}/versions/1/infer"):
            scope = {"type": "http", "path": path, "method": "POST"}
            matched = [child for route in app.routes for m, child in [route.matches(scope)] if m is Match.FULL]
            assert matched and matched[0]["path_params"]["name"] == name, (name, path)


def test_c9_every_error_of_the_http_layer_is_json(server):
    """uvicorn answered an invalid request (400) and the connection cap (503) in plain text; now JSON like the
    app's errors (404, 405 shown alongside). Beyond the cap's margin a connection is closed at once."""
    assert "not HTTP/1.1" in json_error(raw_request(server.port, b"GARBAGE\r\n\r\n"), 400)
    assert json_error(raw_request(server.port, b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\n\r\n"), 400)
    assert json_error(raw_request(server.port, b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n"), 404)
    assert json_error(raw_request(server.port, b"GET /v2/models/parnet HTTP/1.1\r\nHost: x\r\n\r\n"), 404)
    assert json_error(raw_request(server.port, f"GET /v2/models/{NAME}/infer HTTP/1.1\r\nHost: x\r\n\r\n".encode()),
                      405)
    assert httpx.get(f"{server.url}/v2/models/{NAME}", timeout=5).json()["name"] == NAME
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.3)
        answer = raw_request(server.port, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert "too many connections" in json_error(answer, 503)
        assert b"retry-after: 1" in answer.lower()
        idle.append(socket.create_connection(("127.0.0.1", server.port)))  # the cap's margin (1) is full now
        time.sleep(0.3)
        assert raw_request(server.port, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n") == b""  # closed
    finally:
        for s in idle:
            s.close()
    wait_until(lambda: httpx.get(server.url + "/v2/health/live", timeout=5).status_code == 200, 10,
               "connections to be released")


@pytest.mark.slow
def test_c9_graceful_timeout_is_a_json_500(model_dir, tmp_path):
    """A request still running when --graceful-timeout runs out was answered uvicorn's plain-text 500."""
    srv = ServerProcess(model_dir, tmp_path, "--plan", "single", "--precision", "fp32", "--graceful-timeout", "1",
                        "--share-cores")  # the module's server holds the cores
    try:
        with socket.create_connection(("127.0.0.1", srv.port)) as sock:
            sock.settimeout(20)
            sock.sendall(b"POST /v2/models/parnet/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{\"inputs\": ")  # the rest of the body never comes
            time.sleep(0.5)
            srv.proc.send_signal(signal.SIGTERM)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert "--graceful-timeout" in json_error(answer, 500)
        assert srv.proc.wait(20) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it drained for
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------------- class 6

def budget_under(nofile: tuple[int, int], asked: int = 256) -> dict:
    """`connection_budget(asked)` in a fresh process started under RLIMIT_NOFILE = nofile."""
    code = ("import json; from parnet_cpu.serve.http_protocol import connection_budget as b\n"
            f"try: print(json.dumps(b({asked}).describe()))\nexcept ValueError as e: print(json.dumps(str(e)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, nofile))
    return json.loads(out.stdout)


@pytest.mark.slow
def test_c6_the_connection_cap_fits_the_descriptor_limit():
    """Read at start-up: a low hard limit lowers the cap (and the accept burst) to fit; a low soft limit under
    a higher hard one is raised as far as --max-connections needs; a limit with no room is a clear error."""
    low = budget_under((64, 64))
    assert low["fd_soft_limit"] == 64 and low["fd_soft_limit_raised_from"] is None
    assert 1 <= low["max_connections"] < low["max_open"] and low["max_connections"] < 256
    assert low["fds_in_use"] + low["fd_reserve"] + low["max_open"] + 3 * low["backlog"] <= 64
    raised = budget_under((64, 20000))
    assert raised["fd_soft_limit_raised_from"] == 64 and raised["max_connections"] == 256
    assert raised["fd_soft_limit"] >= raised["fds_in_use"] + raised["fd_reserve"] + raised["max_open"] + 3 * 2048
    assert budget_under((64, 64), asked=5)["max_connections"] == 5  # what was asked, when it fits
    err = budget_under((20, 20))
    assert isinstance(err, str) and "ulimit -n" in err and "raise it" in err


@pytest.mark.slow
def test_c6_out_of_descriptors_the_server_refuses_logs_little_and_recovers(model_dir, tmp_path, monkeypatch):
    """`ulimit -n 64` and 200 idle connections: no request was answered, the log grew by tens of MB of
    `accept() out of system resource` tracebacks, and the server could stay deaf after the clients left.
    Now the cap is said at start-up, a further connection is answered or refused (503, closed), never left hanging,
    accept() never fails, repeated warnings are summarised, and the server answers as soon as clients go."""
    srv = limited_server(monkeypatch, (64, 64), model_dir, tmp_path, "--plan", "single", "--precision", "fp32",
                         "--header-timeout", "60", "--share-cores")
    try:
        said = [json.loads(line) for line in srv.logs() if "connections (--max-connections" in line]
        assert said and said[0]["fd_soft_limit"] == 64 and said[0]["max_connections"] < 256, said
        idle = []
        for _ in range(200):  # non-blocking: the clients do not wait for the server to accept
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", srv.port))
            idle.append(s)
        try:
            time.sleep(3)
            try:
                r = httpx.get(srv.url + "/v2/health/live", timeout=httpx.Timeout(15, connect=15))
                assert r.status_code == 200 or "too many connections" in r.json()["error"], r.text  # a slot, or 503
            except httpx.TimeoutException:
                raise AssertionError("a request while the connections are held hung") from None
            except httpx.TransportError:
                pass  # closed at once: refused
        finally:
            for s in idle:
                s.close()
        wait_until(lambda: httpx.get(srv.url + "/v2/health/live", timeout=5).status_code == 200, 15,
                   "an answer once the clients are gone")
        log = srv.stderr.read_text()
        assert len(log) < 100_000, f"{len(log)} bytes of log"
        assert log.count("out of system resource") <= 5
        assert log.count("closing new connections at once") <= 15  # 5 per 10 s, then one summary line
    finally:
        srv.stop()


def test_c6_repeated_log_lines_are_summarised():
    """RepeatFilter on a real handler: 10,000 identical errors with tracebacks give 5 lines and, after the
    interval, one summary with the count; other messages and INFO lines (the access log) are untouched."""
    from parnet_cpu.serve.metrics import JsonFormatter
    from parnet_cpu.serve.http_protocol import RepeatFilter

    now = [0.0]
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RepeatFilter(burst=5, interval_s=10, clock=lambda: now[0]))
    log = logging.getLogger("test_guards_serve.flood")
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO)
    try:
        try:
            raise OSError(24, "Too many open files")
        except OSError as exc:
            for _ in range(10_000):
                log.error("socket.accept() out of system resource", exc_info=exc)
        for i in range(3):
            log.warning("client %d sent garbage", i)  # one template: one kind
        for i in range(1000):
            log.info("request", extra={"path": f"/{i}"})
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        assert sum(line["msg"].startswith("socket.accept()") for line in lines) == 5
        assert sum("sent garbage" in line["msg"] for line in lines) == 3
        assert sum(line["msg"] == "request" for line in lines) == 1000
        now[0] = 10.5
        log.error("socket.accept() out of system resource")
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        summary = [line for line in lines if line.get("suppressed")]
        assert len(summary) == 1 and summary[0]["suppressed"] == 9995 and "accept()" in summary[0]["msg"]
        assert lines[-1]["msg"].startswith("socket.accept()")  # a new interval: shown again
    finally:
        log.removeHandler(handler)
