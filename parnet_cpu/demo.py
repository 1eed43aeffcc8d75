"""`parnet-cpu demo`: the main job end to end on the embedded default.

With Fashion-MNIST installed (Debian package `dataset-fashion-mnist`): the shipped reference model
`parnet_fmnist` is reparameterized, quantized to INT8 with 300 real training images, evaluated in FP32
and INT8 on the real test images, and benchmarked (PyTorch eager, OpenVINO FP32 and INT8 single graph,
multi-stream runtime), ending in one summary table plus `demo.json` and `bench.png`.
Without the dataset it says how to get it and runs the speed half on ParNet-S with the shipped
calibration photos (random weights: no accuracy figures).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from parnet_cpu.artifacts import write_json

REPO_SAMPLE = Path(__file__).resolve().parent / "assets" / "calibration_sample"  # package data


def stream_groups_for_this_machine() -> tuple[list[list[int]] | None, str]:
    """Auto-sized groups where there are >= 3 physical cores; else overlapping single-core groups,
    said out loud (the multi-stream path still runs and is checked, but cannot be faster)."""
    from parnet_cpu.runtime.cores import available_cores

    cores = available_cores()
    if len(cores) >= 3:
        return None, f"{len(cores)} physical cores: stream groups sized by cost"
    first, last = cores[0][0], cores[-1][0]
    return [[first], [last], [first]], (f"only {len(cores)} physical core(s): the 3 stream groups overlap "
                                         "(runs, but cannot beat the single graph here)")


def prepare_fmnist(folder: Path, test_limit: int | None, log) -> tuple[Path, Path]:
    from parnet_cpu.training.idx import FASHION_MNIST_FOLDERS, load_fashion_mnist, write_image_folder

    data = load_fashion_mnist()
    calib, test = folder / "calib", folder / "test"
    if not calib.is_dir():
        write_image_folder(data["train_images"][:300], None, calib, FASHION_MNIST_FOLDERS)
    n = len(data["test_images"]) if test_limit is None else min(test_limit, len(data["test_images"]))
    if not (test / "classes.txt").is_file() or sum(1 for _ in test.rglob("*.png")) != n:
        import shutil

        shutil.rmtree(test, ignore_errors=True)
        write_image_folder(data["test_images"][:n], data["test_labels"][:n], test, FASHION_MNIST_FOLDERS)
    log(f"data: 300 calibration images (training set) and {n} test images written under {folder}")
    return calib, test


def run_demo(out: str | Path = "parnet-demo", test_limit: int | None = None, log=print) -> dict:
    from parnet_cpu.bench import BenchConfig, format_table, plot, run_bench
    from parnet_cpu.data import detect_layout
    from parnet_cpu.evaluation import accuracy_summary, fidelity_summary, run_models
    from parnet_cpu.artifacts import ModelDir
    from parnet_cpu.models.parnet import count_parameters, create_model
    from parnet_cpu.quantization.ptq import QuantizeOptions, quantize_to_dir
    from parnet_cpu.reparam.fuse import reparameterize
    from parnet_cpu.runtime.engine import CompileOptions, compile_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    summary: dict = {"machine_note": None}
    try:
        calib, test = prepare_fmnist(out / "data", test_limit, log)
        model = create_model("parnet_fmnist", pretrained=True)
        source = {"model": "parnet_fmnist", "checkpoint": {"path": "parnet_cpu/assets/parnet_fmnist.pt (shipped)"}}
        real_data = True
    except FileNotFoundError as exc:
        log(f"NOTE: {exc}\nFalling back to ParNet-S with RANDOM weights on the shipped photos: speed only.")
        calib, test = REPO_SAMPLE, None
        model = create_model("parnet_s")
        source, real_data = {"model": "parnet_s", "checkpoint": None}, False

    deploy = reparameterize(model)
    summary["model"] = {"name": source["model"], "params_train": count_parameters(model),
                        "params_deploy": count_parameters(deploy)}
    log(f"model: {source['model']}: {summary['model']['params_train']:,} parameters (training form) -> "
        f"{summary['model']['params_deploy']:,} (deploy form)")
    model_dir = out / "model"
    report = quantize_to_dir(model, source, calib, model_dir, QuantizeOptions(subset_size=300, progress=False),
                             overwrite=True, log=log)
    summary["quantize_seconds"] = report["seconds"]

    if real_data:
        md = ModelDir.open(model_dir)
        ds = detect_layout(test)
        compiled = {p: compile_model(md.ir_path(p), CompileOptions(precision=p)) for p in ("fp32", "int8")}
        outs = run_models(compiled, ds.samples, md.preprocess_config(), 64, progress=True, desc="test set fp32+int8")
        summary["accuracy"] = {p: {k: v for k, v in accuracy_summary(outs.logits[p], outs.labels, md.class_names).items()}
                               for p in ("fp32", "int8")}
        summary["int8_vs_fp32"] = fidelity_summary(outs.logits["fp32"], outs.logits["int8"], outs.labels)

    groups, note = stream_groups_for_this_machine()
    summary["machine_note"] = note
    log(f"benchmark: {note}")
    cfg = BenchConfig(batches=(1,), warmup=2, iters=15, min_seconds=0.5,
                      engines=("torch-eager", "ov-latency"))
    fp32 = run_bench(model_dir, "auto", groups, "fp32", cfg, log=lambda *a: None)
    int8 = run_bench(model_dir, "auto", groups, "int8",
                     BenchConfig(batches=(1,), warmup=2, iters=15, min_seconds=0.5,
                                 engines=("multistream", "ov-latency")), log=lambda *a: None)
    log(format_table(fp32) + "\n" + format_table(int8))
    plot([int8], out / "bench.png")
    summary["bench"] = {"fp32": fp32, "int8": int8}
    summary["seconds_total"] = time.perf_counter() - t_start
    write_json(out / "demo.json", summary)
    log("\n" + summary_table(summary))
    log(f"\nwrote {out}/demo.json, {out}/bench.png, model folder {model_dir}/")
    return summary


def summary_table(s: dict) -> str:
    rows = {(r["engine"], r["precision"]): r for part in ("fp32", "int8") for r in s["bench"][part]["rows"]
            if "error" not in r}
    base = rows.get(("ov-latency", "fp32"))
    acc = s.get("accuracy")
    lines = [f"{'':<26}{'top-1':>9}{'p50 ms':>10}{'vs OV FP32':>12}"]
    for label, key, acc_key in (("PyTorch eager FP32", ("torch-eager", "fp32"), None),
                                ("OpenVINO FP32", ("ov-latency", "fp32"), "fp32"),
                                ("OpenVINO INT8", ("ov-latency", "int8"), "int8"),
                                ("multi-stream INT8", ("multistream", "int8"), "int8")):
        r = rows.get(key)
        top1 = f"{acc[acc_key]['top1']:.2f}%" if acc and acc_key else "-"
        if r is None:
            lines.append(f"{label:<26}{top1:>9}{'error':>10}")
            continue
        speed = f"{base['median_ms'] / r['median_ms']:.2f}x" if base else "n/a"
        lines.append(f"{label:<26}{top1:>9}{r['median_ms']:>10.2f}{speed:>12}")
    if acc:
        f = s["int8_vs_fp32"]
        lines.append(f"INT8 vs FP32 on {acc['int8']['labelled']} test images: top-1 agreement {f['top1_agreement']:.2f}%, "
                     f"SQNR {f['sqnr_db']:.1f} dB, {f['prediction_flips']} predictions changed")
    lines.append(f"batch 1; {s['machine_note']}; total {s.get('seconds_total', 0):.0f} s")
    return "\n".join(lines)
