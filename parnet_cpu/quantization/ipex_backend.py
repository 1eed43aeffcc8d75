"""Intel Extension for PyTorch static INT8 (optional; for users still on torch 2.8).

IPEX stopped development after 2.8 and needs torch 2.8 exactly, which conflicts with the default
install: it lives in its own environment (`scripts/ipex_env.sh`, `pip install parnet-cpu[ipex]`).
Path: `ipex.quantization.prepare` with the default static qconfig -> calibrate -> `convert` ->
`torch.jit.trace` + `torch.jit.freeze`, saved as a TorchScript archive (no pickle).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from parnet_cpu.quantization.base import (QuantizationBackend, QuantizationError, QuantizeOptions, module_available,
                                          register, reject_nncf_options)

IPEX_INT8_FILE = "model_int8_ipex.pt"
INSTALL_HINT = ("Intel Extension for PyTorch is not installed in this environment. It needs torch 2.8: "
                "create a separate environment with `bash scripts/ipex_env.sh` (or "
                "`pip install torch==2.8.0 intel-extension-for-pytorch==2.8.0 intel-openmp` in a fresh venv, "
                "then `pip install -e .`) and run parnet-cpu from there")


def import_ipex():
    try:
        import intel_extension_for_pytorch as ipex
    except Exception as exc:  # ImportError, or IPEX's own version check against the installed torch
        raise QuantizationError(f"{INSTALL_HINT} ({type(exc).__name__}: {exc})") from None
    return ipex


class JitCallable:
    """Numpy batch in, [numpy logits] out, like an OpenVINO compiled model."""

    def __init__(self, module, example=None) -> None:
        self.module, self.example = module, example

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        import torch

        with torch.no_grad():
            return [self.module(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))).numpy()]


@register
class IpexBackend(QuantizationBackend):
    name = "ipex"
    artifact_file = IPEX_INT8_FILE
    cli_help = "Intel Extension for PyTorch static INT8 (needs the [ipex] install)"
    rank = 20
    bench_engine = "ipex-int8"

    def __init__(self) -> None:
        self.ipex = import_ipex()

    @classmethod
    def available(cls) -> bool:
        return module_available("intel_extension_for_pytorch")

    def check_options(self, opts: QuantizeOptions) -> None:
        reject_nncf_options(opts, self.name)

    def quantize(self, folder: Path, deploy, calibration, opts, validation) -> None:
        import torch

        ipex = self.ipex
        c = deploy.cfg
        example = torch.zeros(1, c.in_chans, c.input_size, c.input_size)
        prepared = ipex.quantization.prepare(deploy.eval(), ipex.quantization.default_static_qconfig_mapping,
                                             example_inputs=example, inplace=False)
        with torch.no_grad():
            for i, image in enumerate(calibration):
                if i >= opts.subset_size:
                    break
                prepared(torch.from_numpy(image))
            converted = ipex.quantization.convert(prepared)
            traced = torch.jit.freeze(torch.jit.trace(converted, example))
        torch.jit.save(traced, str(folder / self.artifact_file))

    def compile(self, folder: Path, precision: str):
        import torch

        if precision == "int8":
            module = torch.jit.freeze(torch.jit.load(str(folder / self.artifact_file)).eval())
        else:
            from parnet_cpu.export import load_deploy_model

            module = self.ipex.optimize(load_deploy_model(folder), dtype=torch.float32)
        x = torch.zeros(1, *module_input_shape(folder))
        with torch.no_grad():  # two warm-up runs let the JIT fuse the int8 graph
            module(x), module(x)
        return JitCallable(module, x)

    def layer_precisions(self, compiled) -> dict:
        """Node kinds of the optimized TorchScript graph: int8 convs appear as oneDNN Graph (LLGA)
        fusion groups between quantize/dequantize nodes."""
        import torch

        if not isinstance(compiled.module, torch.jit.ScriptModule):
            return {"counts": {"ipex.optimize:fp32": 1}, "layers": [], "source": "eager module (ipex.optimize)"}
        graph = compiled.module.graph
        if compiled.example is not None and hasattr(compiled.module, "graph_for"):
            with torch.no_grad():
                graph = compiled.module.graph_for(compiled.example)
        counts: dict[str, int] = {}
        for node in graph.nodes():
            kind = node.kind()
            if any(k in kind.lower() for k in ("conv", "linear", "quant", "llga", "ipex")):
                counts[kind] = counts.get(kind, 0) + 1
        return {"counts": dict(sorted(counts.items())), "layers": [], "source": "optimized TorchScript graph"}

    def versions(self) -> dict:
        import torch

        return {"torch": torch.__version__, "ipex": self.ipex.__version__}


def module_input_shape(folder: Path) -> tuple[int, int, int]:
    from parnet_cpu.artifacts import ModelDir

    return ModelDir.open(folder).input_shape()
