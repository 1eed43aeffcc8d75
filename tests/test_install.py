"""Installs that fit the job: the built wheel, installed with no extra into a fresh virtual environment
(real pip, packages from the registry), has no torch and still runs `Runtime` and `serve` on a model
folder that the full install exported."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import NARROW

pytestmark = pytest.mark.slow  # builds a wheel and a venv

REPO = Path(__file__).resolve().parents[1]

RUNTIME_CHECK = """
import importlib.util, json, sys
import numpy as np
assert importlib.util.find_spec("torch") is None, "torch is installed in the serving venv"
import parnet_cpu
from parnet_cpu import Runtime
assert parnet_cpu.__file__.startswith(sys.prefix), f"parnet_cpu from {parnet_cpu.__file__}, not the venv's wheel"
x = np.load(sys.argv[2])
with Runtime(sys.argv[1], plan="single", cores_per_stream=None) as rt:
    y = rt.infer(x)
assert "torch" not in sys.modules
print(json.dumps(y.tolist()))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serving_install_from_the_wheel_needs_no_torch(tmp_path):
    from parnet_cpu.export import export_model_dir
    from parnet_cpu.models.parnet import create_model
    from parnet_cpu.runtime.runtime import Runtime

    torch.manual_seed(0)
    model_dir = export_model_dir(create_model("parnet_s", **NARROW), tmp_path / "model")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(REPO)], check=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("parnet_cpu-*.whl"))
    venv = tmp_path / "serve-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    # the venv sees only what it installed: a PYTHONPATH into a source tree (a clean clone's test run) would
    # let the venv import that tree instead of the wheel, and let pip take its egg-info for an installed wheel
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # the serving install: the wheel with no extra, its dependencies from the package registry
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)], check=True,
                   env=env, timeout=600)
    freeze = subprocess.run([str(py), "-m", "pip", "freeze"], capture_output=True, text=True, check=True,
                            env=env).stdout
    assert not any(line.split("==")[0].lower() in {"torch", "nncf", "onnxruntime", "torchao"}
                   for line in freeze.splitlines()), freeze

    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = subprocess.run([str(py), "-c", RUNTIME_CHECK, str(model_dir), str(tmp_path / "x.npy")],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    with Runtime(model_dir, plan="single", cores_per_stream=None) as rt:
        ref = rt.infer(x)
    got = np.array(json.loads(out.stdout.strip().splitlines()[-1]), np.float32)
    assert got.shape == ref.shape and np.allclose(got, ref, rtol=1e-4, atol=1e-4)

    # serve from the same venv: ready, then a real v2 inference over loopback
    port = _free_port()
    server = subprocess.Popen([str(venv / "bin" / "parnet-cpu"), "serve", "--model-dir", str(model_dir), "--port",
                               str(port), "--plan", "single"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                if urllib.request.urlopen(f"{base}/v2/health/ready", timeout=1).status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server never became ready"
            time.sleep(0.3)
        body = json.dumps({"inputs": [{"name": "input", "shape": list(x[:1].shape), "datatype": "FP32",
                                       "data": x[:1].ravel().tolist()}]}).encode()
        req = urllib.request.Request(f"{base}/v2/models/parnet/infer", data=body,
                                     headers={"Content-Type": "application/json"})
        resp = json.loads(urllib.request.urlopen(req, timeout=60).read())
        logits = np.array(resp["outputs"][0]["data"], np.float32).reshape(resp["outputs"][0]["shape"])
        assert np.allclose(logits, ref[:1], rtol=1e-4, atol=1e-4)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
