"""INT8 on the fast kernels: today's defaults vs the new ones, and `Runtime` vs `benchmark_app`, in one run.

    python benchmarks/matrix_unit.py [--variant parnet_s] [--batch 8] [--rounds 8] [--calib-images 64]
                                     [--threads N] [--isa-cap AVX2|AVX512_CORE] [--bench-app-seconds 8] [--skip-bench-app]

One FP32 IR (random weights: speed does not depend on them) is quantized with NNCF from the same
calibration photos three ways: the old default ignored scope (SE gates + stem in float), the stem
quantized too (`se` only), and the current `QuantizeOptions` default (the same file as legacy when the
scopes agree). Every configuration is compiled as `Runtime` compiles it (LATENCY hint, pinned threads):
  legacy            old ignored scope, float leftovers f32 (the defaults before issue 14)
  legacy+bf16       old ignored scope, float leftovers bf16
  stem int8+f32/bf16  stem quantized, float leftovers f32 / bf16
  new (defaults)    today's defaults: QuantizeOptions' scope, float leftovers auto (bf16 where the CPU has it)
  bf16 (fp32 IR)    the FP32 IR with the bf16 precision hint (the INT8 vs BF16 ratio)
Two measurements, each interleaved over `--rounds` rounds with ratios taken within a round: batch
`--batch` wall-clock images/s on all threads, and images per CPU-second on one thread (thread CPU time:
robust to other load on a shared machine). Per-node profiles (`parnet_cpu.perf.profile`) of legacy and
new are saved. Then the new INT8 IR through `Runtime(plan="single")` against `benchmark_app -hint latency`
(both of its precision settings), alternating blocks. Last, the demo's Fashion-MNIST accuracy path
(all 10,000 test images) for each ignored scope and leftover precision.
Writes benchmarks/results/matrix_unit_<variant>[_<isa>].json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ISA_CAPS = {"AVX2": "AVX2", "AVX512_CORE": "AVX512_CORE", "AVX512_CORE_VNNI": "AVX512_CORE_VNNI"}
LEGACY_SCOPE = ("se", "stem")
STEM_INT8_SCOPE = ("se",)  # the candidate "stem quantized" (measured, see the module docstring)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="parnet_s")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--iters", type=int, default=4, help="inferences per configuration per round (median taken)")
    p.add_argument("--calib-images", type=int, default=64)
    p.add_argument("--threads", type=int)
    p.add_argument("--isa-cap", choices=sorted(ISA_CAPS), help="cap oneDNN's ISA (ONEDNN_MAX_CPU_ISA): ratios carry "
                   "over to such a CPU, milliseconds do not")
    p.add_argument("--bench-app-seconds", type=int, default=8)
    p.add_argument("--bench-app-rounds", type=int, default=3)
    p.add_argument("--skip-bench-app", action="store_true")
    p.add_argument("--skip-accuracy", action="store_true", help="skip the Fashion-MNIST accuracy check")
    p.add_argument("--skip-speed", action="store_true", help="accuracy only")
    p.add_argument("--new-scope", help="ignored scope of the new INT8 IR, comma-separated aliases/regexes or 'none' "
                   "(default: QuantizeOptions' default)")
    p.add_argument("--workdir", help="keep the model folders here (default: a temporary folder)")
    return p.parse_args()


def build_irs(variant: str, workdir: Path, n_calib: int, new_scope: tuple[str, ...]) -> dict[str, Path]:
    """Model folder with the FP32 IR and the new INT8 IR, plus the legacy INT8 IR beside it (reused from
    `workdir` when already built with the same scopes)."""
    import torch

    from parnet_cpu.artifacts import IR_FILES, ModelDir
    from parnet_cpu.data import bundled_calibration_dir
    from parnet_cpu.export import save_ir, write_fp32_artifacts
    from parnet_cpu.models.parnet import create_model
    from parnet_cpu.quantization.openvino_backend import quantize_ir
    from parnet_cpu.quantization.ptq import ImageStream, QuantizeOptions
    from parnet_cpu.reparam.fuse import reparameterize
    from parnet_cpu.system.openvino_core import core
    from quantization import make_calibration_images

    folder = workdir / variant
    paths = {"folder": folder, "fp32": folder / IR_FILES["fp32"], "new": folder / IR_FILES["int8"],
             "legacy": workdir / "legacy_int8.xml", "stem": workdir / "stem_int8.xml"}
    if not paths["fp32"].is_file():
        torch.manual_seed(0)
        folder.mkdir(parents=True, exist_ok=True)
        write_fp32_artifacts(reparameterize(create_model(variant)), folder, {"model": variant})
    (workdir / "calib").mkdir(parents=True, exist_ok=True)
    calib = make_calibration_images(bundled_calibration_dir(), workdir / "calib", n_calib)
    stream = ImageStream([(p, None) for p in calib], ModelDir.open(folder).preprocess_config())
    for key, scope in (("legacy", LEGACY_SCOPE), ("new", new_scope), ("stem", STEM_INT8_SCOPE)):
        marker = workdir / f"{key}_scope.json"
        if paths[key].is_file() and marker.is_file() and json.loads(marker.read_text()) == list(scope):
            continue
        fp32 = core().read_model(str(paths["fp32"]))
        save_ir(quantize_ir(fp32, stream, QuantizeOptions(ignored_scope=scope, progress=False)), paths[key])
        marker.write_text(json.dumps(list(scope)))
    return paths


def fmnist_accuracy(workdir: Path, scopes: dict[str, tuple[str, ...]]) -> dict | None:
    """The demo's accuracy path on the shipped Fashion-MNIST model: 300 training images for calibration,
    all 10,000 test images; one INT8 IR per ignored scope, each compiled with f32 and (where the CPU has
    it) bf16 float leftovers; every model sees the same decoded images. None without the dataset."""
    from parnet_cpu.artifacts import IR_FILES, ModelDir
    from parnet_cpu.data import detect_layout
    from parnet_cpu.data.fmnist import prepare_fmnist
    from parnet_cpu.evaluation import accuracy_summary, fidelity_summary, run_models
    from parnet_cpu.export import save_ir, write_fp32_artifacts
    from parnet_cpu.models.parnet import create_model
    from parnet_cpu.quantization.openvino_backend import quantize_ir
    from parnet_cpu.quantization.ptq import ImageStream, QuantizeOptions
    from parnet_cpu.reparam.fuse import reparameterize
    from parnet_cpu.runtime.engine import precision_supported
    from parnet_cpu.system.openvino_core import core

    try:
        calib, test = prepare_fmnist(workdir / "fmnist")
    except FileNotFoundError:
        return None
    folder = workdir / "parnet_fmnist"
    if not (folder / IR_FILES["fp32"]).is_file():
        folder.mkdir(parents=True, exist_ok=True)
        write_fp32_artifacts(reparameterize(create_model("parnet_fmnist", pretrained=True)), folder,
                             {"model": "parnet_fmnist"})
    md = ModelDir.open(folder)
    stream = ImageStream(detect_layout(calib).samples, md.preprocess_config())
    compiled = {"fp32": compile_config(md.ir_path("fp32"), "fp32", None, None)}
    leftovers = ("f32", "bf16") if precision_supported("bf16") else ("f32",)
    for name, scope in scopes.items():
        ir = workdir / f"fmnist_int8_{name}.xml"
        int8 = quantize_ir(core().read_model(str(md.ir_path("fp32"))), stream, QuantizeOptions(ignored_scope=scope,
                                                                                                progress=False))
        save_ir(int8, ir)
        for lo in leftovers:
            compiled[f"int8 {name} {lo}"] = compile_config(ir, "int8", lo, None)
    outs = run_models(compiled, detect_layout(test).samples, md.preprocess_config(), 64)
    result = {k: accuracy_summary(v, outs.labels)["top1"] for k, v in outs.logits.items()}
    return {"top1": result, "images": int(len(outs.labels)), "scopes": {k: list(v) for k, v in scopes.items()},
            "int8_minus_fp32_points": {k: v - result["fp32"] for k, v in result.items() if k != "fp32"},
            "fidelity": {k: fidelity_summary(outs.logits["fp32"], v, outs.labels)
                         for k, v in outs.logits.items() if k != "fp32"}}


def compile_config(ir: Path, precision: str, leftovers: str | None, threads: int | None, perf: bool = False):
    from parnet_cpu.runtime.engine import CompileOptions, compile_model

    return compile_model(ir, CompileOptions(precision=precision, num_threads=threads, pinning=True,
                                            leftovers=leftovers, perf_count=perf))


def interleaved(requests: dict, x: np.ndarray, rounds: int, iters: int, clock=time.perf_counter) -> dict[str, list[float]]:
    """images/s of each request, `rounds` times, configurations alternating within each round
    (`parnet_cpu.bench.rounds.interleaved_rounds`, the loop `bench` and the demo use)."""
    from parnet_cpu.bench.rounds import interleaved_rounds

    def block(r) -> float:
        times = []
        for _ in range(iters):
            t0 = clock()
            r.infer({0: x}, share_inputs=True)
            times.append(clock() - t0)
        return x.shape[0] / float(np.median(times))

    for r in requests.values():
        r.infer({0: x}, share_inputs=True)
    out, failed = interleaved_rounds({k: (lambda r=r: block(r)) for k, r in requests.items()}, rounds)
    if failed:
        raise RuntimeError(f"configurations failed: {failed}")
    return out


def interleaved_cpu(requests: dict, x: np.ndarray, rounds: int, iters: int) -> dict[str, list[float]]:
    """images per CPU-second of each 1-thread request: with one inference thread OpenVINO runs on the
    calling thread, so `time.thread_time` counts only the inference's own CPU time, whatever else runs on
    the machine (wall time on this shared 2-core VM varied 2.5x between identical runs; thread time <1 %)."""
    return interleaved(requests, x, rounds, iters, clock=time.thread_time)


def stats(values: list[float]) -> dict:
    return {"median": float(np.median(values)), "min": float(min(values)), "max": float(max(values)),
            "values": [round(v, 2) for v in values]}


def benchmark_app(ir: Path, batch: int, seconds: int, precision: str) -> float:
    """benchmark_app's throughput (FPS) on the IR with -hint latency (subprocess; same cores)."""
    app = shutil.which("benchmark_app")  # the openvino wheel's console script; its module has no __main__ guard
    launcher = [app] if app else [sys.executable, "-c", "import sys; from openvino.tools.benchmark.main import main; "
                                  "sys.argv[0] = 'benchmark_app'; main()"]
    # -hint latency forbids -nthreads: it takes every core of the process, as Runtime's single graph does
    cmd = launcher + ["-m", str(ir), "-d", "CPU", "-b", str(batch), "-hint", "latency", "-t", str(seconds),
                      "-infer_precision", precision]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds * 10 + 120)
    match = re.search(r"Throughput:\s+([\d.]+)\s+FPS", out.stdout)
    if out.returncode != 0 or not match:
        raise RuntimeError(f"benchmark_app failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return float(match.group(1))


def runtime_block(rt, x: np.ndarray, seconds: float) -> float:
    """Runtime.infer images/s over `seconds` (benchmark_app counts frames / duration the same way)."""
    rt.infer(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        rt.infer(x)
        n += 1
    return n * x.shape[0] / (time.perf_counter() - t0)


def speed(args, irs: dict, threads: int) -> dict:
    """Interleaved throughput of every configuration, profiles of legacy and new, Runtime vs benchmark_app."""
    from parnet_cpu.runtime.engine import float_leftovers, isa_cap_allows_bf16, precision_supported
    from parnet_cpu.system.openvino_core import core
    from parnet_cpu.runtime.macs import model_macs
    from parnet_cpu.perf.profile import profile_compiled

    shape = core().read_model(str(irs["fp32"])).inputs[0].get_partial_shape()
    x = np.random.default_rng(0).standard_normal((args.batch, *[d.get_length() for d in list(shape)[1:]]),
                                                 dtype=np.float32)
    configs = {"legacy": (irs["legacy"], "int8", "f32"), "legacy+bf16": (irs["legacy"], "int8", "bf16"),
               "stem int8+f32": (irs["stem"], "int8", "f32"), "stem int8+bf16": (irs["stem"], "int8", "bf16"),
               "new (defaults)": (irs["new"], "int8", None)}
    # under an ISA cap without bf16 (--isa-cap AVX2) oneDNN has no bf16 kernel for the f32 stem conv and the
    # compile fails ("node ... is not initialized"): such configurations are left out, as "auto" does
    if precision_supported("bf16") and isa_cap_allows_bf16(os.environ.get("ONEDNN_MAX_CPU_ISA")):
        configs["bf16 (fp32 IR)"] = (irs["fp32"], "bf16", None)
    else:
        configs = {k: v for k, v in configs.items() if "bf16" not in k}
    requests = {k: compile_config(ir, p, lo, threads).create_infer_request() for k, (ir, p, lo) in configs.items()}
    ips = interleaved(requests, x, args.rounds, args.iters)
    del requests
    ratios = {k: stats([a / b for a, b in zip(v, ips["legacy"])]) for k, v in ips.items()}
    print("images/s medians: " + ", ".join(f"{k} {stats(v)['median']:.1f}" for k, v in ips.items()), flush=True)
    requests = {k: compile_config(ir, p, lo, 1).create_infer_request() for k, (ir, p, lo) in configs.items()}
    cpu = interleaved_cpu(requests, x, args.rounds, args.iters)
    del requests
    cpu_ratios = {k: stats([a / b for a, b in zip(v, cpu["legacy"])]) for k, v in cpu.items()}
    print("images per CPU-second (1 thread): " + ", ".join(f"{k} {stats(v)['median']:.2f}" for k, v in cpu.items()),
          flush=True)
    macs = model_macs(core().read_model(str(irs["fp32"])))
    profiles = {k: profile_compiled(compile_config(configs[k][0], "int8", configs[k][2], threads, perf=True),
                                    {0: x}, args.batch, "int8", macs, threads, iters=5) for k in ("legacy", "new (defaults)")}
    vs_app = None
    if not args.skip_bench_app:
        from parnet_cpu.runtime.runtime import Runtime

        rt_ips, app = [], {"f32": [], "bf16": [] if precision_supported("bf16") else None}
        # share=True: a lease held by another process's Runtime must not stop a measurement (run it via /tmp/quiet.sh)
        with Runtime(irs["folder"], precision="int8", plan="single", max_batch=args.batch, share=True) as rt:
            plan = rt.describe()["plan"]
            for _ in range(args.bench_app_rounds):
                rt_ips.append(runtime_block(rt, x, args.bench_app_seconds))
                for prec, lst in app.items():
                    if lst is not None:
                        lst.append(benchmark_app(irs["new"], args.batch, args.bench_app_seconds, prec))
                rt_ips.append(runtime_block(rt, x, args.bench_app_seconds))
        best = max((stats(v)["median"], k) for k, v in app.items() if v)
        vs_app = {"runtime_single_ips": stats(rt_ips), "benchmark_app_ips": {k: stats(v) for k, v in app.items() if v},
                  "benchmark_app_best": best[1], "ratio_runtime_vs_best_app": stats(rt_ips)["median"] / best[0],
                  "runtime_plan": plan, "runtime_float_leftovers": float_leftovers("int8")}
    return {"configs": {k: {"ir": Path(ir).name, "precision": p, "float_leftovers": lo or float_leftovers(p)}
                        for k, (ir, p, lo) in configs.items()},
            "images_per_s": {k: stats(v) for k, v in ips.items()}, "ratio_vs_legacy_per_round": ratios,
            "images_per_cpu_second_1thread": {k: stats(v) for k, v in cpu.items()},
            "cpu_ratio_vs_legacy_per_round": cpu_ratios,
            "profiles": profiles, "runtime_vs_benchmark_app": vs_app}


def print_summary(args, threads: int, result: dict) -> None:
    sp, acc = result.get("speed"), result.get("accuracy")
    if sp:
        print(f"{args.variant} batch {args.batch}, {threads} threads, {args.rounds} interleaved rounds"
              + (f", ISA capped at {args.isa_cap}" if args.isa_cap else ""))
        print(f"{'config':<16} {'img/s':>8} {'x legacy':>9} {'min':>6} {'max':>6}")
        for k, v in sp["images_per_s"].items():
            r = sp["ratio_vs_legacy_per_round"][k]
            print(f"{k:<16} {v['median']:8.1f} {r['median']:9.3f} {r['min']:6.3f} {r['max']:6.3f}")
        print(f"{'1 thread, CPU':<16} {'img/cpu-s':>9} {'x legacy':>9} {'min':>6} {'max':>6}")
        for k, v in sp["images_per_cpu_second_1thread"].items():
            r = sp["cpu_ratio_vs_legacy_per_round"][k]
            print(f"{k:<16} {v['median']:9.2f} {r['median']:9.3f} {r['min']:6.3f} {r['max']:6.3f}")
        for k, p in sp["profiles"].items():
            print(f"profile {k}: VNNI share {p['vnni_share']:.3f}, AMX share {p['matrix_unit_share']:.3f}, int8 kernels "
                  f"{p['int8_share']:.3f}, reorders {p['reorders']} ({p['reorder_share']:.3f}), "
                  f"{p['achieved_gmacs']:.0f} GMAC/s")
        vs = sp["runtime_vs_benchmark_app"]
        if vs:
            print(f"Runtime(plan=single) {vs['runtime_single_ips']['median']:.1f} img/s vs benchmark_app "
                  + ", ".join(f"{k} {v['median']:.1f}" for k, v in vs["benchmark_app_ips"].items())
                  + f": ratio {vs['ratio_runtime_vs_best_app']:.3f}")
    if acc:
        print(f"Fashion-MNIST top-1 on {acc['images']} test images: "
              + ", ".join(f"{k} {v:.2f}" for k, v in acc["top1"].items()))


def main() -> None:
    args = parse_args()
    if args.isa_cap:
        os.environ["ONEDNN_MAX_CPU_ISA"] = ISA_CAPS[args.isa_cap]
    from common import machine_summary, usable_cores, write_result
    from parnet_cpu.quantization.ptq import QuantizeOptions

    threads = args.threads or usable_cores()
    new_scope = QuantizeOptions.ignored_scope if args.new_scope is None else \
        tuple(v for v in args.new_scope.split(",") if v and v != "none")
    result = {"variant": args.variant, "batch": args.batch, "threads": threads, "rounds": args.rounds,
              "isa_cap": args.isa_cap, "legacy_ignored_scope": list(LEGACY_SCOPE), "new_ignored_scope": list(new_scope)}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        if not args.skip_speed:
            result["speed"] = speed(args, build_irs(args.variant, workdir, args.calib_images, new_scope), threads)
        if not args.skip_accuracy:
            scopes = {"legacy": LEGACY_SCOPE, "new": new_scope, "stem int8": STEM_INT8_SCOPE, "none": ()}
            result["accuracy"] = fmnist_accuracy(workdir, {k: v for k, v in scopes.items()
                                                           if k == "legacy" or v != LEGACY_SCOPE})
    result |= {"machine": machine_summary(threads), "command": " ".join(["python", "benchmarks/matrix_unit.py",
                                                                         *sys.argv[1:]])}
    print_summary(args, threads, result)
    suffix = f"_{args.isa_cap.lower()}" if args.isa_cap else ""
    name = f"matrix_unit_{args.variant}{suffix}" + ("_accuracy" if args.skip_speed else "")
    print(f"wrote {write_result(name, result)}")


if __name__ == "__main__":
    main()
