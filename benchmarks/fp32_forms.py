"""FP32 latency at batch 1: training form vs deploy form (PyTorch eager) and OpenVINO FP32 (deploy form).

    python benchmarks/fp32_forms.py [--variants parnet_s,parnet_m,parnet_l,parnet_xl] [--warmup 5] [--iters 30]
                                    [--min-seconds 2] [--threads N]

Random weights (latency does not depend on them). All three are FP32: PyTorch eager under
torch.inference_mode, and OpenVINO with INFERENCE_PRECISION_HINT=f32 (OpenVINO's CPU default would
be bf16 on CPUs with avx512_bf16/AMX). Writes benchmarks/results/fp32_forms.json.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from common import OtherLoad, kernel_counts, machine_summary, other_busy_processes, print_table, set_threads, time_callable, write_result
from parnet_cpu.export import to_openvino
from parnet_cpu.models.parnet import count_parameters, create_model
from parnet_cpu.reparam.fuse import reparameterize
from parnet_cpu.runtime.engine import CompileOptions, compile_model

VARIANTS = ("parnet_s", "parnet_m", "parnet_l", "parnet_xl")


def bench_variant(name: str, threads: int, warmup: int, iters: int, min_seconds: float) -> dict:
    """Latency of one variant in its three FP32 forms, plus output agreement checks."""
    train = create_model(name)
    deploy = reparameterize(train)
    size = train.cfg.input_size
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    compiled = compile_model(to_openvino(deploy), CompileOptions(precision="fp32", num_threads=threads))
    request = compiled.create_infer_request()
    x_np = x.numpy()

    with torch.inference_mode():
        ref_train, ref_deploy = train(x).numpy(), deploy(x).numpy()
        ov_out = request.infer([x_np])[0]
        t_train = time_callable(lambda: train(x), warmup, iters, min_seconds)
        t_deploy = time_callable(lambda: deploy(x), warmup, iters, min_seconds)
    t_ov = time_callable(lambda: request.infer([x_np], share_inputs=True), warmup, iters, min_seconds)
    scale = float(np.abs(ref_train).max())
    return {
        "variant": name, "input_size": size, "batch": 1,
        "params_train": count_parameters(train), "params_deploy": count_parameters(deploy),
        "eager_train_fp32": t_train, "eager_deploy_fp32": t_deploy, "openvino_deploy_fp32": t_ov,
        "openvino_kernels": kernel_counts(compiled),
        "deploy_over_train": t_deploy["p50"] / t_train["p50"],
        "ov_over_eager_deploy": t_ov["p50"] / t_deploy["p50"],
        "max_abs_diff": {"deploy_vs_train": float(np.abs(ref_deploy - ref_train).max()),
                         "ov_vs_deploy": float(np.abs(ov_out - ref_deploy).max()), "logit_scale": scale},
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated model names")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=30, help="minimum timed calls per measurement")
    ap.add_argument("--min-seconds", type=float, default=2.0, help="minimum timed seconds per measurement")
    ap.add_argument("--threads", type=int, default=None, help="torch and OpenVINO threads (default: all usable cores)")
    args = ap.parse_args(argv)

    threads = set_threads(args.threads)
    busy_before = other_busy_processes()
    if busy_before:
        print(f"WARNING: other busy processes, timings are not trustworthy: {busy_before}")
    t0 = time.perf_counter()
    results = []
    with OtherLoad() as load:
        for name in args.variants.split(","):
            print(f"{name} ...", flush=True)
            results.append(bench_variant(name.strip(), threads, args.warmup, args.iters, args.min_seconds))

    machine = machine_summary(threads)
    rows = [{"variant": r["variant"], "train ms": r["eager_train_fp32"]["p50"], "deploy ms": r["eager_deploy_fp32"]["p50"],
             "OV fp32 ms": r["openvino_deploy_fp32"]["p50"], "deploy/train": r["deploy_over_train"],
             "OV/eager-deploy": r["ov_over_eager_deploy"]} for r in results]
    print(f"\nCPU: {machine['cpu']} | threads {threads} (torch = OpenVINO) | batch 1 | FP32 everywhere | "
          f"p50 of >= {args.iters} iters and >= {args.min_seconds} s | random weights")
    print_table(rows, ["variant", "train ms", "deploy ms", "OV fp32 ms", "deploy/train", "OV/eager-deploy"])
    payload = {
        "benchmark": "fp32_forms",
        "description": "batch-1 latency (ms) of the training form and the deploy form in PyTorch eager "
                       "(torch.inference_mode), and of the deploy form in OpenVINO; ratios use p50",
        "precision": {"eager_train_fp32": "fp32 (PyTorch eager)", "eager_deploy_fp32": "fp32 (PyTorch eager)",
                      "openvino_deploy_fp32": "fp32 (INFERENCE_PRECISION_HINT=f32, PERFORMANCE_HINT=LATENCY)"},
        "weights": "random (create_model without checkpoint)",
        "batch": 1, "threads": threads, "warmup": args.warmup, "iters_min": args.iters, "min_seconds": args.min_seconds,
        "machine": machine, "busy_processes_at_start": busy_before,
        "other_load_during_run": load.summary(), "machine_was_quiet": load.quiet,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "results": results,
    }
    if not load.quiet:
        print(f"WARNING: other processes used the CPU during the run ({load.summary()}): timings are not trustworthy")
    print(f"wrote {write_result('fp32_forms', payload)} ({payload['wall_seconds']} s)")


if __name__ == "__main__":
    main()
