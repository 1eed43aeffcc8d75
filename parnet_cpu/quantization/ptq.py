"""INT8 post-training quantization of the deploy-form IR with NNCF, and the `quantize` pipeline.

Pipeline (each phase timed in the report): reparameterize -> export FP32 IR -> read the image folder
-> split calibration / held-out -> NNCF PTQ (or accuracy-controlled PTQ) -> save INT8 IR ->
evaluate FP32 and INT8 on held-out images -> read back the precision each layer runs in -> report.
Everything is written into a temporary folder that replaces OUT only when the whole run succeeded.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from parnet_cpu.artifacts import IR_FILES, ModelDir, atomic_output_dir, check_output_dir, stamp_manifest, write_json
from parnet_cpu.data import (DecodeReport, Dataset, ImageDecodeError, PreprocessConfig, detect_layout, iter_batches,
                             load_and_preprocess, match_model_classes)
from parnet_cpu.evaluation import accuracy_summary, fidelity_summary, run_models
from parnet_cpu.runtime.engine import CompileOptions, compile_model, core, runtime_layers

# Short names for ignored-scope patterns (regexes on OpenVINO node names of the exported IR).
IGNORED_SCOPE_ALIASES = {
    "se": r".*\.se\.conv/.*",  # the Skip-Squeeze-Excitation gate convs
    "stem": r".*\.inits\.0\.0\.conv/.*",  # the very first conv (3 input channels)
    "head": r".*\.head\.fc/.*",  # the classifier
    "fusion": r".*\.(downsamples_2\.1|combine)\.\d\.conv/.*",  # the grouped fusion convs
}


LEGACY_IGNORED_SCOPE = ("se", "stem")  # the default before issue 14 (`quantize --legacy-defaults`)


class QuantizationError(RuntimeError):
    """Quantization cannot proceed (bad data, labels that do not fit the model, ...)."""


@dataclass(frozen=True)
class QuantizeOptions:
    """Defaults chosen from benchmarks/quant_quality.py on the shipped Fashion-MNIST ParNet (10,000 test
    images): keeping the SE gate convs and the stem conv in float plus full bias correction raised
    INT8-vs-FP32 logit SQNR from 19.2 to 24.4 dB and cut changed predictions from 83 to 47 at ~0.02 ms;
    preset mixed beat performance in combination; 300 images matched 1000; SmoothQuant does not apply
    to CNNs in NNCF (it needs model_type=transformer, which was worse).
    Issue 14 (benchmarks/matrix_unit.py, ParNet-S batch 8, AVX-512 VNNI): quantizing the stem too gave
    no speed over running the float leftovers in bf16 (the compile-time default now, see
    `runtime.engine.float_leftovers`) and cost ~0.1 pt on Fashion-MNIST, so the scope stays."""

    subset_size: int = 300
    preset: str = "mixed"
    fast_bias_correction: bool = False
    ignored_scope: tuple[str, ...] = ("se", "stem")
    max_drop: float | None = None  # top-1 percentage points; enables accuracy-controlled PTQ
    backend: str = "openvino"  # openvino (NNCF) | torch (PT2E + X86InductorQuantizer) | ipex
    eval_limit: int | None = 5000  # held-out images evaluated (None: all)
    batch_size: int = 32
    seed: int = 0
    num_workers: int | None = None
    progress: bool = True


def ignored_scope_patterns(items: Sequence[str]) -> list[str]:
    return [IGNORED_SCOPE_ALIASES.get(item, item) for item in items]


class ImageStream:
    """Re-iterable stream of single preprocessed images (or (image, label) pairs) for NNCF, which may
    take several passes; never holds the set in memory. Undecodable files are recorded once, by path."""

    def __init__(self, samples: Sequence, pcfg: PreprocessConfig, num_workers: int | None = None,
                 with_labels: bool = False) -> None:
        self.samples, self.pcfg, self.num_workers, self.with_labels = list(samples), pcfg, num_workers, with_labels
        self.failures: dict[str, str] = {}
        self.decoded = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator:
        report = DecodeReport()
        try:  # NNCF may stop consuming early: record what was seen either way
            for batch in iter_batches(self.samples, self.pcfg, 16, self.num_workers, report=report):
                if self.with_labels:
                    yield from ((img[None], int(lab)) for img, lab in zip(batch.images, batch.labels))
                else:
                    yield from (img[None] for img in batch.images)
        finally:
            self.failures.update(dict(report.failures))
            self.decoded = max(self.decoded, report.decoded)


def top1_validation(compiled, items) -> tuple[float, list[float]]:
    """NNCF accuracy-control callback: top-1 (fraction) of a compiled model on (image, label) items."""
    hits = [float(np.asarray(compiled(image)[0]).argmax() == label) for image, label in items]
    return (float(np.mean(hits)) if hits else 0.0), hits


@contextmanager
def _nncf_verbosity(progress: bool):
    """Without progress: NNCF's info logs and its progress bars (drawn on rich's global console) off."""
    import nncf
    import rich

    logger, console = logging.getLogger("nncf"), rich.get_console()
    old_level, old_quiet = logger.level, console.quiet
    if not progress:
        nncf.set_log_level(logging.ERROR)
        console.quiet = True
    try:
        yield
    finally:
        logger.setLevel(old_level)
        console.quiet = old_quiet


def quantize_ir(fp32_model, calibration: ImageStream, opts: QuantizeOptions, validation: ImageStream | None = None):
    """NNCF PTQ of an OpenVINO model; with `validation` and `opts.max_drop`, accuracy-controlled."""
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
                max_drop=opts.max_drop / 100.0, drop_type=nncf.DropType.ABSOLUTE, **kwargs)
        return nncf.quantize(fp32_model, dataset, **kwargs)


def layer_precision_summary(compiled) -> dict:
    """Counts of (layer type, precision, kernel) for compute layers, plus the per-layer list."""
    layers = [l for l in runtime_layers(compiled) if l["type"] not in ("Const", "Input", "Output", "Reshape")]
    counts: dict[str, int] = {}
    for l in layers:
        key = f"{l['type']}:{l['precision']}:{l['kernel']}"
        counts[key] = counts.get(key, 0) + 1
    return {"counts": dict(sorted(counts.items())), "layers": layers}


class OpenVinoBackend:
    """NNCF PTQ of the FP32 IR; runs on OpenVINO (VNNI/AMX kernels chosen by its CPU plugin)."""

    name = "openvino"

    def check_options(self, opts: QuantizeOptions) -> None:
        """Every NNCF option applies."""

    def quantize(self, folder: Path, deploy, calibration: ImageStream, opts: QuantizeOptions,
                 validation: ImageStream | None) -> None:
        from parnet_cpu.export import save_ir

        int8 = quantize_ir(core().read_model(str(folder / IR_FILES["fp32"])), calibration, opts, validation)
        save_ir(int8, folder / IR_FILES["int8"])

    def compile(self, folder: Path, precision: str):
        return compile_model(ModelDir.open(folder).ir_path(precision), CompileOptions(precision=precision))

    def layer_precisions(self, compiled) -> dict:
        return layer_precision_summary(compiled)

    def versions(self) -> dict:
        import nncf
        import openvino as ov

        return {"openvino": ov.get_version(), "nncf": nncf.__version__}


def get_backend(name: str):
    if name == "openvino":
        return OpenVinoBackend()
    if name == "torch":
        from parnet_cpu.quantization.torch_backend import TorchBackend

        return TorchBackend()
    if name == "ipex":
        from parnet_cpu.quantization.ipex_backend import IpexBackend

        return IpexBackend()
    raise QuantizationError(f"unknown backend {name!r}; choose openvino, torch or ipex")


def check_labels_fit(ds: Dataset, num_classes: int) -> None:
    if ds.has_labels and ds.num_classes is not None and ds.num_classes > num_classes:
        raise QuantizationError(f"the data has {ds.num_classes} classes ({ds.label_space}) but the model predicts "
                                f"{num_classes}: labels cannot be evaluated against this model")
    too_big = [lab for _, lab in ds.samples if lab is not None and lab >= num_classes]
    if too_big:
        raise QuantizationError(f"{len(too_big)} labels are >= the model's {num_classes} classes")


def check_calibration_decodes(samples: Sequence, pcfg: PreprocessConfig) -> None:
    """Decode calibration images until one works, so that a folder of nothing but undecodable files is a
    clear error before NNCF runs (NNCF's own error on an empty data set names none of the files)."""
    failures: list[str] = []
    for path, _ in samples:
        try:
            load_and_preprocess(path, pcfg)
            return
        except ImageDecodeError as exc:
            failures.append(f"{path}: {exc.reason}")
    raise QuantizationError(f"no calibration image could be decoded ({len(failures)} tried):\n  "
                            + "\n  ".join(failures[:10]) + ("\n  ..." if len(failures) > 10 else ""))


@dataclass
class Phases:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t0, 3)


