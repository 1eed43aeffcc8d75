"""The quantization backend contract and registry (`parnet_cpu/quantization/base.py`): every list of
backends (CLI choices and help, the ignored-scope policy, bench's INT8 engines) comes from the registry,
so a new backend is one `*_backend.py` module. Nothing here imports torch, NNCF or IPEX."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from parnet_cpu.quantization import base
from parnet_cpu.quantization.base import (QuantizationBackend, QuantizationError, QuantizeOptions, backend_class,
                                          backend_names, bench_engines, get_backend, register)

REPO = Path(__file__).resolve().parents[1]


def _choices(command: str) -> tuple[str, ...]:
    from parnet_cpu.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    action = next(a for a in sub.choices[command]._actions if a.dest == "backend")
    return tuple(action.choices), action.help


def test_registry_lists_the_three_backends_default_first():
    assert backend_names() == ("openvino", "torch", "ipex")
    assert backend_names()[0] == QuantizeOptions.backend
    files = {name: backend_class(name).artifact_file for name in backend_names()}
    assert files == {"openvino": "model_int8.xml", "torch": "model_int8_torch.pt2", "ipex": "model_int8_ipex.pt"}
    with pytest.raises(QuantizationError, match="unknown backend 'nope'; choose openvino, torch or ipex"):
        get_backend("nope")


def test_cli_choices_come_from_the_registry():
    for command in ("quantize", "eval"):
        assert _choices(command)[0] == backend_names()
    assert _choices("quantize")[1] == ("openvino: NNCF PTQ on the IR (default); torch: PT2E + X86InductorQuantizer "
                                       "+ torch.compile; ipex: Intel Extension for PyTorch static INT8 (needs the "
                                       "[ipex] install)")


def test_ignored_scope_policy_belongs_to_the_backend():
    ov, torch_b, ipex_b = (backend_class(n) for n in ("openvino", "torch", "ipex"))
    assert ov.resolve_ignored_scope(None) == QuantizeOptions.ignored_scope == ("se", "stem")
    assert torch_b.resolve_ignored_scope(None) == ipex_b.resolve_ignored_scope(None) == ()
    assert ov.resolve_ignored_scope(["none"]) == () and ov.resolve_ignored_scope(["se", "head"]) == ("se", "head")


def test_torch_and_ipex_reject_nncf_options_with_their_own_name():
    ipex_cls, torch_cls = backend_class("ipex"), backend_class("torch")
    assert ipex_cls.check_options is not torch_cls.check_options  # a shared helper, not a borrowed method
    ipex = object.__new__(ipex_cls)  # without __init__, which imports IPEX
    for backend, name in ((torch_cls(), "torch"), (ipex, "ipex")):
        backend.check_options(QuantizeOptions())  # the default ignored scope is not a request
        for opts in (QuantizeOptions(max_drop=1.0), QuantizeOptions(ignored_scope=("head",))):
            with pytest.raises(QuantizationError, match=f"OpenVINO/NNCF options; not available with --backend {name}"):
                backend.check_options(opts)
    get_backend("openvino").check_options(QuantizeOptions(max_drop=1.0, ignored_scope=("head",)))


def test_a_new_backend_is_one_registered_class(monkeypatch, tmp_path):
    """What a new `<name>_backend.py` gets by declaring itself: CLI choices and help, its ignored-scope
    default, the pipeline's lookup and a bench engine (once its artifact exists)."""
    backend_names()  # the real backends are discovered before the registry is swapped for a copy
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))

    @register
    class FakeBackend(QuantizationBackend):
        name = "fake"
        artifact_file = "model_int8_fake.bin"
        cli_help = "a test double"
        bench_engine = "fake-int8"

        def quantize(self, folder, deploy, calibration, opts, validation):
            (folder / self.artifact_file).write_bytes(b"")

        def compile(self, folder, precision):
            return lambda batch: [batch]

        def layer_precisions(self, compiled):
            return {"counts": {}, "layers": []}

        def versions(self):
            return {}

    assert backend_names() == ("openvino", "torch", "ipex", "fake")
    assert _choices("quantize")[0][-1] == "fake" and _choices("eval")[0][-1] == "fake"
    assert "fake: a test double" in _choices("quantize")[1]
    assert isinstance(get_backend("fake"), FakeBackend) and FakeBackend.resolve_ignored_scope(None) == ()
    assert base.quantization_engines() == ("torch-int8", "ipex-int8", "fake-int8")
    assert "fake-int8" not in bench_engines(tmp_path)
    (tmp_path / "model_int8_torch.pt2").write_bytes(b"")
    (tmp_path / "model_int8_fake.bin").write_bytes(b"")
    assert bench_engines(tmp_path) == ("torch-int8", "fake-int8")
    assert isinstance(base.backend_for_engine("fake-int8"), FakeBackend)
    with pytest.raises(ValueError, match="registered twice"):
        register(type("Other", (FakeBackend,), {}))


def test_backend_modules_import_nothing_heavy():
    code = ("import sys; from parnet_cpu.quantization.base import backend_names; backend_names(); "
            "heavy = [m for m in ('torch', 'nncf', 'openvino', 'torchao', 'intel_extension_for_pytorch') "
            "if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
