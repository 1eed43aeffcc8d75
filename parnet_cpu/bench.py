"""`parnet-cpu bench`: the multi-stream runtime against the best single-graph execution, same cores.

Every engine except the multi-stream runtime runs in its own spawned process pinned (before its
runtime starts) to exactly the CPUs the multi-stream plan uses, with that many threads; the runtime
pins its own workers. Rows:

- multistream     `Runtime` (stem+tail on all groups' cores, one stream per group)
- auto            `Runtime(plan="auto")` on the same cores: whichever plan measured faster at load (the default)
- ov-latency      OpenVINO single graph, LATENCY hint, threads = all cores of the plan
- ov-throughput   OpenVINO single graph, THROUGHPUT hint (several streams), async requests
- torch-eager     PyTorch eager FP32, deploy form, torch threads = cores
- ort-parallel    ONNX Runtime FP32, ORT_PARALLEL (inter-op 3 = branches, intra-op = cores per stream)
- torch-int8      PT2E INT8 program through torch.compile (`quantize --backend torch`)
- ipex-int8       IPEX static INT8, TorchScript (`quantize --backend ipex`, IPEX environment only)
"""
from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from parnet_cpu.artifacts import ONNX_FILE, ModelDir
from parnet_cpu.runtime.timing import measure_latency

ENGINES = ("multistream", "auto", "ov-latency", "ov-throughput", "torch-eager", "ort-parallel", "torch-int8", "ipex-int8")
DEFAULT_ENGINES = ENGINES[:6]  # + torch-int8 / ipex-int8 where the model folder has their INT8 artifact


@dataclass(frozen=True)
class BenchConfig:
    batches: tuple[int, ...] = (1, 8)
    warmup: int = 2
    iters: int = 10
    min_seconds: float = 0.2
    engines: tuple[str, ...] | None = None  # None: DEFAULT_ENGINES plus the INT8 artifacts present


def _throughput(run_one, n_requests: int, batch: int) -> float:
    t0 = time.perf_counter()
    run_one(n_requests)
    return n_requests * batch / (time.perf_counter() - t0)


def _make_engine(engine: str, model_dir: str, precision: str, threads: int, onnx_path: str | None):
    """Returns (sync_infer(x), async_run(n_requests, x)) for one engine, built inside the pinned process."""
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
    if engine in ("torch-int8", "ipex-int8"):
        import torch

        from parnet_cpu.quantization.ptq import get_backend

        torch.set_num_threads(threads)
        backend = get_backend(engine.split("-")[0])
        compiled = backend.compile(Path(model_dir), "int8")
        return compiled, (lambda n, x: [compiled(x) for _ in range(n)]), {
            "precision": "int8", "torch_threads": threads, **backend.versions()}
    raise ValueError(f"unknown engine {engine!r}")


def available_engines(md: ModelDir) -> tuple[str, ...]:
    import importlib.util

    from parnet_cpu.artifacts import TORCH_INT8_FILE
    from parnet_cpu.quantization.ipex_backend import IPEX_INT8_FILE

    extra = []
    if (md.path / TORCH_INT8_FILE).is_file():
        extra.append("torch-int8")
    if (md.path / IPEX_INT8_FILE).is_file() and importlib.util.find_spec("intel_extension_for_pytorch"):
        extra.append("ipex-int8")
    return DEFAULT_ENGINES + tuple(extra)


def _engine_main(engine, model_dir, precision, cpus, batches, cfg, onnx_path, conn) -> None:
    from parnet_cpu.runtime.worker import pin_process

    pin_process(cpus)
    try:
        infer, run_async, info = _make_engine(engine, model_dir, precision, len(cpus), onnx_path)
        shape = ModelDir.open(model_dir).input_shape()
        rows = []
        for b in batches:
            x = np.random.default_rng(0).standard_normal((b, *shape)).astype(np.float32)
            stats = measure_latency(lambda: infer(x), cfg.warmup, cfg.iters, cfg.min_seconds, batch=b)
            if engine == "ov-throughput":
                n = max(8, info["infer_requests"] * 4)
                stats["throughput_ips"] = _throughput(lambda k: run_async(k, x), n, b)
            rows.append({"engine": engine, **info, **stats})
        conn.send(("ok", rows))
    except Exception as exc:  # reported as a row, the benchmark goes on
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


def run_pinned_engine(engine: str, model_dir: Path, precision: str, cpus: list[int], cfg: BenchConfig,
                      onnx_path: str | None) -> list[dict]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_engine_main, args=(engine, str(model_dir), precision, cpus, cfg.batches, cfg,
                                                  onnx_path, child), daemon=True)
    proc.start()
    status, payload = parent.recv()
    proc.join(timeout=30)
    if status != "ok":
        return [{"engine": engine, "batch": b, "error": payload} for b in cfg.batches]
    return payload


