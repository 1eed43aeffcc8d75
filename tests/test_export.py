"""Deploy form -> OpenVINO IR / ONNX: numerics, named stage tensors, model folder, CLI."""
from __future__ import annotations

import json

import pytest
import torch

import parnet_cpu
from conftest import NARROW, rel_l2
from parnet_cpu.artifacts import STAGE_TENSORS, ModelDir, ModelDirError
from parnet_cpu.cli import main
from parnet_cpu.export import export_model_dir
from parnet_cpu.runtime.engine import CompileOptions, compile_model, runtime_layers
from parnet_cpu.system.openvino_core import core


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from conftest import randomize_bn
    from parnet_cpu.models.parnet import ParNetConfig, build_model

    torch.manual_seed(0)
    model = build_model(ParNetConfig(**NARROW))
    randomize_bn(model)
    out = tmp_path_factory.mktemp("export") / "narrow"
    export_model_dir(model, out, source={"model": "narrow"}, onnx=True)
    return model, out


def test_openvino_fp32_matches_torch(exported):
    model, out = exported
    deploy = parnet_cpu.reparameterize(model)
    compiled = compile_model(ModelDir.open(out).ir_path("fp32"), CompileOptions(precision="fp32"))
    assert {layer["precision"] for layer in runtime_layers(compiled) if layer["type"] == "Convolution"} == {"f32"}
    for batch in (1, 4):
        x = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            ref = deploy(x).numpy()
        got = compiled(x.numpy())[0]
        assert got.shape == (batch, 1000)
        assert rel_l2(got, ref) <= 1e-5


def test_onnx_export_matches_torch(exported):
    import onnx

    model, out = exported
    onnx.checker.check_model(str(out / "model.onnx"))
    deploy = parnet_cpu.reparameterize(model)
    x = torch.randn(2, 3, 64, 64)
    got = compile_model(out / "model.onnx", CompileOptions(precision="fp32"))(x.numpy())[0]
    with torch.no_grad():
        assert rel_l2(got, deploy(x).numpy()) <= 1e-5


def test_ir_keeps_named_stage_tensors_and_manifest(exported):
    model, out = exported
    md = ModelDir.open(out)
    assert md.precisions == ["fp32"] and md.input_shape() == (3, 64, 64)
    assert tuple(md.config["planes"]) == NARROW["planes"]
    ov_model = core().read_model(str(md.ir_path("fp32")))
    names = {n for op in ov_model.get_ops() for o in op.outputs() for n in o.get_names()}
    assert set(STAGE_TENSORS) <= names
    assert [o.get_any_name() for o in ov_model.outputs] == ["logits"]
    assert ov_model.inputs[0].get_partial_shape().to_string() == "[?,3,64,64]"


def test_model_dir_errors(tmp_path, exported):
    with pytest.raises(ModelDirError, match="not a parnet-cpu model folder"):
        ModelDir.open(tmp_path)
    _, out = exported
    with pytest.raises(ModelDirError, match="no int8 model"):
        ModelDir.open(out).ir_path("int8")


@pytest.mark.slow
def test_export_cli_and_no_half_written_output(tmp_path, capsys):
    out = tmp_path / "m"
    args = ["export", "--model", "parnet_s", "--planes", "16,32,64,128", "--input-size", "64", "--out", str(out)]
    assert main(args) == 0
    assert "random weights" in capsys.readouterr().err.lower()
    assert json.loads((out / "parnet.json").read_text())["config"]["input_size"] == 64
    # refuses to overwrite silently
    assert main(args) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    # a failing export (missing checkpoint) leaves nothing behind
    bad = tmp_path / "bad"
    assert main(args[:-1] + [str(bad), "--checkpoint", str(tmp_path / "missing.pth.tar")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert not bad.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".bad")]


def test_deploy_weights_in_model_folder_rebuild_the_deploy_form(exported):
    from parnet_cpu.export import load_deploy_model

    model, out = exported
    rebuilt = load_deploy_model(out)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), parnet_cpu.reparameterize(model)(x))
