"""The `quantize` pipeline, on top of the backends (`base.py` holds the contract and the registry).

Pipeline (each phase timed in the report): reparameterize -> export FP32 IR -> read the image folder
-> split calibration / held-out -> the backend's PTQ (OpenVINO + NNCF by default, `--backend`) -> its
INT8 artifact -> evaluate FP32 and INT8 on held-out images -> read back the precision each layer runs
in -> report. Everything is written into a temporary folder that replaces OUT only when the whole run
succeeded. The pipeline reaches backends only by name, through the registry (`get_backend`).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from parnet_cpu.artifacts import ModelDir, foreign_model_dir_problem, stamp_manifest
from parnet_cpu.outputs import atomic_output_dir, check_output_dir, report_stamp, write_json
from parnet_cpu.data import (DecodeReport, Dataset, ImageDecodeError, PreprocessConfig, detect_layout, iter_batches,
                             load_and_preprocess, match_model_classes)
from parnet_cpu.evaluation import accuracy_summary, fidelity_summary, run_models
from parnet_cpu.quantization.base import (QuantizationError, QuantizeOptions, get_backend, ignored_scope_patterns,
                                          max_drop_units)

# the options and the error of quantize_to_dir's signature are part of this module's API; the NNCF functions
# (quantize_ir, top1_validation, layer_precision_summary) are openvino_backend's, the registry is base's
__all__ = ["ImageStream", "Phases", "QuantizationError", "QuantizeOptions", "check_calibration_decodes",
           "check_labels_fit", "quantize_to_dir"]


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


def quantize_to_dir(model, source: dict, calib_dir: str | Path, out: str | Path,
                    opts: QuantizeOptions = QuantizeOptions(),  # noqa: B008 (frozen dataclass)
                    overwrite: bool = False, log=print, label_file: str | Path | None = None) -> dict:
    """The whole `parnet-cpu quantize` job; returns the report (also written to OUT/report.json).
    `label_file`: labels kept outside `calib_dir` (Kaggle CSV, devkit ground truth, Caffe val.txt)."""
    from parnet_cpu.export import write_fp32_artifacts
    from parnet_cpu.reparam.fuse import reparameterize

    inputs = {"--calib": calib_dir, "--labels": label_file}
    # before any work: never replace what this tool did not write
    check_output_dir(out, overwrite, inputs, foreign=foreign_model_dir_problem)
    backend = get_backend(opts.backend)  # fails early (e.g. IPEX not installed) before any work
    backend.check_options(opts)
    phases = Phases()
    planned = ModelDir(Path(out), {"config": model.cfg.to_dict()})  # class names and preprocessing, before writing
    with phases("read_data"):
        ds = match_model_classes(detect_layout(calib_dir, label_file=label_file), planned.class_names)
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
    with atomic_output_dir(out, overwrite=overwrite, inputs=inputs, foreign=foreign_model_dir_problem) as tmp:
        with phases("export_fp32"):
            write_fp32_artifacts(deploy, tmp, source)
        md = ModelDir.open(tmp)
        pcfg = md.preprocess_config()
        calibration = ImageStream(calib.samples, pcfg, opts.num_workers)
        validation = None
        if opts.max_drop is not None:
            if not ds.has_labels or not len(holdout):
                raise QuantizationError("max_drop (--max-drop-points or --max-drop-fraction) needs labelled images beyond the calibration "
                                        "subset")
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
            **report_stamp("quantize"), "warnings": report_warnings(source),
            "model": source.get("model"), "config": model.cfg.to_dict(),
            "checkpoint": source.get("checkpoint"), "random_weights": source.get("checkpoint") is None,
            "data": {"root": str(ds.root), "layout": ds.layout, "images": len(ds), "labelled": ds.has_labels,
                     "label_space": ds.label_space, "label_mapping": ds.label_mapping, "notes": ds.notes,
                     "skipped_files": ds.skipped_files},
            "calibration": {"requested": opts.subset_size, "images": len(calib), "decoded": calibration.decoded,
                            "skipped": sorted(calibration.failures.items()),
                            "files": [str(p) for p, _ in calib.samples]},
            "options": asdict(opts) | {"ignored_scope_patterns": ignored_scope_patterns(opts.ignored_scope),
                                       **max_drop_units(opts.max_drop)},
            "evaluation": evaluation,
            "backend": backend.name,
            "runtime_precision": {"int8": backend.layer_precisions(int8_c),
                                  "fp32": backend.layer_precisions(fp32_c)["counts"]},
            "seconds": phases.seconds,
            "versions": backend.versions(),
        }
        report.update(backend.report_extras(tmp))  # OpenVINO: "profile" (where the INT8 time goes)
        write_json(tmp / "report.json", report)
    return report


RANDOM_WEIGHTS_WARNING = ("random weights (no checkpoint given): speed figures are valid, accuracy figures mean "
                          "nothing; pass the authors' checkpoint with --checkpoint parnet_s.pth.tar (Python: "
                          "create_model(name, checkpoint=...))")


def report_warnings(source: dict) -> list[str]:
    """What a reader of report.json must know before trusting its figures."""
    return [RANDOM_WEIGHTS_WARNING] if source.get("checkpoint") is None else []