def quantize_to_dir(model, source: dict, calib_dir: str | Path, out: str | Path, opts: QuantizeOptions = QuantizeOptions(),
                    overwrite: bool = False, log=print) -> dict:
    """The whole `parnet-cpu quantize` job; returns the report (also written to OUT/report.json)."""
    from parnet_cpu.export import write_fp32_artifacts
    from parnet_cpu.reparam.fuse import reparameterize

    inputs = {"--calib": calib_dir}
    check_output_dir(out, overwrite, inputs)  # before any work: never replace what this tool did not write
    backend = get_backend(opts.backend)  # fails early (e.g. IPEX not installed) before any work
    backend.check_options(opts)
    phases = Phases()
    planned = ModelDir(Path(out), {"config": model.cfg.to_dict()})  # class names and preprocessing, before writing
    with phases("read_data"):
        ds = match_model_classes(detect_layout(calib_dir), planned.class_names)
        check_labels_fit(ds, model.cfg.num_classes)
        calib, holdout = ds.split(opts.subset_size, seed=opts.seed)
        if opts.eval_limit is not None:
            holdout = holdout.with_samples(holdout.samples[: opts.eval_limit])
    log(f"data: {ds.summary()}; {len(calib)} for calibration, {len(holdout)} held out for evaluation")
    if len(calib) < opts.subset_size:
        log(f"warning: only {len(calib)} images for calibration (asked for {opts.subset_size})")

    check_calibration_decodes(calib.samples, planned.preprocess_config())
    with phases("reparameterize"):
        deploy = reparameterize(model)
    with atomic_output_dir(out, overwrite=overwrite, inputs=inputs) as tmp:
        with phases("export_fp32"):
            write_fp32_artifacts(deploy, tmp, source)
        md = ModelDir.open(tmp)
        pcfg = md.preprocess_config()
        calibration = ImageStream(calib.samples, pcfg, opts.num_workers)
        validation = None
        if opts.max_drop is not None:
            if not ds.has_labels or not len(holdout):
                raise QuantizationError("--max-drop needs labelled images beyond the calibration subset")
            validation = ImageStream(holdout.samples, pcfg, opts.num_workers, with_labels=True)
        with phases("quantize"):
            backend.quantize(tmp, deploy, calibration, opts, validation)
        stamp_manifest(tmp)  # the INT8 files join the manifest's digests
        if calibration.decoded == 0:
            raise QuantizationError(f"none of the {len(calib)} calibration images could be decoded")

        with phases("compile"):
            fp32_c = backend.compile(tmp, "fp32")
            int8_c = backend.compile(tmp, "int8")
        evaluation = None
        if len(holdout):
            with phases("evaluate"):
                outs = run_models({"fp32": fp32_c, "int8": int8_c}, holdout.samples, pcfg, opts.batch_size,
                                  opts.num_workers, progress=opts.progress, desc="evaluate fp32+int8")
            evaluation = {"held_out_images": len(outs.paths), "skipped": outs.report.failures,
                          "fp32": accuracy_summary(outs.logits["fp32"], outs.labels, md.class_names),
                          "int8": accuracy_summary(outs.logits["int8"], outs.labels, md.class_names),
                          "int8_vs_fp32": fidelity_summary(outs.logits["fp32"], outs.logits["int8"], outs.labels)}
        report = {
            "model": source.get("model"), "config": model.cfg.to_dict(),
            "checkpoint": source.get("checkpoint"), "random_weights": source.get("checkpoint") is None,
            "data": {"root": str(ds.root), "layout": ds.layout, "images": len(ds), "labelled": ds.has_labels,
                     "label_space": ds.label_space, "label_mapping": ds.label_mapping, "notes": ds.notes,
                     "skipped_files": ds.skipped_files},
            "calibration": {"requested": opts.subset_size, "images": len(calib), "decoded": calibration.decoded,
                            "skipped": sorted(calibration.failures.items()),
                            "files": [str(p) for p, _ in calib.samples]},
            "options": asdict(opts) | {"ignored_scope_patterns": ignored_scope_patterns(opts.ignored_scope)},
            "evaluation": evaluation,
            "backend": backend.name,
            "runtime_precision": {"int8": backend.layer_precisions(int8_c),
                                  "fp32": backend.layer_precisions(fp32_c)["counts"]},
            "seconds": phases.seconds,
            "versions": backend.versions(),
        }
        if backend.name == "openvino":  # where the INT8 time goes, and the float-leftover precision used
            from parnet_cpu.runtime.profile import profile_model

            report["profile"] = profile_model(tmp, "int8", batch=1, iters=5)
        write_json(tmp / "report.json", report)
    return report
