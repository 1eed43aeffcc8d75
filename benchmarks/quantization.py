"""PyTorch eager FP32 vs OpenVINO FP32 / BF16 / INT8 (NNCF PTQ) latency and throughput, plus PTQ wall time.

    python benchmarks/quantization.py [--variants parnet_s,parnet_m] [--batches 1,8] [--warmup 3] [--iters 30]
                                      [--min-seconds 2] [--calib-images 300] [--threads N]

Random weights: latency does not depend on them, but INT8 accuracy does, so nothing here says
anything about accuracy. The calibration images are real photos: random crops / flips / rescales of
the 24 shipped photos in calibration/sample (fixed seed), written to a temporary folder. The PTQ
time covers `quantize_ir` only (calibration-image decoding and preprocessing included; export not).
Writes benchmarks/results/quantization.json.
"""
from __future__ import annotations

import argparse
import math
import random
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import OtherLoad, kernel_counts, machine_summary, other_busy_processes, print_table, set_threads, time_callable, write_result
from parnet_cpu.data import PreprocessConfig, bundled_calibration_dir, list_images
from parnet_cpu.export import save_ir, to_openvino
from parnet_cpu.models.parnet import ParNetConfig, create_model
from parnet_cpu.quantization.openvino_backend import quantize_ir
from parnet_cpu.quantization.ptq import ImageStream, QuantizeOptions
from parnet_cpu.reparam.fuse import reparameterize
from parnet_cpu.runtime.engine import CompileOptions, compile_model, precision_supported
from parnet_cpu.system.openvino_core import core

PRECISION_NOTES = {
    "eager_fp32": "PyTorch eager, fp32, deploy form, torch.inference_mode",
    "ov_fp32": "OpenVINO, fp32 IR, INFERENCE_PRECISION_HINT=f32",
    "ov_bf16": "OpenVINO, same fp32 IR, INFERENCE_PRECISION_HINT=bf16",
    "ov_int8": "OpenVINO, NNCF PTQ INT8 IR (non-quantized ops f32), INFERENCE_PRECISION_HINT=f32",
}


