"""OpenVINO + NNCF INT8 (the default backend): NNCF post-training quantization of the FP32 IR.

NNCF PTQ (or accuracy-controlled PTQ with `--max-drop`) on the deploy-form IR the pipeline exported,
saved as the INT8 IR; it runs on OpenVINO's CPU plugin (VNNI/AMX kernels where the CPU has them).
Its ignored-scope policy (SE gate convs and stem conv in float by default) is declared here.
OpenVINO and NNCF are imported inside the functions, so this module is cheap to import.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from parnet_cpu.artifacts import IR_FILES, ModelDir
from parnet_cpu.quantization.base import QuantizationBackend, QuantizeOptions, ignored_scope_patterns, register

def top1_validation(compiled, items) -> tuple[float, list[float]]:
    """NNCF accuracy-control callback: top-1 (fraction) of a compiled model on (image, label) items."""
    hits = [float(np.asarray(compiled(image)[0]).argmax() == label) for image, label in items]
    return (float(np.mean(hits)) if hits else 0.0), hits


@contextmanager
def _nncf_verbosity(progress: bool):
    """NNCF's INFO lines (one per layer it leaves alone) are never shown: the progress view is its bars.
    Without progress the bars (drawn on rich's global console) are off too."""
    import nncf
    import rich

    logger, console = logging.getLogger("nncf"), rich.get_console()
    old_level, old_quiet = logger.level, console.quiet
    nncf.set_log_level(logging.WARNING if progress else logging.ERROR)
    if not progress:
        console.quiet = True
    try:
        yield
    finally:
        logger.setLevel(old_level)
        console.quiet = old_quiet


def quantize_ir(fp32_model, calibration, opts: QuantizeOptions, validation=None):
    """NNCF PTQ of an OpenVINO model on a re-iterable image stream (`ptq.ImageStream`); with `validation`
    ((image, label) stream) and `opts.max_drop`, accuracy-controlled."""
    import nncf

    kwargs = dict(preset=nncf.QuantizationPreset(opts.preset), subset_size=min(opts.subset_size, len(calibration)),
                  fast_bias_correction=opts.fast_bias_correction, target_device=nncf.TargetDevice.CPU)
    if opts.ignored_scope:
        kwargs["ignored_scope"] = nncf.IgnoredScope(patterns=ignored_scope_patterns(opts.ignored_scope), validate=False)
    dataset = nncf.Dataset(calibration)
    with _nncf_verbosity(opts.progress):
        if opts.max_drop is not None and validation:
            return nncf.quantize_with_accuracy_control(
                fp32_model, dataset, nncf.Dataset(validation), top1_validation,
                max_drop=opts.max_drop, drop_type=nncf.DropType.ABSOLUTE, **kwargs)  # both a fraction
        return nncf.quantize(fp32_model, dataset, **kwargs)


def layer_precision_summary(compiled) -> dict:
    """Counts of (layer type, precision, kernel) for compute layers, plus the per-layer list."""
    from parnet_cpu.runtime.engine import runtime_layers

    layers = [l for l in runtime_layers(compiled) if l["type"] not in ("Const", "Input", "Output", "Reshape")]
    counts: dict[str, int] = {}
    for l in layers:
        key = f"{l['type']}:{l['precision']}:{l['kernel']}"
        counts[key] = counts.get(key, 0) + 1
    return {"counts": dict(sorted(counts.items())), "layers": layers}


@register
class OpenVinoBackend(QuantizationBackend):
    """NNCF PTQ of the FP32 IR; runs on OpenVINO (VNNI/AMX kernels chosen by its CPU plugin)."""

    name = "openvino"
    artifact_file = IR_FILES["int8"]
    cli_help = "NNCF PTQ on the IR"
    rank = 0
    bench_engine = None  # its INT8 IR runs in bench's OpenVINO engines and the multi-stream runtime
    default_ignored_scope = QuantizeOptions.ignored_scope

    def check_options(self, opts: QuantizeOptions) -> None:
        """Every NNCF option applies."""

    def quantize(self, folder: Path, deploy, calibration, opts: QuantizeOptions, validation) -> None:
        from parnet_cpu.export import save_ir
        from parnet_cpu.system.openvino_core import core

        int8 = quantize_ir(core().read_model(str(folder / IR_FILES["fp32"])), calibration, opts, validation)
        save_ir(int8, folder / self.artifact_file)

    def compile(self, folder: Path, precision: str):
        from parnet_cpu.runtime.engine import CompileOptions, compile_model

        return compile_model(ModelDir.open(folder).ir_path(precision), CompileOptions(precision=precision))

    def layer_precisions(self, compiled) -> dict:
        return layer_precision_summary(compiled)

    def versions(self) -> dict:
        import nncf
        import openvino as ov

        return {"openvino": ov.get_version(), "nncf": nncf.__version__}

    def report_extras(self, folder: Path) -> dict:
        """Where the INT8 time goes, and the float-leftover precision used."""
        from parnet_cpu.perf.profile import profile_model

        return {"profile": profile_model(folder, "int8", batch=1, iters=5)}
