"""How INT8 post-training quantization (NNCF PTQ on the OpenVINO IR) affects ParNet accuracy, to choose
the project's default `QuantizeOptions`.

    python benchmarks/quant_quality.py [--checkpoint parnet_cpu/assets/parnet_fmnist.pt] [--config-json CFG.json]
                                       [--test-limit 10000] [--calib-size 300] [--sqnr-images 200]
                                       [--threads N] [--data-dir DIR] [--out benchmarks/results/quant_quality.json]

Reference model: ParNet trained on Fashion-MNIST (the config is read from the checkpoint's `config`
entry, or from --config-json, else the registered `parnet_fmnist`). Data: the Fashion-MNIST IDX files
(`apt-get install dataset-fashion-mnist`), exported to PNG folders with `parnet-cpu dataset export-idx`;
calibration = the first N *training* images, evaluation = the first --test-limit *test* images.

Three parts (QARepVGG, arXiv 2212.01593: folding the branches of a RepVGG-style block can widen weight
ranges and hurt PTQ):

1. weight ranges before/after fusion: per block, per-output-channel max|w| of the 3x3 branch (BN folded),
   of the 1x1 branch (BN folded) and of the fused 3x3 kernel; max over channels, max/median over
   channels (what hurts per-tensor quantization), and the SQNR of an int8 round trip of the weights
   (per-channel, as NNCF does on CPU, and per-tensor); plus the ranges of the identity-BN / two-input
   BN scales and shifts (kept as per-channel affines, not folded).
2. per-block SQNR of FP32 IR vs INT8 IR (default options) on --sqnr-images test images: every block's
   activation output is added as an extra model output (matched by friendly name between the two IRs).
3. settings grid: one factor at a time around the `QuantizeOptions` defaults (preset, bias correction,
   ignored scope (stem and SE gates quantized or not), precision of the float leftovers at compile time
   (f32 / bf16), SmoothQuant / model_type, calibration size), plus the combinations of the changes that
   raised the logit SQNR; each row: FP32 / INT8 top-1, agreement, logit SQNR, flips, PTQ wall time, INT8 batch-1 latency.

The three parts are `quantization_study`, which benchmarks/width_fidelity.py runs on the full-width model too.

Quantization goes through `parnet_cpu.quantization.openvino_backend.quantize_ir`; the NNCF arguments that
`QuantizeOptions` cannot express (model_type, advanced SmoothQuant parameters) are added to that same
`nncf.quantize` call (see `nncf_extra_arguments`). Prints tables and writes the JSON (--out).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (OtherLoad, json_safe, kernel_counts, machine_summary, other_busy_processes, print_table,  # noqa: E402
                    set_threads, time_callable)

from parnet_cpu.data import detect_layout, iter_batches, list_images  # noqa: E402
from parnet_cpu.data.fmnist import prepare_fmnist  # noqa: E402
from parnet_cpu.evaluation import accuracy_summary, fidelity_summary, run_models, sqnr_db  # noqa: E402
from parnet_cpu.models.checkpoint import load_checkpoint, read_checkpoint  # noqa: E402
from parnet_cpu.models.parnet import (DualBN, ParNet, ParNetBlock, ParNetConfig, bn_scale_shift, build_model,  # noqa: E402
                                      fuse_conv_bn, resolve_config)
from parnet_cpu.quantization.base import ignored_scope_patterns  # noqa: E402
from parnet_cpu.quantization.openvino_backend import quantize_ir  # noqa: E402
from parnet_cpu.quantization.ptq import ImageStream, QuantizeOptions  # noqa: E402
from parnet_cpu.runtime.engine import CompileOptions, compile_model, float_leftovers  # noqa: E402
from parnet_cpu.system.openvino_core import core  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = REPO / "parnet_cpu" / "assets" / "parnet_fmnist.pt"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "quant_quality.json"
CALIB_SIZES = (100, 300, 1000)
# batch-1 latency: at least 20 timed calls and at least 0.5 s (one call takes ~0.3 ms: 20 calls alone are
# ~6 ms of measurement, whose median moves with any scheduler hiccup)
LATENCY = {"warmup": 5, "iters": 20, "min_seconds": 0.5}


# --------------------------------------------------------------------------------------------
# model and data


def load_reference_model(checkpoint: Path, config_json: Path | None) -> tuple[ParNet, dict]:
    """Training-form ParNet with the checkpoint's weights; config from --config-json, the checkpoint's
    `config` entry, or the registered `parnet_fmnist`, in that order."""
    obj = read_checkpoint(checkpoint)
    if config_json is not None:
        cfg, origin = ParNetConfig.from_dict(json.loads(Path(config_json).read_text())), str(config_json)
    elif obj.get("config"):
        cfg, origin = ParNetConfig.from_dict(obj["config"]), "checkpoint"
    else:
        cfg, origin = resolve_config("parnet_fmnist"), "registry: parnet_fmnist"
    model = build_model(cfg)
    info = load_checkpoint(model, checkpoint)
    info.update(config_from=origin, epoch=obj.get("epoch"), metric=obj.get("metric"))
    return model.eval(), info


def fmnist_samples(root: Path, calib_max: int, test_limit: int | None) -> tuple[list[Path], list]:
    """The first `calib_max` training images (paths, in dataset order) and the first `test_limit` labelled
    test samples, from the folders `parnet_cpu.data.fmnist.prepare_fmnist` writes once under `root`."""
    calib_dir, test_dir = prepare_fmnist(root, calib_max, test_limit)
    calib = list_images(calib_dir)  # names are zero-padded dataset indices: sorted = dataset order
    return calib, detect_layout(test_dir).samples


# --------------------------------------------------------------------------------------------
# 1. weight ranges before / after fusion


def channel_stats(w: torch.Tensor) -> dict[str, float]:
    """Per-output-channel max|w| statistics and the SQNR (dB) of a symmetric int8 round trip of `w`,
    per channel (NNCF's CPU weight quantization) and per tensor."""
    w = w.detach().double().flatten(1)
    r = w.abs().amax(1)
    med = float(r.median())

    def roundtrip_sqnr(scale: torch.Tensor) -> float:
        q = torch.clamp(torch.round(w / scale), -127, 127) * scale
        return sqnr_db(w.numpy(), q.numpy())

    return {"max_abs": float(r.max()), "median_channel_range": med, "min_channel_range": float(r.min()),
            "max_over_median": float(r.max()) / med if med > 0 else math.inf,
            "int8_sqnr_per_channel_db": roundtrip_sqnr(torch.clamp(r, min=1e-12)[:, None] / 127),
            "int8_sqnr_per_tensor_db": roundtrip_sqnr(torch.clamp(r.max(), min=1e-12) / 127)}


def affine_stats(bn: torch.nn.BatchNorm2d) -> dict[str, float]:
    """Range of an eval-mode BN seen as y = x*scale + shift."""
    scale, shift = (t.detach() for t in bn_scale_shift(bn))
    a = scale.abs()
    return {"scale_min": float(scale.min()), "scale_max": float(scale.max()), "abs_scale_max_over_median":
            float(a.max() / a.median()), "shift_min": float(shift.min()), "shift_max": float(shift.max())}


@torch.no_grad()
def weight_ranges(model: ParNet) -> dict[str, list[dict]]:
    """Part 1: per block, the dense (3x3+BN), pointwise (1x1+BN) and fused 3x3 kernel statistics;
    and the per-channel affines that stay unfused (identity BN, two-input BNs)."""
    blocks, affines = [], []
    for name, mod in model.named_modules():
        if isinstance(mod, ParNetBlock):
            dense = channel_stats(fuse_conv_bn(mod.dense.conv, mod.dense.bn)[0])
            point = channel_stats(fuse_conv_bn(mod.pointwise.conv, mod.pointwise.bn)[0])
            fused = channel_stats(mod.reparameterize().conv.weight)
            blocks.append({"block": name, "in": mod.in_ch, "out": mod.out_ch, "stride": mod.stride, "groups": mod.groups,
                           "dense": dense, "pointwise": point, "fused": fused,
                           "max_abs_growth": fused["max_abs"] / dense["max_abs"],
                           "spread_growth": fused["max_over_median"] / dense["max_over_median"],
                           "int8_sqnr_per_channel_change_db": fused["int8_sqnr_per_channel_db"]
                           - dense["int8_sqnr_per_channel_db"]})
            if mod.identity_bn is not None:
                affines.append({"affine": f"{name}.identity_bn", **affine_stats(mod.identity_bn)})
        elif isinstance(mod, DualBN):
            affines += [{"affine": f"{name}.{k}", **affine_stats(getattr(mod, k))} for k in ("b1", "b2")]
    return {"blocks": blocks, "affines": affines}


# --------------------------------------------------------------------------------------------
# 2. per-block SQNR


ACTIVATION_TYPES = ("Relu", "Swish")


def block_output_names(ov_model) -> list[str]:
    """Friendly names of the blocks' activation nodes (`<block>.act/...`), in graph order."""
    return [op.get_friendly_name() for op in ov_model.get_ordered_ops()
            if op.get_type_name() in ACTIVATION_TYPES and ".act/" in op.get_friendly_name()]


def with_extra_outputs(ov_model, names: Sequence[str]):
    """A copy of `ov_model` whose outputs are the logits followed by the nodes `names` (by friendly name)."""
    import openvino as ov
    import openvino.opset13 as ops

    by_name = {op.get_friendly_name(): op for op in ov_model.get_ordered_ops()}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise KeyError(f"nodes not found in {ov_model.get_friendly_name()}: {missing[:3]}")
    extra = [ops.result(by_name[n].output(0)) for n in names]
    return ov.Model(list(ov_model.get_results()) + extra, ov_model.get_parameters(), ov_model.get_friendly_name())


def per_block_sqnr(fp32_ir: Path, int8_model, samples: Sequence, pcfg, threads: int,
                   leftovers: str | None = None) -> dict:
    """Part 2: SQNR (dB) of every block output and of the logits, INT8 vs FP32, on `samples`; plus the
    logit SQNR of the unmodified INT8 graph on the same images (the extra outputs may change fusions).
    `leftovers`: precision of the ops the INT8 IR keeps in float (None: the project default)."""
    fp32_model = core().read_model(str(fp32_ir))
    names = block_output_names(fp32_model)
    compiled = {p: compile_model(with_extra_outputs(m, names),
                                 CompileOptions(precision=p, num_threads=threads,
                                                leftovers=leftovers if p == "int8" else None))
                for p, m in (("fp32", fp32_model), ("int8", int8_model))}
    compiled["int8_plain"] = compile_model(int8_model, CompileOptions(precision="int8", num_threads=threads,
                                                                      leftovers=leftovers))
    outs: dict[str, list[list[np.ndarray]]] = {p: [[] for _ in range(len(names) + 1)] for p in compiled}
    for batch in iter_batches(samples, pcfg, 50):
        for p, c in compiled.items():
            res = c(batch.images)
            for k in range(len(res)):
                outs[p][k].append(np.asarray(res[k]))
    cat = {p: [np.concatenate(o) for o in per if o] for p, per in outs.items()}
    rows = []
    for k, name in enumerate(["logits"] + names):
        ref, test = cat["fp32"][k], cat["int8"][k]
        block = name.split("/")[0].removeprefix("__module.model.").removesuffix(".act")
        rows.append({"node": name, "block": block, "sqnr_db": sqnr_db(ref, test), "fp32_abs_max": float(np.abs(ref).max())})
    return {"images": int(len(cat["fp32"][0])), "rows": rows[1:] + rows[:1],  # blocks in graph order, then logits
            "logits_sqnr_db_plain_int8_graph": sqnr_db(cat["fp32"][0], cat["int8_plain"][0]),
            "logits_sqnr_db_plain_vs_extra_outputs": sqnr_db(cat["int8_plain"][0], cat["int8"][0])}


# --------------------------------------------------------------------------------------------
# 3. settings grid


@dataclass(frozen=True)
class Setting:
    """One grid row: project options plus the NNCF arguments `QuantizeOptions` has no field for."""

    name: str
    opts: QuantizeOptions
    model_type: str | None = None  # None (NNCF default, CNN patterns) | "transformer"
    smooth_quant: float | None = None  # SmoothQuant alpha for convolutions and matmuls (-1: off); None: not passed
    varies: str = "baseline"
    leftovers: str | None = None  # compile: precision of the ops left in float (None: project default, "auto")

    def describe(self) -> dict:
        o = self.opts
        return {"preset": o.preset, "fast_bias_correction": o.fast_bias_correction,
                "ignored_scope": list(o.ignored_scope), "ignored_scope_patterns": ignored_scope_patterns(o.ignored_scope),
                "subset_size": o.subset_size, "model_type": self.model_type, "smooth_quant_alpha": self.smooth_quant,
                "float_leftovers": float_leftovers("int8", self.leftovers), "target_device": "CPU",
                "varies": self.varies}


SCOPES = ((), ("se",), ("stem",), ("se", "stem"), ("se", "stem", "head"))
LEFTOVERS = ("f32", "bf16")


def settings_grid(default: QuantizeOptions, extended: bool = True) -> list[Setting]:
    """One factor at a time around `default` (the combination rows are added after these ran). Without
    `extended`, the NNCF-only rows (SmoothQuant, model_type) are left out: they never helped a CNN here."""
    other = "performance" if default.preset == "mixed" else "mixed"
    rows = [Setting("default", default),
            Setting(f"preset={other}", replace(default, preset=other), varies="preset"),
            Setting(f"bias_correction={'full' if default.fast_bias_correction else 'fast'}",
                    replace(default, fast_bias_correction=not default.fast_bias_correction), varies="bias_correction")]
    for scope in SCOPES:
        if set(scope) != set(default.ignored_scope):
            rows.append(Setting(f"ignore={'+'.join(scope) or 'none'}", replace(default, ignored_scope=scope),
                                varies="ignored_scope"))
    rows += [Setting(f"leftovers={p}", default, varies="leftovers", leftovers=p)
             for p in LEFTOVERS if p != float_leftovers("int8")]
    if not extended:
        return rows + [Setting(f"calib={n}", replace(default, subset_size=n), varies="subset_size")
                       for n in CALIB_SIZES if n != default.subset_size]
    # SmoothQuant: NNCF runs it only for model_type=transformer, so that is tried with SmoothQuant off
    # (alpha -1) as the control, then on; with the default model_type the alpha is expected to be ignored.
    rows += [Setting("smooth_quant=0.5", default, smooth_quant=0.5, varies="smooth_quant"),
             Setting("model_type=transformer,sq=off", default, model_type="transformer", smooth_quant=-1.0,
                     varies="model_type")]
    rows += [Setting(f"model_type=transformer,sq={a}", default, model_type="transformer", smooth_quant=a,
                     varies="smooth_quant") for a in (0.15, 0.5)]
    rows += [Setting(f"calib={n}", replace(default, subset_size=n), varies="subset_size")
             for n in CALIB_SIZES if n != default.subset_size]
    return rows


@contextlib.contextmanager
def nncf_extra_arguments(setting: Setting) -> Iterator[None]:
    """Add `model_type` / `advanced_parameters` to the `nncf.quantize` call that `quantize_ir` makes."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    extra: dict[str, Any] = {}
    if setting.model_type is not None:
        extra["model_type"] = nncf.ModelType(setting.model_type)
    if setting.smooth_quant is not None:
        a = setting.smooth_quant
        extra["advanced_parameters"] = AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(convolution=a, matmul=a))
    if not extra:
        yield
        return
    original = nncf.quantize
    nncf.quantize = lambda *args, **kwargs: original(*args, **kwargs, **extra)
    try:
        yield
    finally:
        nncf.quantize = original


def graph_counts(ov_model) -> dict[str, int]:
    """Activation FakeQuantize nodes (weights are either FakeQuantize on a constant or, in transformer
    mode, compressed constants) and SmoothQuant scale nodes of an IR."""
    ops = ov_model.get_ordered_ops()
    fq = [op for op in ops if op.get_type_name() == "FakeQuantize"]
    return {"activation_fake_quantize": sum(op.input_value(0).get_node().get_type_name() != "Constant" for op in fq),
            "weight_fake_quantize": sum(op.input_value(0).get_node().get_type_name() == "Constant" for op in fq),
            "smooth_quant_scales": sum(op.get_type_name() == "Multiply"
                                       and op.get_friendly_name().endswith("nncf_smooth_quant") for op in ops)}


@dataclass
class Context:
    fp32_ir: Path
    calib: list[Path]
    test: list
    pcfg: Any
    threads: int
    fp32_logits: np.ndarray
    labels: np.ndarray
    class_names: Sequence[str] | None
    latency_input: np.ndarray | None  # None: no latency measurement (accuracy-only runs)
    int8_models: dict[str, Any] = field(default_factory=dict)


def run_setting(s: Setting, ctx: Context) -> dict:
    """Quantize with `s`, evaluate on the test set, time batch-1 INT8 latency."""
    calibration = ImageStream([(p, None) for p in ctx.calib[: s.opts.subset_size]], ctx.pcfg)
    fp32_model = core().read_model(str(ctx.fp32_ir))  # fresh copy: NNCF must not see a model it already touched
    t0 = time.perf_counter()
    with nncf_extra_arguments(s):
        int8_model = quantize_ir(fp32_model, calibration, s.opts)
    quant_s = time.perf_counter() - t0
    if s.name == "default":  # part 2 needs it; full-width INT8 models are large, so keep no others
        ctx.int8_models[s.name] = int8_model
    compiled = compile_model(int8_model, CompileOptions(precision="int8", num_threads=ctx.threads,
                                                        leftovers=s.leftovers))
    outs = run_models({"int8": compiled}, ctx.test, ctx.pcfg, 100)
    int8 = accuracy_summary(outs.logits["int8"], outs.labels, ctx.class_names)
    fid = fidelity_summary(ctx.fp32_logits, outs.logits["int8"], outs.labels)
    fp32_top1 = accuracy_summary(ctx.fp32_logits, ctx.labels)["top1"]
    lat = (time_callable(lambda: compiled(ctx.latency_input), **LATENCY) if ctx.latency_input is not None
           else {"p50": None, "mean": None, "iters": 0})
    return {"name": s.name, "settings": s.describe(), "calibration_images": calibration.decoded,
            "fp32_top1": fp32_top1, "int8_top1": int8["top1"], "top1_drop": fp32_top1 - int8["top1"],
            "top1_agreement": fid["top1_agreement"], "logit_sqnr_db": fid["sqnr_db"],
            "prediction_flips": fid["prediction_flips"], "fixed_by_int8": fid.get("fixed_by_test"),
            "broken_by_int8": fid.get("broken_by_test"), "quantize_seconds": quant_s,
            "int8_latency_ms_p50": lat["p50"], "int8_latency_ms_mean": lat["mean"], "latency_iters": lat["iters"],
            "graph": graph_counts(int8_model), "kernels": kernel_counts(compiled),
            "int8_per_class_top1": {r["name"]: r["top1"] for r in int8["per_class"]}}


PROJECT_FACTORS = ("preset", "bias_correction", "ignored_scope", "subset_size", "leftovers")


def _apply(base: Setting, s: Setting) -> Setting:
    """`base` with the one project option that `s` varies taken from `s`."""
    if s.varies == "leftovers":
        return replace(base, leftovers=s.leftovers)
    o = base.opts
    if s.varies == "preset":
        o = replace(o, preset=s.opts.preset)
    elif s.varies == "bias_correction":
        o = replace(o, fast_bias_correction=s.opts.fast_bias_correction)
    elif s.varies == "ignored_scope":
        o = replace(o, ignored_scope=s.opts.ignored_scope)
    else:
        o = replace(o, subset_size=s.opts.subset_size)
    return replace(base, opts=o)


def combination_settings(rows: list[dict], grid: list[Setting], default: QuantizeOptions,
                         min_gain_db: float = 0.2) -> list[Setting]:
    """Combinations of the promising single-factor changes: per project option, the change that raised the
    logit SQNR most (by at least `min_gain_db` over the default row); every subset of two or more of them."""
    from itertools import combinations

    base = rows[0]["logit_sqnr_db"]
    best: dict[str, tuple[float, Setting]] = {}
    for s, r in zip(grid, rows):
        if s.varies in PROJECT_FACTORS and r["logit_sqnr_db"] >= base + min_gain_db:
            if s.varies not in best or r["logit_sqnr_db"] > best[s.varies][0]:
                best[s.varies] = (r["logit_sqnr_db"], s)
    picks = [s for _, s in best.values()]
    out = []
    for k in range(2, len(picks) + 1):
        for combo in combinations(picks, k):
            setting = Setting(" & ".join(s.name for s in combo), default, varies="combination")
            for s in combo:
                setting = _apply(setting, s)
            out.append(setting)
    return out


# --------------------------------------------------------------------------------------------


def _progress_line(r: dict) -> None:
    print(f"  {r['name']:<44} int8 top-1 {r['int8_top1']:.2f}  agree {r['top1_agreement']:.2f}  "
          f"SQNR {r['logit_sqnr_db']:.2f} dB  PTQ {r['quantize_seconds']:.1f} s", flush=True)


def quantization_study(model: ParNet, ckpt: dict, calib: list[Path], test: list, threads: int,
                       default: QuantizeOptions, sqnr_images: int = 200, extended: bool = True,
                       latency: bool = True, grid: list[Setting] | None = None) -> dict:
    """Parts 1-3 on one model: weight ranges, settings grid (with combinations), per-block SQNR.

    Returns the JSON-ready pieces (`fp32`, `weight_ranges`, `per_block_sqnr`, `grid`, `params`). `latency`
    off skips every timing (accuracy-only runs need no quiet machine)."""
    from parnet_cpu.artifacts import IR_FILES, ModelDir
    from parnet_cpu.export import write_fp32_artifacts
    from parnet_cpu.models.parnet import count_parameters
    from parnet_cpu.reparam.fuse import reparameterize

    grid = list(grid) if grid is not None else settings_grid(default, extended)
    print(f"model: {ckpt.get('path')} (epoch {ckpt.get('epoch')}), config {model.cfg.planes}/{model.cfg.num_blocks} "
          f"{model.cfg.activation}; {len(calib)} calibration images, {len(test)} test images; {threads} threads")
    print("\n== 1. weight ranges before/after fusion (per output channel) ==")
    ranges = weight_ranges(model)
    print_table([{"block": b["block"], "dense max": b["dense"]["max_abs"], "1x1 max": b["pointwise"]["max_abs"],
                  "fused max": b["fused"]["max_abs"], "growth": b["max_abs_growth"],
                  "dense max/med": b["dense"]["max_over_median"], "fused max/med": b["fused"]["max_over_median"],
                  "w8 SQNR dense": b["dense"]["int8_sqnr_per_channel_db"],
                  "w8 SQNR fused": b["fused"]["int8_sqnr_per_channel_db"],
                  "w8/tensor fused": b["fused"]["int8_sqnr_per_tensor_db"]} for b in ranges["blocks"]],
                ["block", "dense max", "1x1 max", "fused max", "growth", "dense max/med", "fused max/med",
                 "w8 SQNR dense", "w8 SQNR fused", "w8/tensor fused"])
    print()
    print_table(ranges["affines"], ["affine", "scale_min", "scale_max", "abs_scale_max_over_median",
                                     "shift_min", "shift_max"])

    with tempfile.TemporaryDirectory(prefix="quant_study_") as tmp:
        tmp = Path(tmp)
        deploy = reparameterize(model)
        params = {"training_form": count_parameters(model), "deployed": count_parameters(deploy)}
        write_fp32_artifacts(deploy, tmp, {"model": "quant_quality", "checkpoint": ckpt})
        md = ModelDir.open(tmp)
        fp32_ir, pcfg = tmp / IR_FILES["fp32"], md.preprocess_config()
        fp32_c = compile_model(fp32_ir, CompileOptions(precision="fp32", num_threads=threads))
        base = run_models({"fp32": fp32_c}, test, pcfg, 100)
        latency_input = next(iter(iter_batches(test[:1], pcfg, 1))).images if latency else None
        fp32_lat = (time_callable(lambda: fp32_c(latency_input), **LATENCY) if latency
                    else {"p50": None, "mean": None})
        ctx = Context(fp32_ir, calib, test, pcfg, threads, base.logits["fp32"], base.labels, md.class_names,
                      latency_input)
        fp32_top1 = accuracy_summary(base.logits["fp32"], base.labels)["top1"]
        print(f"\nFP32 IR: top-1 {fp32_top1:.2f} % on {len(base.paths)} test images"
              + (f", batch-1 p50 {fp32_lat['p50']:.3f} ms" if latency else ""))

        print("\nrunning the settings grid (part 3; tables below)")
        rows: list[dict] = []
        for s in grid:
            rows.append(run_setting(s, ctx))
            _progress_line(rows[-1])
        for combo in combination_settings(rows, grid, default):
            grid.append(combo)
            rows.append(run_setting(combo, ctx))
            _progress_line(rows[-1])

        print("\n== 2. per-block SQNR, INT8 (default options) vs FP32 ==")
        block_sqnr = per_block_sqnr(fp32_ir, ctx.int8_models["default"], test[:sqnr_images], pcfg, threads,
                                    grid[0].leftovers)
        print_table(block_sqnr["rows"], ["block", "sqnr_db", "fp32_abs_max"])
        print(f"(logits of the unmodified INT8 graph on the same {block_sqnr['images']} images: "
              f"{block_sqnr['logits_sqnr_db_plain_int8_graph']:.2f} dB)")

    print("\n== 3. settings grid (test set: %d images; FP32 top-1 %.2f %%) ==" % (len(base.paths), fp32_top1))
    print_table([{"setting": r["name"], "int8 top1": r["int8_top1"], "drop": r["top1_drop"],
                  "agree %": r["top1_agreement"], "SQNR dB": r["logit_sqnr_db"], "flips": r["prediction_flips"],
                  "PTQ s": r["quantize_seconds"], "p50 ms": r["int8_latency_ms_p50"],
                  "act FQ": r["graph"]["activation_fake_quantize"], "SQ scales": r["graph"]["smooth_quant_scales"],
                  "f32 convs": sum(v for k, v in r["kernels"].items() if ":f32:" in k)} for r in rows],
                ["setting", "int8 top1", "drop", "agree %", "SQNR dB", "flips", "PTQ s", "p50 ms", "act FQ",
                 "SQ scales", "f32 convs"])
    return {"params": params, "test_images": len(base.paths),
            "fp32": {"top1": fp32_top1, "latency_ms_p50": fp32_lat["p50"], "latency_ms_mean": fp32_lat["mean"]},
            "weight_ranges": ranges, "per_block_sqnr": block_sqnr, "grid": rows}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="training-form checkpoint (default: shipped)")
    ap.add_argument("--config-json", type=Path, help="ParNetConfig as JSON (default: the checkpoint's `config`)")
    ap.add_argument("--test-limit", type=int, default=None, help="first N test images (default: all 10,000)")
    ap.add_argument("--calib-size", type=int, default=300, help="calibration images of the grid rows (default 300)")
    ap.add_argument("--sqnr-images", type=int, default=200, help="test images for the per-block SQNR (default 200)")
    ap.add_argument("--threads", type=int, default=None, help="torch/OpenVINO threads (default: usable cores)")
    ap.add_argument("--data-dir", type=Path, help="keep the exported PNG folders here and reuse them (default: temporary)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"result JSON (default {DEFAULT_OUT.relative_to(REPO)})")
    args = ap.parse_args(argv)
    if not args.checkpoint.is_file():
        ap.error(f"checkpoint not found: {args.checkpoint} (train one with `parnet-cpu train` or pass --checkpoint)")

    t_start = time.perf_counter()
    threads = set_threads(args.threads)
    busy = other_busy_processes()
    if busy:
        print("WARNING: other busy processes (latencies and PTQ times are suspect): " + ", ".join(busy))
    model, ckpt = load_reference_model(args.checkpoint, args.config_json)
    default = QuantizeOptions(subset_size=args.calib_size, progress=False)
    calib_max = max(CALIB_SIZES + (args.calib_size,))

    with tempfile.TemporaryDirectory(prefix="quant_quality_") as tmp, OtherLoad() as load:
        calib, test = fmnist_samples(args.data_dir or Path(tmp) / "data", calib_max, args.test_limit)
        study = quantization_study(model, ckpt, calib, test, threads, default, args.sqnr_images)

    import nncf

    rows = study["grid"]
    sq_row = next(r for r in rows if r["name"] == "smooth_quant=0.5")
    sq_note = ("NNCF 3.4 runs SmoothQuant only for model_type=TRANSFORMER (post_training/pipeline.py); with the "
               "default model_type the alpha is ignored" + (" (the INT8 IR has no SmoothQuant nodes)."
                                                            if sq_row["graph"]["smooth_quant_scales"] == 0 else "."))
    result = {
        "benchmark": "quant_quality",
        "command": " ".join(["python benchmarks/quant_quality.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine_summary(threads) | {"nncf": nncf.__version__},
        "other_busy_processes_at_start": busy,
        "other_load_during_run": load.summary(),
        "model": {"checkpoint": ckpt, "config": model.cfg.to_dict()},
        "data": {"calibration": f"first {calib_max} Fashion-MNIST training images (rows use the first subset_size)",
                 "test_images": study["test_images"], "sqnr_images": min(args.sqnr_images, len(test))},
        "quantize_options_default": asdict(default),
        "fp32": study["fp32"],
        "notes": STUDY_NOTES | {"smooth_quant": sq_note,
                                "latency": f"OpenVINO batch 1, {threads} threads, LATENCY hint, 5 warm-up calls, "
                                           "then >= 20 timed calls and >= 0.5 s"},
        "weight_ranges": study["weight_ranges"],
        "per_block_sqnr": study["per_block_sqnr"],
        "grid": rows,
        "seconds_total": time.perf_counter() - t_start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(json_safe(result), indent=2, default=str) + "\n")
    print(f"\nwrote {args.out} ({result['seconds_total']:.0f} s)")
    return 0


STUDY_NOTES = {
    "quantize_seconds": "quantize_ir wall time, calibration decoding included",
    "float_leftovers": "precision OpenVINO gives the ops the INT8 IR keeps in float (SE gates, stem when ignored, "
                       "pooling, elementwise): the compile's INFERENCE_PRECISION_HINT, see engine.float_leftovers",
    "per_block_sqnr": "extra Results on each block's activation output; they keep that tensor "
                      "materialized, so OpenVINO's fusions around it may differ from the deployed graph",
    "weight_int8_sqnr": "symmetric int8 round trip of the weights alone (levels -127..127)",
    "top1_noise": "paired comparison on the same images: INT8 and FP32 top-1 can only differ through "
                  "prediction_flips (fixed_by_int8 - broken_by_int8), so top-1 differences of a few "
                  "0.01-0.1 pp between rows are noise; agreement, flips and logit SQNR are the "
                  "sharper fidelity measures"}


if __name__ == "__main__":
    raise SystemExit(main())
