"""The engines the multi-stream runtime is compared with: a registry of builders, each engine built once in
a child process pinned (before its runtime starts) to exactly the CPUs the multi-stream plan uses, with
that many threads, and timed there on request, round after round (`PinnedEngine`, driven by
`parnet_cpu.bench.rounds`). "Engine" here means a competing backend; the OpenVINO compile helper the
runtime itself uses is `parnet_cpu.runtime.engine`.

- ov-latency      OpenVINO single graph, LATENCY hint, threads = all cores of the plan
- ov-throughput   OpenVINO single graph, THROUGHPUT hint (several streams = replicas), async requests
- torch-eager     PyTorch eager FP32, deploy form, torch threads = cores
- ort-parallel    ONNX Runtime FP32, ORT_PARALLEL (inter-op 3 = branches, intra-op = cores per stream)
- ort-int8        ONNX Runtime INT8: the same ONNX statically quantized (QDQ, per-channel weights) by
                  `onnxruntime.quantization.quantize_static`, calibrated on the same images (`--calib`)
- <backend>-int8  each quantization backend's own INT8 artifact (`quantize --backend torch|ipex`), from the
                  backend registry (`parnet_cpu.quantization.base`): torch-int8 (PT2E + torch.compile),
                  ipex-int8 (IPEX static INT8, IPEX environment only)

A new engine is one `@engine("name")` builder here. `multistream` and `auto` (the runtime itself) run
in-process (`parnet_cpu.bench.runner`).
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from parnet_cpu.artifacts import DEPLOY_WEIGHTS, ONNX_FILE, ModelDir
from parnet_cpu.bench.base import throughput
from parnet_cpu.quantization.base import backend_for_engine, bench_engines, quantization_engines
from parnet_cpu.perf.pinned import PinnedChildError, PinnedChildTimeout
from parnet_cpu.runtime.timing import measure_latency

ENGINE_TIMEOUT_S = 1800.0  # one engine's build, or one round of it; a hung child is killed after this
CALIBRATION_LIMIT = 300  # images ort-int8 calibrates on at most (quantize's default --subset-size)


@dataclass(frozen=True)
class EngineSpec:
    """What an engine builder gets, inside its pinned child."""

    model_dir: str
    precision: str
    threads: int
    onnx_path: str | None = None
    calib_dir: str | None = None


# name -> builder(spec) -> (sync_infer(x), async_run(n_requests, x) or None, info)
BUILDERS: dict[str, Callable] = {}


def engine(*names: str):
    """Register an engine builder under `names` (the builder gets the name as its first argument)."""
    def register(fn):
        for n in names:
            BUILDERS[n] = fn
        return fn
    return register


@engine("ov-latency", "ov-throughput")
def build_openvino(name: str, spec: EngineSpec):
    import openvino as ov

    from parnet_cpu.runtime.engine import CompileOptions, compile_model

    hint = "LATENCY" if name == "ov-latency" else "THROUGHPUT"
    compiled = compile_model(ModelDir.open(spec.model_dir).ir_path(spec.precision),
                             CompileOptions(precision=spec.precision, hint=hint, num_threads=spec.threads))
    nreq = compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")
    info = {"hint": hint, "infer_requests": nreq, "streams": int(compiled.get_property("NUM_STREAMS")),
            "kernels": conv_kernels(compiled)}
    if name == "ov-latency":
        return (lambda x: compiled(x)), None, info
    queue = ov.AsyncInferQueue(compiled, nreq)

    def run_async(n, x):
        for _ in range(n):
            queue.start_async({0: x})
        queue.wait_all()

    return (lambda x: compiled(x)), run_async, info


def conv_kernels(compiled) -> list[str]:
    """The oneDNN kernels OpenVINO runs the convolutions with, read from the runtime graph."""
    from parnet_cpu.runtime.engine import runtime_layers

    return sorted({l["kernel"] for l in runtime_layers(compiled) if l["type"] == "Convolution"})


@engine("torch-eager")
def build_torch_eager(name: str, spec: EngineSpec):
    import torch

    from parnet_cpu.export import load_deploy_model

    torch.set_num_threads(spec.threads)
    model = load_deploy_model(spec.model_dir)

    def infer(x):
        with torch.inference_mode():
            return model(torch.from_numpy(x))

    return infer, None, {"precision": "fp32", "torch_threads": spec.threads}


def ort_session(path: str, threads: int, parallel: bool):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if parallel:
        so.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        so.inter_op_num_threads = 3
        so.intra_op_num_threads = max(1, threads // 3)
    else:
        so.intra_op_num_threads = threads
    session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return (lambda x: session.run(None, {name: x})), so


@engine("ort-parallel")
def build_ort_parallel(name: str, spec: EngineSpec):
    import onnxruntime as ort

    infer, so = ort_session(spec.onnx_path, spec.threads, parallel=True)
    return infer, None, {"precision": "fp32", "inter_op": 3, "intra_op": so.intra_op_num_threads,
                         "ort": ort.__version__}


class _RootWarnings:
    """Collects what is logged on the root logger meanwhile (ONNX Runtime's quantizer logs one warning per
    bias tensor there) instead of printing it over the progress lines."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def filter(self, record) -> bool:
        self.messages.append(record.getMessage())
        return False

    def __enter__(self) -> "_RootWarnings":
        logging.getLogger().addFilter(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger().removeFilter(self)

    def summary(self) -> dict:
        return {"count": len(self.messages), "first": self.messages[:3]}


@engine("ort-int8")
def build_ort_int8(name: str, spec: EngineSpec):
    """ONNX Runtime's own INT8: static QDQ quantization of the same ONNX, weights per channel (s8),
    activations u8 (U8S8, the x86 combination ONNX Runtime's MLAS kernels are built for: with s8
    activations only ParNet-S's 22 SE convolutions became QLinearConv and the other 22 stayed float; with
    u8, 34 of 44 plus the SiLU multiplies and adds run quantized), MinMax calibration on the same images,
    sequential execution on all the threads."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from parnet_cpu.data import bundled_calibration_dir, list_images, load_paths

    md = ModelDir.open(spec.model_dir)
    folder = Path(spec.calib_dir) if spec.calib_dir else bundled_calibration_dir()
    images = list_images(folder, recursive=True)[:CALIBRATION_LIMIT] if folder else []
    if not images:
        raise ValueError(f"ort-int8 needs calibration images: none found in {folder} (--calib DIR)")
    pcfg = md.preprocess_config()
    input_name = ort.InferenceSession(spec.onnx_path, providers=["CPUExecutionProvider"]).get_inputs()[0].name

    class Images(CalibrationDataReader):
        def __init__(self):
            self.it = iter(images)

        def get_next(self):
            path = next(self.it, None)
            return None if path is None else {input_name: load_paths([path], pcfg)}

    notes = _RootWarnings()  # the quantizer warns per tensor on the root logger: kept in the row, not printed
    with tempfile.TemporaryDirectory(prefix="parnet-ort-int8-") as tmp, notes:  # the session keeps the model
        out = Path(tmp) / "model_int8_qdq.onnx"
        quantize_static(spec.onnx_path, str(out), Images(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        infer, so = ort_session(str(out), spec.threads, parallel=False)
    return infer, None, {"precision": "int8", "quantization": "static QDQ (U8S8), per-channel s8 weights, u8 activations, MinMax",
                         "calibration_images": len(images), "calibration_dir": str(folder),
                         "quantizer_warnings": notes.summary(),
                         "intra_op": so.intra_op_num_threads, "ort": ort.__version__}


def build_backend_int8(name: str, spec: EngineSpec):
    import torch

    torch.set_num_threads(spec.threads)
    backend = backend_for_engine(name)
    compiled = backend.compile(Path(spec.model_dir), "int8")
    return compiled, None, {"precision": "int8", "torch_threads": spec.threads, **backend.versions()}


for _name in quantization_engines():  # torch-int8, ipex-int8: from the quantization backend registry
    BUILDERS[_name] = build_backend_int8

DEFAULT_ENGINES = ("multistream", "auto", "ov-latency", "ov-throughput", "torch-eager", "ort-parallel", "ort-int8")
ENGINES = DEFAULT_ENGINES + tuple(n for n in BUILDERS if n not in DEFAULT_ENGINES)
NEEDS_ONNX = ("ort-parallel", "ort-int8")
INT8_ENGINES = ("ort-int8",) + quantization_engines()  # run their own INT8, whatever --precision says


def make_engine(name: str, spec: EngineSpec):
    """(sync_infer(x), async_run(n, x) or None, info) for one engine, built inside the pinned process."""
    if name not in BUILDERS:
        raise ValueError(f"unknown engine {name!r}")
    return BUILDERS[name](name, spec)


def missing_inputs(md: ModelDir, engine: str) -> str | None:
    """Why `engine` cannot run on this folder (a file it builds from is absent), or None. The torch and ONNX
    baselines are built from the deploy-form weights (or the folder's ONNX), which a serving-only folder lacks."""
    deploy = (md.path / DEPLOY_WEIGHTS).is_file()
    if engine == "torch-eager" and not deploy:
        need = DEPLOY_WEIGHTS
    elif engine in NEEDS_ONNX and not deploy and not (md.path / ONNX_FILE).is_file():
        need = f"{ONNX_FILE} or {DEPLOY_WEIGHTS}"
    else:
        return None
    slim = md.manifest.get("serving_only")
    why = " (a serving-only folder: `parnet-cpu slim` removed it; bench the folder quantize wrote)" if slim else ""
    return f"needs {need}, which {md.path} does not have{why}"


def available_engines(md: ModelDir) -> tuple[str, ...]:
    """The built-in engines plus the INT8 engine of every backend whose artifact is in the folder and runs here."""
    return DEFAULT_ENGINES + bench_engines(md.path)


def _engine_child(name: str, spec: EngineSpec, cpus: list[int], conn) -> None:
    """The pinned child: build the engine once, then time it whenever the parent asks (one round)."""
    from parnet_cpu.system.affinity import pin_process

    try:
        pin_process(cpus)
        infer, run_async, info = make_engine(name, spec)
        shape = ModelDir.open(spec.model_dir).input_shape()
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ok", info))
    inputs: dict[int, np.ndarray] = {}
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg[0] == "stop":
            return
        _, batch, warmup, iters, min_seconds = msg
        try:
            x = inputs.setdefault(batch, np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32))
            stats = measure_latency(lambda: infer(x), warmup, iters, min_seconds, batch=batch)
            if run_async is not None:
                n = max(8, info.get("infer_requests", 1) * 4)
                stats["throughput_ips"] = throughput(lambda k: run_async(k, x), n, batch)
            conn.send(("ok", stats))
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class PinnedEngine:
    """One engine built once in a spawned child pinned to `cpus` (`len(cpus)` threads) and timed on request,
    so engines can be measured in alternating rounds. The parent holds the only pipe end to the child:
    a child that dies makes `recv` see end-of-file at once; one that does not answer is killed."""

    def __init__(self, name: str, spec: EngineSpec, cpus: list[int], timeout_s: float = ENGINE_TIMEOUT_S) -> None:
        ctx = mp.get_context("spawn")
        self.name, self.timeout_s = name, timeout_s
        self._conn, child_end = ctx.Pipe()
        self._proc = ctx.Process(target=_engine_child, args=(name, spec, list(cpus), child_end), daemon=True)
        self._proc.start()
        child_end.close()
        try:
            self.info: dict = self._answer("building")
        except PinnedChildError:
            self.close()
            raise

    def _answer(self, doing: str):
        if not self._conn.poll(self.timeout_s):
            self._proc.kill()
            raise PinnedChildTimeout(f"{self.name}: no answer in {self.timeout_s:g} s while {doing} (child killed)")
        try:
            status, payload = self._conn.recv()
        except EOFError:
            self._proc.join(timeout=5)
            raise PinnedChildError(f"{self.name}: the child process died while {doing} "
                                   f"(exit code {self._proc.exitcode})") from None
        if status != "ok":
            raise PinnedChildError(payload)
        return payload

    def measure(self, batch: int, warmup: int, iters: int, min_seconds: float) -> dict:
        """One round: `measure_latency` of the engine at `batch` (plus async throughput where it has one)."""
        self._conn.send(("time", batch, warmup, iters, min_seconds))
        return self._answer(f"timing batch {batch}")

    def close(self) -> None:
        try:
            self._conn.send(("stop",))
        except (OSError, ValueError):
            pass
        self._conn.close()
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=5)

    def __enter__(self) -> "PinnedEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_pinned_engine(name: str, model_dir: str | Path, precision: str, cpus: list[int], cfg,
                      onnx_path: str | None, calib_dir: str | None = None) -> list[dict]:
    """One engine on its own, one round per batch (`bench` interleaves engines through `PinnedEngine`);
    a failure is an error row per batch."""
    spec = EngineSpec(str(model_dir), precision, len(cpus), onnx_path, calib_dir)
    try:
        with PinnedEngine(name, spec, cpus) as eng:
            return [{"engine": name, **eng.info, **eng.measure(b, cfg.warmup, cfg.iters, cfg.min_seconds)}
                    for b in cfg.batches]
    except PinnedChildError as exc:
        return [{"engine": name, "batch": b, "error": str(exc)} for b in cfg.batches]


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