def bench_runtime(rt, cfg: BenchConfig, engine: str = "multistream") -> list[dict]:
    from parnet_cpu.runtime.runtime import StageStats

    rows = []
    for b in cfg.batches:
        x = np.random.default_rng(0).standard_normal((b, *rt.input_shape)).astype(np.float32)
        rt.stats = StageStats()
        stats = measure_latency(lambda: rt.infer(x), cfg.warmup, cfg.iters, cfg.min_seconds, batch=b)
        stages = {k: v["median_ms"] for k, v in rt.stats.summary().items()}
        critical = stages.get("stem", 0) + max(stages.get(f"stream{i}", 0) for i in (1, 2, 3)) + stages.get("tail", 0)
        stats["stage_median_ms"] = stages
        # what is left besides the critical path: messages, copies, scheduling, and, where the groups
        # overlap, streams slowing each other down
        stats["overhead_ms"] = stats["median_ms"] - critical
        n = max(8, 4 * rt.inflight)

        def run_many(k):
            for f in [rt.submit(x) for _ in range(k)]:
                f.result()

        stats["throughput_ips"] = _throughput(run_many, n, b)
        rows.append({"engine": engine, "plan": rt.plan.kind, "plan_reason": rt.plan.reason, "inflight": rt.inflight,
                     **stats})
    rows[0]["message_round_trip_ms"] = rt.message_round_trip_ms()
    return rows


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


