"""Shared fixtures: a narrow ParNet that exercises every block type at a fraction of the cost."""
from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest

# Core leases are machine-wide: give this test session (and the servers and workers it starts) its own
# lease namespace, so several pytest runs on one machine do not refuse each other's runtimes.
os.environ.setdefault("PARNET_CPU_LEASE_DIR", tempfile.mkdtemp(prefix="parnet-test-leases-"))

# IPEX needs torch 2.8 and lives in its own environment (scripts/ipex_env.sh runs tests/ipex there)
collect_ignore = [] if importlib.util.find_spec("intel_extension_for_pytorch") else ["ipex"]
# Ray (the `ray` extra) lives in its own environment too (scripts/ray_env.sh runs tests/ray there); a spec
# without origin is this folder's own tests/ray seen as a namespace package, not Ray
collect_ignore += [] if getattr(importlib.util.find_spec("ray"), "origin", None) else ["ray"]

NARROW = dict(planes=(16, 32, 64, 128), num_blocks=(5, 6, 6, 1), input_size=64)


class GatedWork:
    """Work for real pool threads that holds until its gate opens, counting the amount running at once (the
    decode-budget tests): `work(name, n)` runs `n` units; `started[name]` is set when it runs, `gates[name]`
    lets it finish; `state` holds `running` and the `peak`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.state = {"running": 0, "peak": 0}
        self.started: dict[str, threading.Event] = {}
        self.gates: dict[str, threading.Event] = {}

    def work(self, name: str, n: int) -> str:
        with self.lock:
            self.state["running"] += n
            self.state["peak"] = max(self.state["peak"], self.state["running"])
        self.started[name].set()
        self.gates[name].wait(30)
        with self.lock:
            self.state["running"] -= n
        return name


async def eventually(cond, what: str) -> None:
    """Wait (up to 30 s, polling every 10 ms in the event loop) until `cond()` holds."""
    for _ in range(3000):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def slow_param(*values):
    """A parameter set that only the full suite runs: the full-size variants (ParNet-M/L/XL take seconds
    each to build); their test keeps ParNet-S in the inner loop (`-m "not slow"`)."""
    return pytest.param(*values, marks=pytest.mark.slow)


def randomize_bn(model, seed: int = 0) -> None:
    """Give every BN non-trivial statistics and affine terms (fresh BNs are identities)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.6 - 0.3)


def rel_l2(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture
def narrow_cfg():
    from parnet_cpu.models.parnet import ParNetConfig

    return ParNetConfig(**NARROW)


@pytest.fixture
def narrow_model(narrow_cfg):
    from parnet_cpu.models.parnet import build_model

    model = build_model(narrow_cfg)
    randomize_bn(model)
    return model


@pytest.fixture(scope="module")
def own_lease_namespace(tmp_path_factory):
    """A module's own core-lease namespace (leases are machine-wide): nothing another module left running
    can make its runtimes fail. Servers and workers the module starts inherit the variable."""
    old = os.environ.get("PARNET_CPU_LEASE_DIR")
    os.environ["PARNET_CPU_LEASE_DIR"] = str(tmp_path_factory.mktemp("leases"))
    yield
    if old is None:
        os.environ.pop("PARNET_CPU_LEASE_DIR", None)
    else:
        os.environ["PARNET_CPU_LEASE_DIR"] = old


def narrow_parnet(seed: int = 0):
    """The narrow ParNet-S (every block type) with seeded random weights and BN statistics."""
    import torch

    from parnet_cpu.models.parnet import create_model

    torch.manual_seed(seed)
    model = create_model("parnet_s", **NARROW)
    randomize_bn(model)
    return model


def export_narrow(folder, seed: int = 0):
    """`narrow_parnet` exported as an FP32 model folder: what most runtime, serving and lease tests run on."""
    from parnet_cpu.export import export_model_dir

    return export_model_dir(narrow_parnet(seed), folder)


@pytest.fixture(scope="session")
def narrow_master(tmp_path_factory) -> Path:
    """`export_narrow`'s folder, exported once per session (an export costs seconds; a copy, milliseconds).
    Never handed to a test: tests get their own copy from `narrow_copy`, so one that writes a cache, edits
    the manifest or deletes a file changes nothing another test sees."""
    return export_narrow(tmp_path_factory.mktemp("narrow-master") / "narrow")


def copier(master: Path):
    """`copy(folder)`: a fresh copy of `master` at `folder` (which must not exist)."""

    def copy(folder) -> Path:
        return Path(shutil.copytree(master, folder))

    return copy


@pytest.fixture(scope="session")
def narrow_int8_master(narrow_master, tmp_path_factory) -> Path:
    """`narrow_master`'s model as `export --onnx` then `quantize` leave it (every file a folder can hold:
    FP32 and INT8 IR, model_deploy.pt, model.onnx), built once per session. The INT8 IR is NNCF's on four
    random inputs with fast bias correction: its quantizers sit where the default options put them (full
    bias correction only refits biases, ~5x slower here); test_quantize covers the calibrated pipeline.
    Never handed to a test: `narrow_int8_copy` gives each its own copy."""
    import numpy as np

    from parnet_cpu.artifacts import ONNX_FILE, stamp_manifest
    from parnet_cpu.export import deploy_form, save_ir, to_onnx
    from parnet_cpu.quantization.openvino_backend import quantize_ir
    from parnet_cpu.quantization.ptq import QuantizeOptions
    from parnet_cpu.system.openvino_core import core

    # export --onnx is the FP32 export plus the ONNX file: the session's FP32 folder (same model, same seed)
    # with the ONNX written beside it, then stamped as export stamps it
    out = Path(shutil.copytree(narrow_master, tmp_path_factory.mktemp("narrow-int8-master") / "narrow"))
    to_onnx(deploy_form(narrow_parnet()), out / ONNX_FILE)
    calib = [np.random.default_rng(i).standard_normal((1, 3, 64, 64), dtype=np.float32) for i in range(4)]
    fp32 = core().read_model(str(out / "model_fp32.xml"))
    options = QuantizeOptions(subset_size=len(calib), progress=False, fast_bias_correction=True)
    save_ir(quantize_ir(fp32, calib, options), out / "model_int8.xml")
    stamp_manifest(out)
    return out


@pytest.fixture(scope="session")
def narrow_int8_copy(narrow_int8_master):
    """`narrow_int8_copy(folder)`: a fresh copy of the session's narrow FP32 + INT8 model folder."""
    return copier(narrow_int8_master)


@pytest.fixture(scope="session")
def narrow_copy(narrow_master):
    """`narrow_copy(folder)`: a fresh copy of the session's narrow FP32 model folder at `folder` (which must
    not exist): what a fresh `export_narrow(folder)` gives (same weights; the IR's node ids and the manifest's
    `created` differ between exports anyway)."""
    return copier(narrow_master)
