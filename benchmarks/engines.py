"""All INT8 engines side by side for one model (issue 6): OpenVINO (NNCF), PyTorch-native
(PT2E + X86InductorQuantizer + torch.compile), IPEX static INT8 and ONNX Runtime static INT8 (`ort-int8`,
one of `bench`'s default engines, calibrated on the same images via `--calib`), plus the FP32 baselines.

    python benchmarks/engines.py [--model parnet_s] [--batches 1,8] [--ipex-venv /path/to/venv]

One model (random weights, fixed seed, saved once as a checkpoint) is quantized by all three
backends with the same calibration images; their INT8 artifacts are gathered into one model folder.
IPEX needs torch 2.8, so its quantization and its rows run in the IPEX environment
(`scripts/ipex_env.sh`); every other row runs in this environment. Each of the two `parnet-cpu
bench` runs measures its own `ov-latency` baseline on the same cores, and every ratio is taken
against the baseline of its own run, never across runs. Random weights: speed only.
Result: `benchmarks/results/engines_<model>.json`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import OtherLoad, kernel_counts, other_busy_processes, write_result
from quantization import make_calibration_images

from parnet_cpu.data import bundled_calibration_dir
from parnet_cpu.runtime.leases import stream_groups_for_this_machine
from parnet_cpu.system.cpuinfo import format_cpu_list

REPO = Path(__file__).resolve().parent.parent
IPEX_ROWS = "ov-latency,torch-eager,ipex-int8"
# oneDNN's ISA cap (OpenVINO's CPU plugin and torch/IPEX both honour it) plus ATen's own vector level
ISA_CAPS = {"AVX2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
            "AVX512_CORE": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "ATEN_CPU_CAPABILITY": "avx512"}}


def ov_int8_kernels(folder: Path) -> dict[str, int]:
    """The kernels OpenVINO picks for the INT8 model under this process's environment (ISA cap included)."""
    from parnet_cpu.artifacts import ModelDir
    from parnet_cpu.runtime.engine import CompileOptions, compile_model

    return kernel_counts(compile_model(ModelDir.open(folder).ir_path("int8"), CompileOptions(precision="int8")))


def cli(python: str, args: list[str], env: dict[str, str] | None = None) -> None:
    """Run `parnet-cpu ARGS` with the given interpreter (this repo first on its path); fail loudly."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    print(f"$ {Path(python).name} -m parnet_cpu {' '.join(args)}", flush=True)
    subprocess.run([python, "-m", "parnet_cpu", *args], env=full_env, check=True, cwd=REPO)


def ipex_python(venv: Path) -> tuple[str, dict[str, str]] | None:
    """The IPEX environment's interpreter and the Intel OpenMP preload it needs, or None if absent."""
    python, iomp = venv / "bin" / "python", venv / "lib" / "libiomp5.so"
    probe = subprocess.run([str(python), "-c", "import intel_extension_for_pytorch"], capture_output=True,
                           env={**os.environ, "LD_PRELOAD": str(iomp)}) if python.is_file() else None
    if probe is None or probe.returncode != 0:
        return None
    return str(python), {"LD_PRELOAD": str(iomp)}


def quantize_all(model: str, workdir: Path, calib: Path, ipex: tuple[str, dict] | None) -> tuple[Path, dict]:
    """Quantize one checkpoint with every available backend; return the gathered model folder and
    each backend's PTQ seconds."""
    import torch

    from parnet_cpu import create_model
    from parnet_cpu.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    ckpt = workdir / f"{model}_seed0.pt"
    save_checkpoint(create_model(model), ckpt)
    common = ["--model", model, "--checkpoint", str(ckpt), "--calib", str(calib), "--subset-size", "300",
              "--quiet", "--overwrite"]
    runs = {"openvino": (sys.executable, None), "torch": (sys.executable, None)}
    if ipex:
        runs["ipex"] = ipex
    seconds, folders = {}, {}
    for backend, (python, env) in runs.items():
        folders[backend] = workdir / backend
        t0 = time.perf_counter()
        cli(python, ["quantize", *common, "--backend", backend, "--out", str(folders[backend])], env)
        seconds[backend] = round(time.perf_counter() - t0, 1)
    gathered = folders["openvino"]
    for backend, folder in folders.items():
        for f in folder.glob("model_int8_*") if folder != gathered else ():
            shutil.copy2(f, gathered / f.name)
    return gathered, seconds


