"""The engines the multi-stream runtime is compared with, each timed in a child process pinned (before its
runtime starts) to exactly the CPUs the multi-stream plan uses, with that many threads
(`parnet_cpu.runtime.pinned`). "Engine" here means a competing backend; the OpenVINO compile helper the
runtime itself uses is `parnet_cpu.runtime.engine`.

- ov-latency      OpenVINO single graph, LATENCY hint, threads = all cores of the plan
- ov-throughput   OpenVINO single graph, THROUGHPUT hint (several streams), async requests
- torch-eager     PyTorch eager FP32, deploy form, torch threads = cores
- ort-parallel    ONNX Runtime FP32, ORT_PARALLEL (inter-op 3 = branches, intra-op = cores per stream)
- <backend>-int8  each quantization backend's own INT8 artifact (`quantize --backend torch|ipex`), from the
                  backend registry (`parnet_cpu.quantization.base`): torch-int8 (PT2E + torch.compile),
                  ipex-int8 (IPEX static INT8, IPEX environment only)

`multistream` and `auto` (the runtime itself) are run in-process by `parnet_cpu.bench.runner`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from parnet_cpu.artifacts import ONNX_FILE, ModelDir
from parnet_cpu.bench.base import BenchConfig, throughput
from parnet_cpu.quantization.base import backend_for_engine, bench_engines, quantization_engines
from parnet_cpu.runtime.pinned import PinnedChildError, run_pinned
from parnet_cpu.runtime.timing import measure_latency

DEFAULT_ENGINES = ("multistream", "auto", "ov-latency", "ov-throughput", "torch-eager", "ort-parallel")
ENGINES = DEFAULT_ENGINES + quantization_engines()  # + each backend's INT8 engine (torch-int8, ipex-int8)
ENGINE_TIMEOUT_S = 1800.0  # one engine's build and every batch's timing; a hung child is killed after this


def make_engine(engine: str, model_dir: str, precision: str, threads: int, onnx_path: str | None):
    """Returns (sync_infer(x), async_run(n_requests, x), info) for one engine, built inside the pinned process."""
    if engine in ("ov-latency", "ov-throughput"):
        import openvino as ov

        from parnet_cpu.runtime.engine import CompileOptions, compile_model

        hint = "LATENCY" if engine == "ov-latency" else "THROUGHPUT"
        compiled = compile_model(ModelDir.open(model_dir).ir_path(precision),
                                 CompileOptions(precision=precision, hint=hint, num_threads=threads))
        nreq = compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")
        queue = ov.AsyncInferQueue(compiled, nreq)

        def run_async(n, x):
            for _ in range(n):
                queue.start_async({0: x})
            queue.wait_all()

        return (lambda x: compiled(x)), run_async, {"hint": hint, "infer_requests": nreq}
    if engine == "torch-eager":
        import torch

        from parnet_cpu.export import load_deploy_model

        torch.set_num_threads(threads)
        model = load_deploy_model(model_dir)

        def infer(x):
            with torch.inference_mode():
                return model(torch.from_numpy(x))

        return infer, (lambda n, x: [infer(x) for _ in range(n)]), {"precision": "fp32", "torch_threads": threads}
    if engine == "ort-parallel":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        so.inter_op_num_threads = 3
        so.intra_op_num_threads = max(1, threads // 3)
        session = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def infer(x):
            return session.run(None, {name: x})

        return infer, (lambda n, x: [infer(x) for _ in range(n)]), {
            "precision": "fp32", "inter_op": 3, "intra_op": so.intra_op_num_threads, "ort": ort.__version__}
    if engine in quantization_engines():
        import torch

        torch.set_num_threads(threads)
        backend = backend_for_engine(engine)
        compiled = backend.compile(Path(model_dir), "int8")
        return compiled, (lambda n, x: [compiled(x) for _ in range(n)]), {
            "precision": "int8", "torch_threads": threads, **backend.versions()}
    raise ValueError(f"unknown engine {engine!r}")


def available_engines(md: ModelDir) -> tuple[str, ...]:
    """The built-in engines plus the INT8 engine of every backend whose artifact is in the folder and runs here."""
    return DEFAULT_ENGINES + bench_engines(md.path)


def time_engine(engine: str, model_dir: str, precision: str, threads: int, batches, cfg: BenchConfig,
                onnx_path: str | None) -> list[dict]:
    """Run in a pinned child (`run_pinned`): build `engine` with `threads` threads, one row per batch."""
    infer, run_async, info = make_engine(engine, model_dir, precision, threads, onnx_path)
    shape = ModelDir.open(model_dir).input_shape()
    rows = []
    for b in batches:
        x = np.random.default_rng(0).standard_normal((b, *shape)).astype(np.float32)
        stats = measure_latency(lambda: infer(x), cfg.warmup, cfg.iters, cfg.min_seconds, batch=b)
        if engine == "ov-throughput":
            n = max(8, info["infer_requests"] * 4)
            stats["throughput_ips"] = throughput(lambda k: run_async(k, x), n, b)
        rows.append({"engine": engine, **info, **stats})
    return rows


def run_pinned_engine(engine: str, model_dir: Path, precision: str, cpus: list[int], cfg: BenchConfig,
                      onnx_path: str | None) -> list[dict]:
    """One engine's rows, timed in a child pinned to `cpus`; a failure (raised, crashed or hung child) is
    reported as an error row per batch and the benchmark goes on."""
    try:
        return run_pinned(time_engine, (engine, str(model_dir), precision, len(cpus), cfg.batches, cfg, onnx_path),
                          cpus, timeout_s=ENGINE_TIMEOUT_S, what=engine)
    except PinnedChildError as exc:
        return [{"engine": engine, "batch": b, "error": str(exc)} for b in cfg.batches]


def export_onnx_for(md: ModelDir, folder: Path) -> str | None:
    """The ONNX file of the model folder, or one exported now from its deploy-form weights."""
    if (md.path / ONNX_FILE).is_file():
        return str(md.path / ONNX_FILE)
    try:
        from parnet_cpu.export import load_deploy_model, to_onnx
    except ImportError:
        return None
    path = folder / ONNX_FILE
    to_onnx(load_deploy_model(md.path), path)
    return str(path)
