"""INT8 fidelity at ParNet-S's real widths (issue 16): train (or reuse) a full-width ParNet-S on Fashion-MNIST
with the project's own trainer, then run the quantization study of `quant_quality.py` on it and on the narrow
shipped reference `parnet_fmnist`; one result entry per model.

    python benchmarks/width_fidelity.py [--workdir /work/fidelity] [--models parnet_s_fmnist,parnet_fmnist]
                                        [--checkpoint NAME=CKPT] [--test-limit N] [--calib-size 300]
                                        [--sqnr-images 200] [--threads N] [--grid core|extended] [--rows A,B]
                                        [--latency]
                                        [--merge] [--out benchmarks/results/width_fidelity.json]

Why: every quantization default was chosen on the narrow reference (planes 16/32/64/128, 374k parameters);
the failure modes that matter for PTQ of re-parameterized nets (fused kernels wider than their 3x3 branch,
activation ranges of 1280-wide fusion blocks, SE gates over wide layers) depend on widths and depths, so
they are checked at ParNet-S's widths and depths (planes 92/192/384/1280, blocks 5/6/6/1) with the
reference's data geometry (1 grey channel, 28x28 resized to 32x32, CIFAR-style stem with stride 1).

Training: `parnet-cpu train` with the arguments in `MODELS` (seeded; the run is resumable: an interrupted
run continues from WORKDIR/<name>_train.pt). The weights (~80 MB) stay in WORKDIR, out of the repository;
the result records the command, seed, wall time, history and the sha256 of the checkpoint. With
`--checkpoint NAME=CKPT` (and WORKDIR/<name>_report.json if present) an existing checkpoint is reused; a
per-epoch training checkpoint of an unfinished run gives an entry marked `training_partial`. Do not start
this script while that same training runs elsewhere (it would resume the same checkpoint a second time).

Timings: the study measures no latency unless --latency is given (then run it under /tmp/quiet.sh);
accuracy, agreement and SQNR need no quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OtherLoad, json_safe, machine_summary, set_threads  # noqa: E402
from quant_quality import (CALIB_SIZES, STUDY_NOTES, Setting, load_reference_model,  # noqa: E402
                           fmnist_samples, quantization_study, settings_grid)

from parnet_cpu.quantization.ptq import QuantizeOptions  # noqa: E402
from parnet_cpu.runtime.engine import float_leftovers  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "parnet_cpu" / "assets"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "width_fidelity.json"
DEFAULT_WORKDIR = Path("/work/fidelity")


@dataclass(frozen=True)
class ModelSpec:
    """How a model of the study is obtained: trained here with `train_args`, or shipped in the package."""

    name: str
    train_args: tuple[str, ...] = ()
    shipped_checkpoint: Path | None = None
    shipped_report: Path | None = None


# ParNet-S widths and depths, the reference's data geometry (parnet_fmnist: 1 channel, 32x32, stem stride 1,
# SiLU, its mean/std and class names). 4 epochs with bf16 autocast fit ~1 h on 2 shared cores (measured:
# 1.35 s per 128-image step in bf16 vs 2.2-3.7 s in fp32, 2 threads); short warmup and EMA horizon suit 4 epochs.
FULL_WIDTH_TRAIN_ARGS = ("--data", "fmnist", "--model", "parnet_fmnist", "--planes", "92,192,384,1280",
                         "--blocks", "5,6,6,1", "--epochs", "4", "--batch-size", "128", "--lr", "0.1",
                         "--warmup-epochs", "0.5", "--ema-decay", "0.998", "--bf16", "--seed", "0")
MODELS = {
    "parnet_s_fmnist": ModelSpec("parnet_s_fmnist", train_args=FULL_WIDTH_TRAIN_ARGS),
    "parnet_fmnist": ModelSpec("parnet_fmnist", shipped_checkpoint=ASSETS / "parnet_fmnist.pt",
                               shipped_report=ASSETS / "parnet_fmnist.json"),
}


def artifact_paths(workdir: Path, name: str) -> dict[str, Path]:
    """Where a trained model's files live: resumable training checkpoint, slim export, training report."""
    return {"train": workdir / f"{name}_train.pt", "export": workdir / f"{name}.pt",
            "report": workdir / f"{name}_report.json"}


def train_command(spec: ModelSpec, workdir: Path, threads: int | None = None, resume: bool = False,
                  extra: Sequence[str] = ()) -> list[str]:
    """The exact `parnet-cpu train` command for `spec` (with --resume when a partial run exists)."""
    if not spec.train_args:
        raise ValueError(f"{spec.name} is shipped, not trained here")
    paths = artifact_paths(workdir, spec.name)
    cmd = ["parnet-cpu", "train", *spec.train_args, *extra, "--quiet", "--out", str(paths["train"]),
           "--export", str(paths["export"]), "--report", str(paths["report"])]
    if threads:
        cmd += ["--threads", str(threads)]
    return cmd + (["--resume"] if resume else [])