def ov_int8_speedup(results: dict) -> dict[int, float]:
    """OpenVINO FP32 p50 / INT8 p50 per batch, from the fp32 run and the main run's ov-latency rows."""
    def p50(run: str) -> dict[int, float]:
        return {r["batch"]: r["median_ms"] for r in results[run]["rows"] if r["engine"] == "ov-latency" and "error" not in r}

    int8, fp32 = p50("main"), p50("fp32")
    return {b: round(fp32[b] / int8[b], 3) for b in int8 if b in fp32}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="parnet_s")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--min-seconds", default="3")
    p.add_argument("--ipex-venv", type=Path, default=Path(os.environ.get("PARNET_IPEX_VENV", REPO / ".venv-ipex")),
                   help="IPEX environment from scripts/ipex_env.sh (default: $PARNET_IPEX_VENV or .venv-ipex)")
    p.add_argument("--isa-cap", choices=sorted(ISA_CAPS),
                   help="cap the instruction set every engine may use (oneDNN, in OpenVINO, torch and IPEX, and "
                        "ATen), to measure e.g. an AVX2 server's kernels on a newer CPU")
    args = p.parse_args(argv)
    if args.isa_cap:
        os.environ.update(ISA_CAPS[args.isa_cap])

    busy = other_busy_processes()
    if busy:
        print(f"warning: other busy processes, timings suspect: {', '.join(busy)}", flush=True)
    ipex = ipex_python(args.ipex_venv)
    if ipex is None:
        print(f"note: no IPEX environment at {args.ipex_venv} (build it with scripts/ipex_env.sh): no IPEX rows")
    with tempfile.TemporaryDirectory() as tmp, OtherLoad(exclude_children=True) as load:
        work = Path(tmp)
        calib = work / "calib"
        calib.mkdir()
        make_calibration_images(bundled_calibration_dir(), calib, 300)
        folder, ptq_seconds = quantize_all(args.model, work, calib, ipex)
        kernels = ov_int8_kernels(folder)
        print(f"OpenVINO INT8 kernels: {kernels}", flush=True)
        bench = ["bench", "--model-dir", str(folder), "--batches", args.batches, "--min-seconds", args.min_seconds,
                 "--calib", str(calib)]
        groups, groups_note = stream_groups_for_this_machine()
        print(f"multi-stream: {groups_note}", flush=True)
        cores = ["--cores", ":".join(format_cpu_list(g) for g in groups)] if groups else []
        runs = {"main": (sys.executable, None, cores),
                "fp32": (sys.executable, None, ["--engines", "ov-latency", "--precision", "fp32"])}
        if ipex:
            runs["ipex"] = (*ipex, ["--engines", IPEX_ROWS])
        results = {}
        for name, (python, env, extra) in runs.items():
            out = work / f"bench_{name}.json"
            cli(python, [*bench, *extra, "--json", str(out)], env)
            results[name] = json.loads(out.read_text())
    payload = {
        "benchmark": "engines",
        "description": __doc__.split("\n\n", 2)[1].replace("\n", " "),
        "model": f"{args.model} (random weights, seed 0)",
        "ptq_seconds": ptq_seconds,
        "isa_cap": ISA_CAPS.get(args.isa_cap),
        "openvino_int8_kernels": kernels,
        "stream_groups": groups_note,
        "ipex_environment": str(args.ipex_venv) if ipex else None,
        "runs": results,
        "openvino_int8_speedup_vs_fp32": ov_int8_speedup(results),
        "other_load_during_run": load.summary(),
        "machine_was_quiet": load.quiet and not busy,
    }
    suffix = f"_{args.isa_cap.lower()}" if args.isa_cap else ""
    path = write_result(f"engines_{args.model}{suffix}", payload)
    print(f"\n{'run':<6}{'engine':<14}{'prec':<6}{'batch':>5}{'p50 ms':>9}{'p99 ms':>9}{'img/s':>9}{'vs OV INT8':>11}")
    for name, res in results.items():
        for r in res["rows"]:
            if "error" in r:
                print(f"{name:<6}{r['engine']:<14}{r.get('precision', ''):<6}{r['batch']:>5}  error: {r['error'][:60]}")
                continue
            print(f"{name:<6}{r['engine']:<14}{r['precision']:<6}{r['batch']:>5}{r['median_ms']:>9.2f}{r['p99_ms']:>9.2f}"
                  f"{r['throughput_ips']:>9.1f}{1 / r.get('latency_ratio_vs_ov_latency', float('nan')):>10.2f}x")
    print("\nspeed-ups are the run's own ov-latency p50 / engine p50; OpenVINO INT8 vs FP32 (consecutive runs): "
          + ", ".join(f"batch {b}: {v:.2f}x" for b, v in payload["openvino_int8_speedup_vs_fp32"].items()) + f"\nwrote {path}")


if __name__ == "__main__":
    main()
