"""Replicas (issue 17 item 2): N single-graph runtimes on disjoint leased cores behind one submit(),
and `serve --replicas N|auto` answering through them. Real runtimes, real server process, real HTTP."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import NARROW, rel_l2

REPO = Path(__file__).resolve().parents[1]
CPUS = sorted(os.sched_getaffinity(0))
SHAPE = (3, NARROW["input_size"], NARROW["input_size"])


@pytest.fixture(scope="module")
def model_dir(narrow_copy, tmp_path_factory) -> Path:
    return narrow_copy(tmp_path_factory.mktemp("replicas") / "narrow")


def reference(model_dir: Path, x: np.ndarray) -> np.ndarray:
    from parnet_cpu.runtime.engine import CompileOptions, compile_model

    return compile_model(model_dir / "model_fp32.xml", CompileOptions(precision="fp32"))(x)[0]


@pytest.mark.skipif(len(CPUS) < 2, reason="two replicas need two cores")
def test_replicas_hold_disjoint_cores_and_share_the_work(model_dir):
    from parnet_cpu.runtime.leases import current_leases
    from parnet_cpu.serve.replicas import ReplicaSet
    from parnet_cpu.system.cpuinfo import parse_cpu_list

    x = np.random.default_rng(0).standard_normal((12, *SHAPE)).astype(np.float32)
    ref = reference(model_dir, x)
    with ReplicaSet(model_dir, 2, precision="fp32") as rs:
        groups = [set(rt.plan.cpus) for rt in rs.runtimes]
        assert not groups[0] & groups[1] and len(groups[0]) == len(groups[1]) == len(CPUS) // 2
        for rt, cpus in zip(rs.runtimes, groups):  # every inference thread stays in its replica's group
            for worker in rt.thread_affinity().values():
                assert all(set(parse_cpu_list(a)) <= cpus for a in worker["threads"].values())
        assert {lease.pid for lease in current_leases(CPUS)} == {os.getpid()}
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda i: rs.infer(x[i:i + 1]), range(len(x))))
        counts = [rt.stats.summary()["model"]["count"] for rt in rs.runtimes]
    assert rel_l2(np.concatenate(got), ref) <= 1e-5
    assert all(c > 0 for c in counts), counts  # both replicas answered
    assert current_leases(CPUS) == []  # closed: released


def test_more_replicas_than_cores_is_a_clear_error(model_dir):
    from parnet_cpu.runtime.cores import CoreSpecError
    from parnet_cpu.serve.replicas import ReplicaSet, replica_counts

    with pytest.raises(CoreSpecError, match=f"{len(CPUS) + 1} replicas need at least {len(CPUS) + 1} free"):
        ReplicaSet(model_dir, len(CPUS) + 1)
    assert replica_counts(2) == [1, 2] and replica_counts(5) == [1, 2, 5] and replica_counts(16) == [1, 2, 3, 4, 5, 8, 16]


def test_cli_refuses_replicas_with_explicit_cores(model_dir, capsys):
    from parnet_cpu.cli import main

    assert main(["serve", "--model-dir", str(model_dir), "--replicas", "2", "--cores", "0:0:0"]) == 2
    assert "drop --cores" in capsys.readouterr().err
    assert main(["serve", "--model-dir", str(model_dir), "--p99-ms", "5"]) == 2
    assert "--p99-ms needs --replicas auto" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(len(CPUS) < 2, reason="two replicas need two cores")
def test_serve_replicas_auto_answers_through_the_chosen_replicas(model_dir, tmp_path):
    import httpx

    port = free_port()
    err = tmp_path / "stderr.log"
    with open(err, "wb") as e:
        proc = subprocess.Popen([sys.executable, "-m", "parnet_cpu", "serve", "--model-dir", str(model_dir), "--port",
                                 str(port), "--precision", "fp32", "--replicas", "auto", "--p99-ms", "1000"],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=e)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, err.read_text()[-3000:]
            try:
                if httpx.get(url + "/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server not ready"
            time.sleep(0.1)
        x = np.random.default_rng(1).standard_normal((4, *SHAPE)).astype(np.float32)
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
        r = httpx.post(url + "/v2/models/parnet/infer", json=body, timeout=30)
        assert r.status_code == 200, r.text
        got = np.array(r.json()["outputs"][0]["data"], np.float32).reshape(4, -1)
        assert rel_l2(got, reference(model_dir, x)) <= 1e-5
    finally:
        proc.terminate()
        proc.wait(30)
    logs = [json.loads(line) for line in err.read_text().splitlines() if line.startswith("{")]
    chosen = next(line for line in logs if line.get("msg") == "replicas chosen")
    # a generous target (1 s): the highest throughput wins; both counts were measured
    assert [row["replicas"] for row in chosen["measured"]] == [1, 2] and chosen["chosen"] in (1, 2)
    best = max(chosen["measured"], key=lambda row: row["throughput_ips"])["replicas"]
    assert chosen["chosen"] == best
