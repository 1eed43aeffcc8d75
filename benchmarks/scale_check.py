"""Scale check: how the single graph and the multi-stream runtime scale with cores, on whatever machine
this runs, with the cost model's prediction beside every measurement.

    python3 benchmarks/scale_check.py [--quick] [--models parnet_s,parnet_m] [--out DIR]

Measures (ParNet INT8, OpenVINO, random weights: speed only):
  * single-graph latency at 1, 2, 4, 8, ... and all physical cores, batch 1 and 8 (pinned child process,
    one thread per core, OpenVINO per-node counters on so every layer's oneDNN kernel is recorded);
  * each stage's time (stem, stream1..3, tail) at the same thread counts;
  * the multi-stream runtime with the planner's groups (`auto` sizing) and 2-3 alternatives (equal
    groups, --cores-per-stream 5 on 15+ cores, 8 on 24+), needs >= 3 physical cores;
  * the cost model (perf/costmodel.py, fitted on the 1-thread profile only) for every one of them.
Models are built here from the project's code (random weights) and quantized with NNCF on random
calibration inputs. Results: benchmarks/results/scale/<cpu-model>-<cores>c/scale_check.json (+ .png with
matplotlib), also copied into $OUT when that is set. Runs from a bundle without OpenVINO/NNCF
installed: see scripts/scale_bundle.sh and benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402


def thread_counts(cores: int) -> list[int]:
    """1, 2, 4, 8, ... and `cores` itself."""
    out, t = [], 1
    while t < cores:
        out.append(t)
        t *= 2
    return out + [cores]


def cpu_slug(model_name: str | None, cores: int) -> str:
    name = re.sub(r"\((r|tm)\)|cpu|processor|@.*", "", (model_name or "unknown-cpu").lower())
    return f"{re.sub(r'[^a-z0-9]+', '-', name).strip('-')[:48]}-{cores}c"


def build_int8(name: str, folder: Path, calib_images: int, log=print) -> Path:
    """ParNet `name` with random weights -> FP32 IR -> NNCF INT8 IR on random calibration inputs."""
    import torch

    from parnet_cpu.artifacts import stamp_manifest
    from parnet_cpu.export import export_model_dir, save_ir
    from parnet_cpu.models.parnet import create_model
    from parnet_cpu.quantization.openvino_backend import quantize_ir
    from parnet_cpu.quantization.ptq import QuantizeOptions
    from parnet_cpu.system.openvino_core import core

    t0 = time.perf_counter()
    torch.manual_seed(0)
    export_model_dir(create_model(name), folder)
    fp32 = core().read_model(str(folder / "model_fp32.xml"))
    shape = [1] + [d.get_length() for d in list(fp32.inputs[0].get_partial_shape())[1:]]
    rng = np.random.default_rng(0)
    calib = [rng.standard_normal(shape, dtype=np.float32) for _ in range(calib_images)]
    save_ir(quantize_ir(fp32, calib, QuantizeOptions(subset_size=calib_images, progress=False)),
            folder / "model_int8.xml")
    stamp_manifest(folder)
    log(f"{name}: built and quantized in {time.perf_counter() - t0:.0f} s")
    return folder


def alternative_groupings(cores: int) -> dict[str, int | None]:
    """Named groupings besides the planner's: equal thirds, 5 and 8 cores per stream where they fit."""
    alts: dict[str, int | None] = {"planner-auto": None, "equal": cores // 3}
    if cores >= 15:
        alts["cores-per-stream-5"] = 5
    if cores >= 24:
        alts["cores-per-stream-8"] = 8
    return alts


def measure_multistream(md: Path, cores_per_stream, batches, iters: int) -> dict:
    from parnet_cpu.runtime import Runtime
    from parnet_cpu.runtime.timing import measure_latency
    from parnet_cpu.system.cpuinfo import parse_cpu_list

    with Runtime(md, cores_per_stream=cores_per_stream if cores_per_stream else "auto", plan="multistream",
                 precision="int8", max_batch=max(batches)) as rt:
        desc = rt.plan.describe()
        out = {"plan": desc, "groups": [len(parse_cpu_list(w["cpus"])) for w in desc["workers"][1:]], "batches": {}}
        for b in batches:
            x = np.random.default_rng(0).standard_normal((b, *rt.input_shape), dtype=np.float32)
            out["batches"][str(b)] = measure_latency(lambda: rt.infer(x), 3, iters, batch=b)["median_ms"]
    return out


def check_model(name: str, work: Path, cores: int, batches: list[int], iters: int, calib: int, log=print) -> dict:
    from parnet_cpu.perf.costmodel import fit_layer_model, kernel_table, predict_plan, profile_stages, stage_ms, \
        sync_cost

    md = build_int8(name, work / name, calib, log)
    profiles = {}
    for t in thread_counts(cores):
        t0 = time.perf_counter()
        profiles[t] = profile_stages(md, "int8", t, batches, iters)
        log(f"{name}: {t} threads profiled in {time.perf_counter() - t0:.0f} s: single graph "
            + ", ".join(f"b{b} {profiles[t]['stages']['model'][str(b)]['wall_ms']:.2f} ms" for b in batches))
    sync = sync_cost(profiles[1], profiles[2]) if 2 in profiles else 0.0
    model = fit_layer_model(profiles[1], sync)
    scaling = []
    for t, p in profiles.items():
        for b in batches:
            for stage, by_b in p["stages"].items():
                meas = by_b[str(b)]["wall_ms"]
                pred = stage_ms(model["stages"][stage][str(b)], t, sync)
                scaling.append({"threads": t, "batch": b, "stage": stage, "measured_ms": meas, "predicted_ms": pred,
                                "error": pred / meas - 1})
    multistream = []
    if cores >= 3:
        for label, cps in alternative_groupings(cores).items():
            try:
                r = measure_multistream(md, cps, batches, iters)
            except Exception as exc:  # recorded, not fatal: the other rows still count
                multistream.append({"grouping": label, "error": f"{type(exc).__name__}: {exc}"})
                continue
            for b in batches:
                single = profiles[cores]["stages"]["model"][str(b)]["wall_ms"]
                pred = predict_plan(model, b, r["groups"], sum(r["groups"]), cores, handover_ms=0.3)
                multistream.append({"grouping": label, "groups": r["groups"], "batch": b,
                                    "measured_ms": r["batches"][str(b)], "single_graph_ms": single,
                                    "measured_ratio_vs_single": r["batches"][str(b)] / single,
                                    "predicted_ms": pred["multistream_ms"], "predicted_single_ms": pred["single_ms"]})
    return {"model": name, "kernels": kernel_table(profiles[1]), "sync_ms_per_split_layer": sync,
            "scaling": scaling, "multistream": multistream,
            "multistream_note": None if cores >= 3 else f"skipped: multi-stream needs 3 physical cores, {cores} usable"}


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(result["models"]), figsize=(6 * len(result["models"]), 4), squeeze=False)
    for ax, m in zip(axes[0], result["models"]):
        for b in result["batches"]:
            rows = [r for r in m["scaling"] if r["stage"] == "model" and r["batch"] == b]
            ts = [r["threads"] for r in rows]
            ax.plot(ts, [r["measured_ms"] for r in rows], "o-", label=f"single graph b{b} measured")
            ax.plot(ts, [r["predicted_ms"] for r in rows], "x--", label=f"single graph b{b} predicted")
            ms = [r for r in m["multistream"] if r.get("batch") == b and "measured_ms" in r]
            ax.plot([sum(r["groups"]) for r in ms], [r["measured_ms"] for r in ms], "s", label=f"multi-stream b{b}")
        ax.set(xscale="log", yscale="log", xlabel="physical cores", ylabel="ms", title=f"{m['model']} INT8")
        ax.legend(fontsize=7)
    fig.suptitle(f"{result['machine']['cpu']} ({result['machine']['cores_used']} cores)")
    fig.tight_layout()
    fig.savefig(path)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="ParNet-S only, batch 1, fewer iterations (< 5 min on 2 cores)")
    ap.add_argument("--models", default=None, help="comma-separated (default parnet_s,parnet_m)")
    ap.add_argument("--batches", default=None, help="comma-separated (default 1,8)")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/scale/<cpu>-<cores>c)")
    ap.add_argument("--work", default=None, help="where the models are built (default: a temporary folder)")
    args = ap.parse_args(argv)

    from parnet_cpu.system.cpuinfo import describe_machine, machine_summary, usable_physical_cores

    info = describe_machine()
    cores = len(usable_physical_cores(info))
    models = (args.models or ("parnet_s" if args.quick else "parnet_s,parnet_m")).split(",")
    batches = [int(b) for b in (args.batches or ("1" if args.quick else "1,8")).split(",")]
    iters = args.iters or (5 if args.quick else 10)

    result = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": args.quick, "batches": batches,
              "iters": iters, "precision": "int8",
              "machine": {**machine_summary(info), "cores_used": cores, "int8_kernels": info.int8_kernels},
              "method": "single graph and stages: median wall of one infer request in a child process pinned to "
                        "the first N physical cores, INFERENCE_NUM_THREADS=N, PERF_COUNT on; multi-stream: "
                        "Runtime(plan='multistream').infer median; predictions: per-layer cost model fitted on "
                        "the 1-thread profile only (sync cost from a microbenchmark at 2 threads), handover 0.3 ms "
                        "assumed", "models": []}
    t0 = time.perf_counter()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="parnet-scale-"))
    try:
        for name in models:
            result["models"].append(check_model(name, work, cores, batches, iters, 8 if args.quick else 32))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)  # only the temporary folder this run created
    result["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / "scale" / cpu_slug(info.model_name, cores)
    out.mkdir(parents=True, exist_ok=True)
    name = "scale_check_quick" if args.quick else "scale_check"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    written = [out / f"{name}.json"]
    if plot(result, out / f"{name}.png"):
        written.append(out / f"{name}.png")
    if os.environ.get("OUT"):
        for p in written:
            shutil.copy(p, Path(os.environ["OUT"]) / p.name)
    for m in result["models"]:
        print(f"{m['model']}: kernels {m['kernels']}")
        for r in m["scaling"]:
            if r["stage"] == "model":
                print(f"  single graph {r['threads']:>3} threads b{r['batch']}: measured {r['measured_ms']:.2f} ms, "
                      f"predicted {r['predicted_ms']:.2f} ms ({100 * r['error']:+.0f}%)")
        for r in m["multistream"]:
            print(f"  multi-stream {r['grouping']}: {r}")
        if m["multistream_note"]:
            print(f"  {m['multistream_note']}")
    print(f"done in {result['seconds']:.0f} s: {', '.join(map(str, written))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