def run_bench(model_dir: str | Path, cores_per_stream, cores, precision: str | None, cfg: BenchConfig,
              use_smt: bool = False, with_cost_model: bool = False, log=print) -> dict:
    from parnet_cpu.runtime.runtime import Runtime
    from parnet_cpu.system.cpuinfo import describe_machine, format_cpu_list

    md = ModelDir.open(model_dir)
    precision = precision or ("int8" if "int8" in md.precisions else "fp32")
    engines = cfg.engines or available_engines(md)
    rows: list[dict] = []
    plan_info, cpus = None, None
    if "multistream" in engines:
        log("multistream: starting pinned workers ...")
        try:
            with Runtime(md.path, cores_per_stream=cores_per_stream, cores=cores, precision=precision,
                         plan="multistream", use_smt=use_smt, max_batch=max(cfg.batches)) as rt:
                plan_info, cpus = rt.plan.describe(), rt.plan.cpus
                rows += bench_runtime(rt, cfg)
        except Exception as exc:
            rows += [{"engine": "multistream", "batch": b, "error": str(exc)} for b in cfg.batches]
    if "auto" in engines:
        log("auto: starting the runtime with plan='auto' (measures both plans at load unless cached) ...")
        try:
            with Runtime(md.path, cores_per_stream=cores_per_stream, cores=cores, precision=precision,
                         plan="auto", use_smt=use_smt, max_batch=max(cfg.batches)) as rt:
                cpus = cpus or rt.plan.cpus
                rows += bench_runtime(rt, cfg, "auto")
        except Exception as exc:
            rows += [{"engine": "auto", "batch": b, "error": str(exc)} for b in cfg.batches]
    if cpus is None:
        cpus = sorted(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx_for(md, Path(tmp)) if "ort-parallel" in engines else None
        for engine in engines:
            if engine in ("multistream", "auto"):
                continue
            log(f"{engine}: pinned to CPUs {format_cpu_list(cpus)} ...")
            rows += run_pinned_engine(engine, md.path, precision, cpus, cfg, onnx_path)
    for r in rows:
        r.setdefault("precision", precision)
    baseline = {r["batch"]: r for r in rows if r["engine"] == "ov-latency" and "error" not in r}
    for r in rows:
        base = baseline.get(r["batch"])
        if base and "error" not in r:
            r["latency_ratio_vs_ov_latency"] = r["median_ms"] / base["median_ms"]
            r["throughput_ratio_vs_ov_latency"] = r["throughput_ips"] / base["throughput_ips"]
    info = describe_machine()
    model = None
    if with_cost_model:
        from parnet_cpu.runtime.costmodel import cost_model

        log("cost model: timing every stage at 1..N threads ...")
        # a request crosses three hand-overs (stem -> streams -> tail -> caller), each a message round trip
        rtt = next((r["message_round_trip_ms"] for r in rows if "message_round_trip_ms" in r), None)
        model = cost_model(md.path, precision, handover_ms=3 * rtt if rtt is not None else 0.0)
        model["handover_source"] = ("3 x measured parent-worker message round trip" if rtt is not None
                                    else "not measured (no multi-stream run): 0")
    return {"cost_model": model, "model": str(md.path), "config": md.config, "precision": precision, "cpus": format_cpu_list(cpus),
            "threads": len(cpus), "plan": plan_info, "settings": asdict(cfg),
            "machine": {"cpu": info.model_name, "isa_level": info.isa_level, "usable_cpus": info.usable_cpus,
                        "physical_cores": info.physical_cores, "openvino": info.openvino.version if info.openvino else None},
            "rows": rows, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


def format_cost_model(cm: dict) -> str:
    lines = [f"cost model ({cm['caveat']}; handover {cm['handover_ms']:.2f} ms):"]
    for p in cm["predictions"]:
        if "multistream_ms" in p:
            lines.append(f"  {p['cores']:>3} cores: single {p['single_ms']:.2f} ms, multi-stream {p['multistream_ms']:.2f} ms "
                         f"(groups {'/'.join(map(str, p['groups']))}) -> ratio {p['ratio_multi_vs_single']:.2f}")
    return "\n".join(lines)


def format_table(result: dict) -> str:
    head = f"{'engine':<14}{'prec':<6}{'batch':>5}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'img/s':>9}{'lat x':>7}{'thr x':>7}"
    lines = [f"CPU: {result['machine']['cpu']} ({result['machine']['isa_level']}), CPUs {result['cpus']}, "
             f"{result['threads']} threads; ratios are against ov-latency (single graph, same cores)", head]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"{r['engine']:<14}{r.get('precision', ''):<6}{r['batch']:>5}  error: {r['error'][:70]}")
            continue
        lines.append(f"{r['engine']:<14}{r['precision']:<6}{r['batch']:>5}{r['median_ms']:>9.2f}{r['p90_ms']:>9.2f}"
                     f"{r['p99_ms']:>9.2f}{r['throughput_ips']:>9.1f}"
                     f"{r.get('latency_ratio_vs_ov_latency', float('nan')):>7.2f}"
                     f"{r.get('throughput_ratio_vs_ov_latency', float('nan')):>7.2f}")
    return "\n".join(lines)


def cores_per_stream_of(result: dict) -> float:
    """Mean stream-group size of the multi-stream plan (all threads / 3 when there was none)."""
    plan = result.get("plan")
    if plan:
        from parnet_cpu.system.cpuinfo import parse_cpu_list

        sizes = [len(parse_cpu_list(w["cpus"])) for w in plan["workers"] if w["name"].startswith("stream")]
        return sum(sizes) / len(sizes)
    return result["threads"] / 3


def _bar_label(res: dict, row: dict, sweeping: bool) -> str:
    label = f"{row['engine']} {row['precision']}"
    if sweeping and row["engine"] in ("multistream", "auto"):
        label += f" ({cores_per_stream_of(res):g}/stream)"
    return label


def plot(results: list[dict], path: Path) -> None:
    """Bar chart a person can read at a glance: median latency and throughput of every engine, one
    group of bars per batch size, values printed on the bars, the CPU and model in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeping = len(results) > 1
    batches = results[0]["settings"]["batches"]
    labels: list[str] = []
    values: dict[tuple[str, int], tuple[float, float]] = {}
    for res in results:
        for r in res["rows"]:
            if "error" in r:
                continue
            label = _bar_label(res, r, sweeping)
            if label not in labels:
                labels.append(label)
            values[(label, r["batch"])] = (r["median_ms"], r["throughput_ips"])
    fig, axes = plt.subplots(1, 2, figsize=(max(9.0, 1.4 * len(labels) * len(batches)), 4.6))
    width = 0.8 / max(1, len(batches))
    for ax, idx, title, unit in ((axes[0], 0, "median latency (lower is better)", "ms"),
                                 (axes[1], 1, "throughput (higher is better)", "images/s")):
        for j, b in enumerate(batches):
            xs = [i + (j - (len(batches) - 1) / 2) * width for i in range(len(labels))]
            ys = [values.get((lab, b), (float("nan"), float("nan")))[idx] for lab in labels]
            bars = ax.bar(xs, ys, width, label=f"batch {b}")
            ax.bar_label(bars, labels=[f"{y:.3g}" if y == y else "" for y in ys], fontsize=7, padding=1)
        ax.set_xticks(range(len(labels)), labels, rotation=25, ha="right", fontsize=8)
        ax.set(title=title, ylabel=unit)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    first = results[0]
    fig.suptitle(f"{Path(first['model']).name} ({first['precision']}) on {first['machine']['cpu']} "
                 f"({first['machine']['isa_level']}), CPUs {first['cpus']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