def make_calibration_images(src: Path, out: Path, n: int, seed: int = 0) -> list[Path]:
    """`n` JPEGs made from the photos in `src`: random crop (25-100 % of the area, aspect 3:4-4:3),
    random horizontal flip, rescale to a random shorter side in 224-384 px."""
    rng = random.Random(seed)
    photos = [Image.open(p) for p in list_images(src)]
    for im in photos:
        im.load()
    paths = []
    for i in range(n):
        im = photos[i % len(photos)]
        w, h = im.size
        area = rng.uniform(0.25, 1.0) * w * h
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = min(w, round(math.sqrt(area * ratio))), min(h, round(math.sqrt(area / ratio)))
        x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
        crop = im.crop((x0, y0, x0 + cw, y0 + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        short = rng.randint(224, 384)
        scale = short / min(cw, ch)
        crop = crop.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.Resampling.BICUBIC)
        paths.append(out / f"calib_{i:04d}.jpg")
        crop.save(paths[-1], quality=90)
    return paths


def preprocess_config(cfg: ParNetConfig) -> PreprocessConfig:
    return PreprocessConfig(input_size=cfg.input_size, crop_pct=cfg.crop_pct, interpolation=cfg.interpolation,
                            mean=cfg.mean, std=cfg.std, channels=cfg.in_chans)


def summarize(t: dict, batch: int, eager: dict | None) -> dict:
    """Latency stats plus throughput and the ratios to eager FP32 (eager p50 / this p50 = speed-up)."""
    out = dict(t, throughput_ips=batch * 1e3 / t["mean"])
    if eager is not None:
        out["speedup_vs_eager_p50"] = eager["p50"] / t["p50"]
        out["throughput_ratio_vs_eager"] = out["throughput_ips"] / eager["throughput_ips"]
    return out


def bench_variant(name: str, batches: list[int], threads: int, timing: tuple[int, int, float], calib: list[Path],
                  opts: QuantizeOptions, workdir: Path) -> dict:
    """PTQ time, then per batch: eager FP32 and OpenVINO FP32 / BF16 / INT8 timings."""
    deploy = reparameterize(create_model(name))
    cfg = deploy.cfg
    ir_path = workdir / f"{name}_fp32.xml"
    save_ir(to_openvino(deploy), ir_path)
    calibration = ImageStream(calib, preprocess_config(cfg))

    t0 = time.perf_counter()
    int8_ir = quantize_ir(core().read_model(str(ir_path)), calibration, opts)
    quant_seconds = time.perf_counter() - t0
    if calibration.decoded == 0:
        raise RuntimeError("no calibration image could be decoded")

    irs = {"ov_fp32": ("fp32", core().read_model(str(ir_path))), "ov_int8": ("int8", int8_ir)}
    if precision_supported("bf16"):
        irs["ov_bf16"] = ("bf16", core().read_model(str(ir_path)))
    per_batch = []
    for b in batches:
        x = torch.randn(b, cfg.in_chans, cfg.input_size, cfg.input_size, generator=torch.Generator().manual_seed(b))
        x_np = x.numpy()
        with torch.inference_mode():
            ref = deploy(x).numpy()
            eager = summarize(time_callable(lambda: deploy(x), *timing), b, None)
        entry = {"batch": b, "eager_fp32": eager}
        for key in ("ov_fp32", "ov_bf16", "ov_int8"):
            if key not in irs:
                entry[key] = None
                continue
            precision, model = irs[key]
            model.reshape({model.inputs[0]: [b, cfg.in_chans, cfg.input_size, cfg.input_size]})  # static shape
            compiled = compile_model(model, CompileOptions(precision=precision, num_threads=threads))
            request = compiled.create_infer_request()
            out = request.infer([x_np])[0]
            stats = summarize(time_callable(lambda: request.infer([x_np], share_inputs=True), *timing), b, eager)
            entry[key] = stats | {"max_abs_diff_vs_eager": float(np.abs(out - ref).max()), "kernels": kernel_counts(compiled)}
        entry["int8_speedup_vs_ov_fp32_p50"] = entry["ov_fp32"]["p50"] / entry["ov_int8"]["p50"]
        entry["int8_throughput_ratio_vs_ov_fp32"] = entry["ov_int8"]["throughput_ips"] / entry["ov_fp32"]["throughput_ips"]
        per_batch.append(entry)
    return {"variant": name, "input_size": cfg.input_size,
            "quantization": {"seconds": round(quant_seconds, 2), "calibration_images": len(calib),
                             "decoded": calibration.decoded, "skipped": sorted(calibration.failures.items()),
                             "target_seconds": 180, "within_target": quant_seconds < 180},
            "batches": per_batch}


def table_rows(results: list[dict]) -> list[dict]:
    rows = []
    for r in results:
        for e in r["batches"]:
            for key in ("eager_fp32", "ov_fp32", "ov_bf16", "ov_int8"):
                s = e[key]
                if s is None:
                    continue
                rows.append({"variant": r["variant"], "batch": e["batch"], "engine": key, "p50 ms": s["p50"],
                             "p90 ms": s["p90"], "p99 ms": s["p99"], "img/s": s["throughput_ips"],
                             "x eager": s.get("speedup_vs_eager_p50", 1.0),
                             "x OV-fp32": e["ov_fp32"]["p50"] / s["p50"] if key.startswith("ov_") else None})
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="parnet_s,parnet_m", help="comma-separated model names")
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=30, help="minimum timed calls per measurement")
    ap.add_argument("--min-seconds", type=float, default=2.0, help="minimum timed seconds per measurement")
    ap.add_argument("--calib-images", type=int, default=300, help="calibration images generated and used by PTQ")
    ap.add_argument("--seed", type=int, default=0, help="seed of the calibration-image augmentation")
    ap.add_argument("--threads", type=int, default=None, help="torch and OpenVINO threads (default: all usable cores)")
    args = ap.parse_args(argv)

    threads = set_threads(args.threads)
    busy_before = other_busy_processes()
    if busy_before:
        print(f"WARNING: other busy processes, timings are not trustworthy: {busy_before}")
    src = bundled_calibration_dir()
    if src is None:
        raise SystemExit("calibration/sample not found (run from a source checkout)")
    opts = replace(QuantizeOptions(progress=False), subset_size=args.calib_images)
    batches = [int(b) for b in args.batches.split(",")]
    timing = (args.warmup, args.iters, args.min_seconds)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="parnet_bench_") as tmp, OtherLoad() as load:
        calib_dir = Path(tmp) / "calib"
        calib_dir.mkdir()
        calib = make_calibration_images(src, calib_dir, args.calib_images, args.seed)
        results = []
        for name in args.variants.split(","):
            print(f"{name}: quantizing on {len(calib)} images, then timing batches {batches} ...", flush=True)
            results.append(bench_variant(name.strip(), batches, threads, timing, calib, opts, Path(tmp)))

    machine = machine_summary(threads)
    print(f"\nCPU: {machine['cpu']} | threads {threads} (torch = OpenVINO) | RANDOM WEIGHTS (speed only, no accuracy) "
          f"| p50/p90/p99 of >= {args.iters} iters and >= {args.min_seconds} s | img/s = batch / mean latency | 'x eager' = eager-FP32 p50 / p50")
    print_table(table_rows(results), ["variant", "batch", "engine", "p50 ms", "p90 ms", "p99 ms", "img/s", "x eager", "x OV-fp32"])
    for r in results:
        q = r["quantization"]
        print(f"{r['variant']}: quantize_ir {q['seconds']:.1f} s on {q['decoded']} images (target < 180 s); "
              f"INT8 kernels at batch {r['batches'][0]['batch']}: {r['batches'][0]['ov_int8']['kernels']}")
    payload = {
        "benchmark": "quantization",
        "description": "latency (ms) and throughput (images/s, batch / mean latency) of the deploy form; one "
                       "synchronous request, PERFORMANCE_HINT=LATENCY, static input shape per batch",
        "precision": PRECISION_NOTES,
        "bf16_supported": precision_supported("bf16"),
        "weights": "random (create_model without checkpoint): valid for speed only, not for accuracy",
        "batches": batches, "threads": threads, "warmup": args.warmup, "iters_min": args.iters, "min_seconds": args.min_seconds,
        "calibration": {"source": str(src), "images": args.calib_images, "seed": args.seed,
                        "augmentation": "random crop 25-100% area, aspect 3:4-4:3, h-flip p=0.5, "
                                        "shorter side 224-384 px, JPEG q90"},
        "quantize_options": asdict(opts),
        "machine": machine, "busy_processes_at_start": busy_before,
        "other_load_during_run": load.summary(), "machine_was_quiet": load.quiet,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "results": results,
    }
    if not load.quiet:
        print(f"WARNING: other processes used the CPU during the run ({load.summary()}): timings are not trustworthy")
    print(f"wrote {write_result('quantization', payload)} ({payload['wall_seconds']} s)")


if __name__ == "__main__":
    main()
