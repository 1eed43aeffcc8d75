"""`parnet-cpu demo`: the main job end to end on the embedded default (nothing else imports this module).

Speed half (always): ParNet-S at 224x224 with random weights, INT8-quantized on the shipped photos, timed
as the single graph in FP32, BF16 (where the CPU has it) and INT8 and through the runtime's `auto`
plan: the speed-up this CPU gets. Accuracy half (with Debian's `dataset-fashion-mnist`): the shipped
reference model `parnet_fmnist` reparameterized, quantized with 300 real training images and evaluated
in FP32 and INT8 on the real test images. One summary table, `demo.json` and `bench.png`.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from parnet_cpu.options import arg

REPO_SAMPLE = Path(__file__).resolve().parents[1] / "assets" / "calibration_sample"  # package data


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the main job end to end: ParNet-S speed-up on this CPU, INT8 accuracy on the shipped reference model")
    p.add_argument("--out", default="parnet-demo", help="working folder (default: ./parnet-demo)")
    p.add_argument("--test-limit", type=arg("limit"),
                   help="evaluate only the first N test images (default: all 10,000)")
    p.add_argument("--quick", action="store_true", help="time each row for 0.2 s instead of 1 s (less precise)")
    from parnet_cpu.bench.quiet import add_quiet_args

    add_quiet_args(p)
    from parnet_cpu.cli.common import add_json_arg

    add_json_arg(p, "the summary (what OUT/demo.json holds)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from parnet_cpu.bench.quiet import NotQuietError, refuse
    from parnet_cpu.cli.common import check_output_arg, write_json_arg

    check_output_arg(args, "json", "demo")
    try:
        summary = run_demo(args.out, args.test_limit, min_seconds=0.2 if args.quick else 1.0,
                           require_quiet=args.require_quiet, quiet_wait_s=args.quiet_wait)
    except NotQuietError as exc:
        return refuse("demo", exc)
    write_json_arg(args, "demo", summary)
    if args.require_quiet and not summary["speed_half"]["machine_was_quiet"]:
        return refuse("demo", NotQuietError("other work used the CPUs during the speed half (see demo.json)"))
    return 0


def fidelity_half(out: Path, test_limit: int | None, log) -> dict | None:
    """The shipped reference model on real data: reparameterize, INT8 PTQ on 300 training images, FP32
    vs INT8 on the test images. None (said out loud) without the Fashion-MNIST files."""
    from parnet_cpu.artifacts import ModelDir
    from parnet_cpu.data import detect_layout
    from parnet_cpu.data.fmnist import prepare_fmnist
    from parnet_cpu.evaluation import accuracy_summary, fidelity_summary, run_models
    from parnet_cpu.models.parnet import count_parameters, create_model
    from parnet_cpu.quantization.ptq import QuantizeOptions, quantize_to_dir
    from parnet_cpu.reparam.fuse import reparameterize
    from parnet_cpu.runtime.engine import CompileOptions, compile_model

    try:
        calib, test = prepare_fmnist(out / "data", 300, test_limit, log)
    except FileNotFoundError as exc:
        log(f"NOTE: {exc}\nSkipping the accuracy half (it needs real labelled data); the speed half still runs.")
        return None
    model = create_model("parnet_fmnist", pretrained=True)
    source = {"model": "parnet_fmnist", "checkpoint": {"path": "parnet_cpu/assets/parnet_fmnist.pt (shipped)"}}
    part = {"model": {"name": "parnet_fmnist", "params_train": count_parameters(model),
                      "params_deploy": count_parameters(reparameterize(model))}}
    log(f"accuracy half: parnet_fmnist, {part['model']['params_train']:,} parameters (training form) -> "
        f"{part['model']['params_deploy']:,} (deploy form)")
    model_dir = out / "parnet_fmnist-int8"
    report = quantize_to_dir(model, source, calib, model_dir, QuantizeOptions(subset_size=300, progress=False),
                             overwrite=True, log=log)
    part["quantize_seconds"] = report["seconds"]
    md = ModelDir.open(model_dir)
    compiled = {p: compile_model(md.ir_path(p), CompileOptions(precision=p)) for p in ("fp32", "int8")}
    outs = run_models(compiled, detect_layout(test).samples, md.preprocess_config(), 64, progress=True,
                      desc="test set fp32+int8")
    part["accuracy"] = {p: accuracy_summary(outs.logits[p], outs.labels, md.class_names) for p in ("fp32", "int8")}
    part["int8_vs_fp32"] = fidelity_summary(outs.logits["fp32"], outs.logits["int8"], outs.labels)
    return part


def speed_half(out: Path, log, batches: tuple[int, ...] = (1, 8), min_seconds: float = 1.0, rounds: int = 5,
               require_quiet: bool = False, quiet_wait_s: float = 10.0) -> dict:
    """What the project is for: ParNet-S at 224x224 (random weights: speed only) quantized with the shipped
    photos, then the single graph in FP32, BF16 (where the CPU has it) and INT8, and the runtime's `auto`
    plan, all on this process's cores, timed in alternating rounds (`bench.rounds`, as `bench` does) while
    other load is watched (`bench.quiet`); the speed-ups are taken within each round."""
    import numpy as np

    from parnet_cpu.artifacts import ModelDir
    from parnet_cpu.bench.quiet import LoadWatch
    from parnet_cpu.bench.rounds import combine_rounds, interleaved_rounds, per_round_ratios
    from parnet_cpu.models.parnet import create_model
    from parnet_cpu.quantization.ptq import QuantizeOptions, quantize_to_dir
    from parnet_cpu.runtime.engine import CompileOptions, compile_model, precision_supported, runtime_layers
    from parnet_cpu.runtime.runtime import Runtime
    from parnet_cpu.runtime.timing import measure_latency
    from parnet_cpu.system.cpuinfo import describe_machine, format_cpu_list, machine_summary

    import torch

    torch.manual_seed(0)
    model_dir = out / "parnet_s-int8"
    cpus = sorted(os.sched_getaffinity(0))
    watch = LoadWatch(cpus, require_quiet, quiet_wait_s, "demo's speed half", log)
    log("speed half: ParNet-S 224x224, RANDOM weights (speed only), INT8 calibration on the 24 shipped photos ...")
    quantize_to_dir(create_model("parnet_s"), {"model": "parnet_s", "checkpoint": None,
                                               "note": "random weights: speed only"},
                    REPO_SAMPLE, model_dir, QuantizeOptions(subset_size=24, eval_limit=0, progress=False),
                    overwrite=True, log=lambda *_: None)
    md = ModelDir.open(model_dir)
    precisions = ["fp32"] + (["bf16"] if precision_supported("bf16") else []) + ["int8"]
    requests, kernels = {}, {}
    for prec in precisions:
        ir = md.ir_path("int8" if prec == "int8" else "fp32")  # bf16 = the FP32 IR run with bf16 kernels
        compiled = compile_model(ir, CompileOptions(precision=prec, num_threads=len(cpus)))
        kernels[prec] = sorted({l["kernel"] for l in runtime_layers(compiled) if l["type"] == "Convolution"})
        requests[prec] = compiled.create_infer_request()
    rows = []
    iters = max(2, -(-10 // rounds))
    with Runtime(model_dir, precision="int8", plan="auto", max_batch=max(batches)) as rt:
        watch.settle()
        log(f"  timing OpenVINO {'/'.join(p.upper() for p in precisions)} and the runtime in {rounds} "
            "interleaved rounds per batch ...")
        for b in batches:
            x = np.random.default_rng(0).standard_normal((b, *md.input_shape())).astype(np.float32)
            runners = {p: (lambda r=r: measure_latency(lambda: r.infer({0: x}), 2, iters, min_seconds / rounds, batch=b))
                       for p, r in requests.items()}
            runners["auto"] = lambda: measure_latency(lambda: rt.infer(x), 2, iters, min_seconds / rounds, batch=b)
            results, failed = interleaved_rounds(runners, rounds, between=watch.sample)
            if failed:
                raise RuntimeError(f"demo timing failed: {failed}")
            base = [r["throughput_ips"] for r in results["fp32"]]
            for name, res in results.items():
                row = {"engine": "auto" if name == "auto" else "ov-latency", "precision": "int8" if name == "auto" else name,
                       **combine_rounds(res),
                       "throughput_ratio_vs_fp32": per_round_ratios([r["throughput_ips"] for r in res], base)}
                row.update({"plan": rt.plan.kind, "plan_reason": rt.plan.reason} if name == "auto"
                           else {"conv_kernels": kernels[name]})
                rows.append(row)
            log(f"  batch {b}: " + ", ".join(f"{r['engine'] if r['engine'] == 'auto' else r['precision']} "
                                            f"{r['median_ms']:.2f} ms" for r in rows if r["batch"] == b))
    load = watch.finish(rows)
    info = describe_machine()
    return {"model": str(model_dir), "precision": "int8", "cpus": format_cpu_list(cpus), "threads": len(cpus),
            "settings": {"batches": list(batches), "rounds": rounds}, "rows": rows, "other_load": load,
            "machine_was_quiet": load["machine_was_quiet"], "machine": machine_summary(info)}


def run_demo(out: str | Path = "parnet-demo", test_limit: int | None = None, log=print,
             min_seconds: float = 1.0, require_quiet: bool = False, quiet_wait_s: float = 10.0) -> dict:
    from parnet_cpu.outputs import write_json
    from parnet_cpu.bench import plot

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    summary: dict = {"accuracy_half": fidelity_half(out, test_limit, log)}
    summary["speed_half"] = speed_half(out, log, min_seconds=min_seconds, require_quiet=require_quiet,
                                       quiet_wait_s=quiet_wait_s)
    plot([summary["speed_half"]], out / "bench.png")
    summary["seconds_total"] = time.perf_counter() - t_start
    write_json(out / "demo.json", summary)
    log("\n" + summary_table(summary))
    log(f"\nwrote {out}/demo.json, {out}/bench.png, model folders {out}/parnet_s-int8/"
        + (f", {out}/parnet_fmnist-int8/" if summary["accuracy_half"] else ""))
    return summary


PRECISION_LABELS = {"fp32": "OpenVINO FP32", "bf16": "OpenVINO BF16", "int8": "OpenVINO INT8"}


def summary_table(s: dict) -> str:
    """Speed first (the point of the project), then whether INT8 kept the answers."""
    sp = s["speed_half"]
    rows = {(r["engine"], r["precision"], r["batch"]): r for r in sp["rows"]}
    b_lat, b_thr = sp["settings"]["batches"][0], sp["settings"]["batches"][-1]
    lines = [f"ParNet-S 224x224 on {sp['machine']['cpu']} ({sp['machine']['isa_level']}), CPUs {sp['cpus']} "
             "(random weights: speed only)",
             f"{'':<34}{f'batch {b_lat} ms':>12}{f'batch {b_thr} img/s':>16}{'vs FP32 (range)':>18}"]
    if not sp.get("machine_was_quiet", True):
        lines.insert(1, f"NOT QUIET: other work used these CPUs (up to {sp['other_load']['max']:.2f} of a CPU): "
                        "the figures below are marked machine_was_quiet: false")
    labels = [(("ov-latency", p), PRECISION_LABELS[p]) for p in ("fp32", "bf16", "int8")]
    auto = rows.get(("auto", "int8", b_lat))
    if auto:
        labels.append((("auto", "int8"), f"parnet-cpu Runtime INT8 ({auto['plan']})"))
    for (engine, prec), label in labels:
        lat, thr = rows.get((engine, prec, b_lat)), rows.get((engine, prec, b_thr))
        if lat is None or thr is None:
            continue
        r = thr.get("throughput_ratio_vs_fp32")
        ratio = f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})" if r else "n/a"
        lines.append(f"{label:<34}{lat['median_ms']:>12.2f}{thr['throughput_ips']:>16.1f}{ratio:>18}")
    acc = s.get("accuracy_half")
    if acc:
        a, f = acc["accuracy"], acc["int8_vs_fp32"]
        lines.append(f"Accuracy (shipped parnet_fmnist, {a['int8']['labelled']} Fashion-MNIST test images): FP32 "
                     f"{a['fp32']['top1']:.2f}%, INT8 {a['int8']['top1']:.2f}%; agreement {f['top1_agreement']:.2f}%, "
                     f"{f['prediction_flips']} predictions changed, logit SQNR {f['sqnr_db']:.1f} dB")
    else:
        lines.append("Accuracy: not measured (no Fashion-MNIST; `apt-get install dataset-fashion-mnist`)")
    lines.append(f"total {s.get('seconds_total', 0):.0f} s")
    return "\n".join(lines)
