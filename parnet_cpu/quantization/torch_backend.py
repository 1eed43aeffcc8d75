"""PyTorch-native INT8: PT2E with X86InductorQuantizer (torchao), run through `torch.compile`.

This is where Intel's CPU INT8 path went after IPEX: torch.export -> prepare_pt2e -> calibrate ->
convert_pt2e; inductor with freezing lowers the q/dq patterns to oneDNN int8 kernels (VNNI/AMX where
the CPU has them). The converted program is saved with `torch.export.save`, so it reloads without the
calibration data. Each new input shape costs a `torch.compile` (seconds), so the batch dimension is
exported dynamic and compiled once with `dynamic=True` (per batch size for 1-channel models: see
`load_compiled`).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from parnet_cpu.artifacts import TORCH_INT8_FILE, ModelDir
from parnet_cpu.quantization.base import QuantizationBackend, QuantizeOptions, register, reject_nncf_options

MAX_BATCH = 1024


class TorchCallable:
    """Numpy batch in, [numpy logits] out: the same calling convention as an OpenVINO compiled model."""

    def __init__(self, module, compiled) -> None:
        self.module, self.compiled = module, compiled

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        import torch

        with torch.no_grad():
            return [self.compiled(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))).numpy()]


def _export(module, example):
    import torch

    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    return torch.export.export(module, (example,), dynamic_shapes=({0: batch},))


def quantize_pt2e(deploy, calibration, subset_size: int):
    """PT2E static INT8 (per-channel weights, per-tensor u8 activations) of the deploy form."""
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    c = deploy.cfg
    example = torch.zeros(2, c.in_chans, c.input_size, c.input_size)
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(_export(deploy.eval(), example).module(), quantizer)
    with torch.no_grad():
        for i, image in enumerate(calibration):
            if i >= subset_size:
                break
            prepared(torch.from_numpy(image))
    converted = convert_pt2e(prepared)
    return _export(converted, example)


def load_compiled(path: str | Path, dynamic: bool = True) -> TorchCallable:
    """The saved PT2E program through `torch.compile`. `dynamic=False` specializes per batch size
    (a compile per new size): needed for 1-channel inputs, where inductor's dynamic-shape conv assumes
    a channels-last output the kernel does not produce (stride assertion at batch > 1, torch 2.13)."""
    import torch
    import torch._inductor.config as inductor_config
    import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401  (registers the q/dq ops the program uses)

    inductor_config.freezing = True  # constant-fold weights so inductor picks oneDNN int8 kernels
    module = torch.export.load(str(path)).module()
    return TorchCallable(module, torch.compile(module, dynamic=dynamic))


def graph_precisions(module) -> dict:
    """Which convs/linears run quantized: a compute node fed by dequantize ops runs in int8."""
    counts: dict[str, int] = {}
    layers = []
    for node in module.graph.nodes:
        target = str(node.target)
        if node.op != "call_function" or not any(k in target for k in ("conv2d", "linear")):
            continue
        kind = "conv2d" if "conv2d" in target else "linear"
        inputs = [str(getattr(a, "target", "")) for a in node.args[:2]]
        precision = "int8" if all("dequantize" in t for t in inputs) else "fp32"
        counts[f"{kind}:{precision}"] = counts.get(f"{kind}:{precision}", 0) + 1
        layers.append({"name": node.name, "type": kind, "precision": precision})
    return {"counts": dict(sorted(counts.items())), "layers": layers,
            "source": "quantized FX graph (inductor lowers q/dq around these ops to oneDNN int8 kernels)"}


@register
class TorchBackend(QuantizationBackend):
    name = "torch"
    artifact_file = TORCH_INT8_FILE  # named in artifacts.py too: the manifest stamps it (model_files)
    cli_help = "PT2E + X86InductorQuantizer + torch.compile"
    rank = 10
    bench_engine = "torch-int8"

    def check_options(self, opts: QuantizeOptions) -> None:
        reject_nncf_options(opts, self.name)

    def quantize(self, folder: Path, deploy, calibration, opts, validation) -> None:
        import torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = quantize_pt2e(deploy, calibration, opts.subset_size)
        torch.export.save(program, str(folder / self.artifact_file))

    def compile(self, folder: Path, precision: str):
        if precision == "int8":
            in_chans = ModelDir.open(folder).input_shape()[0]
            return load_compiled(folder / self.artifact_file, dynamic=in_chans != 1)
        from parnet_cpu.export import load_deploy_model

        model = load_deploy_model(folder)
        return TorchCallable(model, model)

    def layer_precisions(self, compiled) -> dict:
        module = compiled.module
        if hasattr(module, "graph"):
            return graph_precisions(module)
        return {"counts": {"eager:fp32": 1}, "layers": []}

    def versions(self) -> dict:
        import torch
        import torchao

        return {"torch": torch.__version__, "torchao": torchao.__version__}