def ensure_trained(spec: ModelSpec, workdir: Path, threads: int | None, extra: Sequence[str] = ()) -> tuple[Path, dict]:
    """(checkpoint, training report): shipped, already trained in `workdir`, or trained now (resuming a
    partial run). Training runs as a subprocess so its report records the real command line."""
    if spec.shipped_checkpoint is not None:
        return spec.shipped_checkpoint, json.loads(spec.shipped_report.read_text()) if spec.shipped_report else {}
    paths = artifact_paths(workdir, spec.name)
    if not (paths["export"].is_file() and paths["report"].is_file()):
        workdir.mkdir(parents=True, exist_ok=True)
        cmd = train_command(spec, workdir, threads, resume=paths["train"].is_file(), extra=extra)
        print("training:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return paths["export"], json.loads(paths["report"].read_text())


def best_row(rows: Sequence[dict]) -> dict:
    """The grid row that follows FP32 most closely: fewest changed predictions, then highest logit SQNR."""
    return min(rows, key=lambda r: (r["prediction_flips"], -r["logit_sqnr_db"]))


def training_summary(report: dict, checkpoint: Path) -> dict:
    """What a reader needs to reproduce the training run, from `parnet-cpu train --report`; without a
    report (a run still in progress: its per-epoch checkpoint), the checkpoint's own record, marked partial."""
    from parnet_cpu.outputs import sha256_file
    from parnet_cpu.models.checkpoint import read_checkpoint

    keep = ("command", "seed", "epochs", "training_wall_seconds", "total_wall_seconds", "resumed", "machine",
            "data", "history", "train_config")
    out = {k: report.get(k) for k in keep}
    if not report:
        obj = read_checkpoint(checkpoint)
        ts = obj.get("train_state") or {}
        history = ts.get("history") or obj.get("history") or []
        out.update(partial=True, epochs_done=obj.get("epoch"), history=history,
                   train_config=ts.get("train_config") or obj.get("train_config"),
                   training_wall_seconds=round(sum(h.get("seconds", 0.0) for h in history), 1) or None)
    return {**out, "checkpoint_file": str(checkpoint), "checkpoint_bytes": checkpoint.stat().st_size,
            "checkpoint_sha256": sha256_file(checkpoint)}


def model_entry(name: str, study: dict, training: dict, config: dict, machine: dict, default: QuantizeOptions,
                default_leftovers: str | None) -> dict:
    """One entry of the result: the headline fields of issue 16, then the full study."""
    rows = study["grid"]
    d, best = rows[0], best_row(rows)
    return {
        "model": name, "config": config, "params": study["params"],
        "fp32_top1": study["fp32"]["top1"], "int8_top1": d["int8_top1"], "int8_top1_drop": d["top1_drop"],
        "agreement": d["top1_agreement"], "prediction_flips": d["prediction_flips"],
        "logit_sqnr_db": d["logit_sqnr_db"], "test_images": study["test_images"],
        "per_block_sqnr": {r["block"]: r["sqnr_db"] for r in study["per_block_sqnr"]["rows"]},
        "chosen_defaults": {**asdict(default), "float_leftovers": float_leftovers("int8", default_leftovers)},
        "best_setting": {"name": best["name"], "settings": best["settings"], "int8_top1": best["int8_top1"],
                         "agreement": best["top1_agreement"], "prediction_flips": best["prediction_flips"],
                         "logit_sqnr_db": best["logit_sqnr_db"]},
        "training_seconds": training.get("training_wall_seconds"), "training_partial": bool(training.get("partial")),
        "training": training, "machine": machine,
        "study": study,
    }


def compare_settings(entries: Sequence[dict]) -> list[dict]:
    """Settings present in every model's grid, ranked by the worst model's changed predictions (as a
    fraction of its test images): a default must hold for the narrow and the full-width model alike."""
    by_name: dict[str, list[dict]] = {}
    for e in entries:
        for r in e["study"]["grid"]:
            by_name.setdefault(r["name"], []).append({"model": e["model"], "flips": r["prediction_flips"],
                                                      "agreement": r["top1_agreement"],
                                                      "logit_sqnr_db": r["logit_sqnr_db"],
                                                      "top1_drop": r["top1_drop"], "images": e["test_images"]})
    rows = [{"setting": k, "worst_agreement": min(v["agreement"] for v in vs),
             "worst_logit_sqnr_db": min(v["logit_sqnr_db"] for v in vs), "per_model": vs}
            for k, vs in by_name.items() if len(vs) == len(entries)]
    return sorted(rows, key=lambda r: (-r["worst_agreement"], -r["worst_logit_sqnr_db"]))


def select_rows(grid: list[Setting], rows: str | None) -> list[Setting]:
    """`grid` restricted to the named rows (all without `rows`); the default row always comes first."""
    if not rows:
        return grid
    wanted = {"default", *rows.split(",")}
    unknown = wanted - {s.name for s in grid}
    if unknown:
        raise SystemExit(f"--rows: unknown {sorted(unknown)}; rows: {', '.join(s.name for s in grid)}")
    return [s for s in grid if s.name in wanted]


def parse_checkpoints(items: Sequence[str]) -> dict[str, Path]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or name not in MODELS:
            raise SystemExit(f"--checkpoint wants NAME=PATH with NAME in {', '.join(MODELS)}, got {item!r}")
        out[name] = Path(path)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="weights, training logs and data (not committed)")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--checkpoint", action="append", default=[], metavar="NAME=CKPT", help="reuse a checkpoint")
    ap.add_argument("--test-limit", type=int, help="first N test images (default: all 10,000)")
    ap.add_argument("--calib-size", type=int, default=QuantizeOptions.subset_size)
    ap.add_argument("--sqnr-images", type=int, default=200)
    ap.add_argument("--threads", type=int, help="training/OpenVINO threads (default: usable cores)")
    ap.add_argument("--grid", choices=("core", "extended"), default="core",
                    help="core: the project's options (default); extended: also NNCF's SmoothQuant/model_type rows")
    ap.add_argument("--rows", help="only these grid rows (comma-separated names; `default` always runs first): "
                                   "the full-width PTQ takes minutes per row")
    ap.add_argument("--latency", action="store_true", help="also time batch-1 latency (run under /tmp/quiet.sh)")
    ap.add_argument("--train-extra", default="", help="extra `parnet-cpu train` arguments (tests: tiny runs)")
    ap.add_argument("--merge", action="store_true", help="keep the other models' entries of an existing --out")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"unknown models {unknown}; known: {', '.join(MODELS)}")
    reuse = parse_checkpoints(args.checkpoint)

    t_start = time.perf_counter()
    threads = set_threads(args.threads)
    default = QuantizeOptions(subset_size=args.calib_size, progress=False)
    leftovers = os.environ.get("PARNET_CPU_INT8_LEFTOVERS")
    entries = []
    with OtherLoad() as load:
        calib, test = fmnist_samples(args.workdir / "data", max(CALIB_SIZES + (args.calib_size,)), args.test_limit)
        for name in names:
            spec = MODELS[name]
            if name in reuse:
                ckpt_path = reuse[name]
                report_path = artifact_paths(args.workdir, name)["report"]
                report = json.loads(report_path.read_text()) if report_path.is_file() else {}
            else:
                ckpt_path, report = ensure_trained(spec, args.workdir, threads, args.train_extra.split())
            model, ckpt = load_reference_model(ckpt_path, None)
            print(f"\n######## {name} ########", flush=True)
            study = quantization_study(model, ckpt, calib, test, threads, default, args.sqnr_images,
                                       extended=args.grid == "extended", latency=args.latency,
                                       grid=select_rows(settings_grid(default, args.grid == "extended"), args.rows))
            entries.append(model_entry(name, study, training_summary(report, ckpt_path), model.cfg.to_dict(),
                                       machine_summary(threads), default, leftovers))

    previous = json.loads(args.out.read_text()) if args.merge and args.out.is_file() else {}
    kept = [e for e in previous.get("models", []) if e["model"] not in names]
    all_entries = kept + entries
    import nncf

    result = {
        "benchmark": "width_fidelity",
        "command": " ".join(["python benchmarks/width_fidelity.py", *(sys.argv[1:] if argv is None else argv)]),
        "nncf": nncf.__version__,
        "other_load_during_run": load.summary(),
        "data": {"calibration": "first Fashion-MNIST training images (rows use the first subset_size)",
                 "test": f"Fashion-MNIST test images 0..{(args.test_limit or 10000) - 1}"},
        "notes": STUDY_NOTES | {"best_setting": "fewest changed predictions, then highest logit SQNR",
                                "settings_across_models": "ranked by the worst model's agreement"},
        "models": all_entries,
        "settings_across_models": compare_settings(all_entries) if len(all_entries) > 1 else [],
        "seconds_total": time.perf_counter() - t_start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(json_safe(result), indent=2, default=str) + "\n")
    print(f"\nwrote {args.out} ({result['seconds_total']:.0f} s)")
    for e in all_entries:
        b = e["best_setting"]
        print(f"{e['model']:<18} params {e['params']['training_form']:>11,}  FP32 {e['fp32_top1']:.2f}  "
              f"INT8 {e['int8_top1']:.2f}  agree {e['agreement']:.2f}  SQNR {e['logit_sqnr_db']:.2f} dB  "
              f"best: {b['name']} ({b['int8_top1']:.2f}, {b['prediction_flips']} flips)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
