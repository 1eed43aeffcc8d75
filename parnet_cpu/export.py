"""Export the deploy form to OpenVINO IR and ONNX, and write a model folder (see `artifacts.py`).

The IR is converted from a wrapper that also returns each stage's output, so the stage boundaries
(`STAGE_TENSORS`) become named tensors inside the graph; the saved model then keeps only the logits
as output. The multi-stream runtime cuts the graph at those names, FP32 or INT8 alike.
"""
from __future__ import annotations

import platform
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from parnet_cpu.artifacts import (DEPLOY_WEIGHTS, FORMAT, INPUT_NAME, IR_FILES, MANIFEST, ONNX_FILE, OUTPUT_NAME,
                                  STAGE_TENSORS, foreign_model_dir_problem, stamp_manifest)
from parnet_cpu.outputs import atomic_output_dir, write_json, write_probe
from parnet_cpu.models.parnet import ParNet
from parnet_cpu.reparam.fuse import reparameterize


class _StagedParNet(nn.Module):
    """Returns (logits, *stage outputs) in the order of STAGE_TENSORS."""

    def __init__(self, model: ParNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        m = self.model
        s = m.forward_stem(x)
        x2 = m.forward_inits1(s)
        y1, y2, y3 = m.forward_stream1(s), m.forward_stream2(x2), m.forward_stream3(x2)
        return m.forward_tail(y1, y2, y3), s, x2, y1, y2, y3


def deploy_form(model: ParNet) -> ParNet:
    return model if model.is_deploy else reparameterize(model)


def to_openvino(model: ParNet):
    """Deploy-form ParNet -> `ov.Model` with a dynamic batch, input `input`, output `logits` and the
    stage tensors named."""
    import openvino as ov

    deploy = deploy_form(model).eval()
    c = deploy.cfg
    example = torch.zeros(1, c.in_chans, c.input_size, c.input_size)
    with torch.no_grad():
        staged = ov.convert_model(_StagedParNet(deploy), example_input=example,
                                  input=[ov.PartialShape([-1, c.in_chans, c.input_size, c.input_size])])
    staged.inputs[0].get_tensor().set_names({INPUT_NAME})
    results = staged.get_results()
    for result, name in zip(results, (OUTPUT_NAME,) + STAGE_TENSORS):
        result.input_value(0).get_tensor().set_names({name})  # name the producer's tensor: it outlives the Result
    ov_model = ov.Model([results[0]], staged.get_parameters(), f"parnet_{'_'.join(map(str, c.planes))}")
    ov_model.set_rt_info(FORMAT, ["framework", "parnet_cpu"])
    return ov_model


def save_ir(ov_model, path: Path) -> None:
    import openvino as ov

    try:
        # compress_to_fp16 defaults to True in save_model: keep fp32 weights so the IR matches torch exactly
        ov.save_model(ov_model, str(path), compress_to_fp16=False)
    except RuntimeError as exc:
        # OpenVINO hides the errno ("basic_ios::clear: iostream error") and removes its partial files: write as
        # many bytes ourselves to learn whether the place (a full disk, a quota) is the cause
        need = sum(op.get_byte_size() for op in ov_model.get_ops() if op.get_type_name() == "Constant")
        problem = write_probe(path.parent, need + (1 << 20))
        if problem is None:
            raise
        raise problem from exc


def to_onnx(model: ParNet, path: Path, opset: int = 17) -> None:
    deploy = deploy_form(model).eval()
    c = deploy.cfg
    example = torch.zeros(1, c.in_chans, c.input_size, c.input_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter needs no onnxscript
        torch.onnx.export(deploy, (example,), str(path), dynamo=False, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], opset_version=opset,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})


def manifest_for(model: ParNet, source: dict) -> dict:
    return {
        "format": FORMAT,
        "config": model.cfg.to_dict(),
        "input": INPUT_NAME,
        "output": OUTPUT_NAME,
        "stage_tensors": list(STAGE_TENSORS),
        "source": source,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "exported_with": {"torch": torch.__version__, "python": platform.python_version()},
    }


def write_fp32_artifacts(deploy: ParNet, folder: Path, source: dict) -> None:
    """FP32 IR, deploy-form torch weights (for eager baselines and ONNX) and the manifest."""
    import openvino as ov

    from parnet_cpu.models.checkpoint import save_checkpoint

    save_ir(to_openvino(deploy), folder / IR_FILES["fp32"])
    save_checkpoint(deploy, folder / DEPLOY_WEIGHTS)
    manifest = manifest_for(deploy, source)
    manifest["exported_with"]["openvino"] = ov.get_version()
    write_json(folder / MANIFEST, manifest)
    stamp_manifest(folder)  # schema version, sha256 and size of every model file written so far


def load_deploy_model(folder: str | Path) -> ParNet:
    """Rebuild the deploy-form torch module stored in a model folder."""
    from parnet_cpu.models.checkpoint import extract_state_dict, read_checkpoint
    from parnet_cpu.models.parnet import ParNetConfig, build_model

    obj = read_checkpoint(Path(folder) / DEPLOY_WEIGHTS)
    model = reparameterize(build_model(ParNetConfig.from_dict(obj["config"])))
    model.load_state_dict(extract_state_dict(obj), strict=True)
    return model.eval()


def export_model_dir(model: ParNet, out: str | Path, source: dict | None = None, onnx: bool = False,
                     overwrite: bool = False) -> Path:
    """Write the deploy form as a model folder: FP32 IR (+ ONNX) and the manifest."""
    deploy = deploy_form(model)
    with atomic_output_dir(out, overwrite=overwrite, foreign=foreign_model_dir_problem) as tmp:
        write_fp32_artifacts(deploy, tmp, source or {})
        if onnx:
            to_onnx(deploy, tmp / ONNX_FILE)
            stamp_manifest(tmp)
    return Path(out)
