"""`Runtime`: ParNet's three streams on their own pinned core groups, running concurrently.

One request flows stem -> (stream 1 | stream 2 | stream 3 in parallel) -> tail. Each core group is a
worker process (see `worker.py`); the stem and the tail run in a worker pinned to all the groups'
cores together; a single-graph plan that owns every CPU of the process runs in the process itself.
Several requests can be in flight (`inflight` slots), so the stem of request k+1 can
run while the streams of request k do. With workers, the parent only moves small messages and copies the
input in and the logits out.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import platform
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from multiprocessing.connection import wait
from pathlib import Path
from typing import Sequence

import numpy as np

from parnet_cpu.artifacts import INPUT_NAME, OUTPUT_NAME, ModelDir
from parnet_cpu.runtime.cores import (CoreClaim, CoreSpecError, available_cores, no_free_cores_message, plan_groups,
                                      proportional_sizes, validate_groups)
from parnet_cpu.runtime.partition import RECOMPUTE_STAGES, SHARE_STAGES, SINGLE_STAGES, Stage
from parnet_cpu.runtime.worker import TensorSlot, WorkerSpec, thread_affinities, worker_main

PLAN_CACHE = "plan_cache.json"
STREAM_STAGES = ("stream1", "stream2", "stream3")


class RuntimeClosedError(RuntimeError):
    pass


@dataclass
class Plan:
    """Which stages run on which CPUs."""

    kind: str  # "multistream" | "single"
    workers: list[tuple[str, list[int], tuple[Stage, ...]]]  # (name, cpus, stages)
    inits1: str = "recompute"
    reason: str = ""

    @property
    def cpus(self) -> list[int]:
        return sorted({c for _, cpus, _ in self.workers for c in cpus})

    def describe(self) -> dict:
        from parnet_cpu.system.cpuinfo import format_cpu_list

        return {"kind": self.kind, "inits1": self.inits1, "reason": self.reason,
                "workers": [{"name": n, "cpus": format_cpu_list(c), "stages": [s.name for s in st]}
                            for n, c, st in self.workers]}


def stage_macs(ir_path: Path, stages: Sequence[Stage]) -> dict[str, float]:
    """Multiply-accumulates of each stage at batch 1 (convolutions and the classifier), from the IR:
    the cost used to size core groups in proportion to the work of each stream."""
    from parnet_cpu.runtime.partition import cut_stage

    out = {}
    for stage in stages:
        total = 0.0
        for op in cut_stage(ir_path, stage).get_ops():
            kind = op.get_type_name()
            if kind in ("Convolution", "GroupConvolution", "MatMul"):
                oshape = op.get_output_partial_shape(0)
                wshape = op.input_value(1).get_partial_shape()
                if oshape.is_static or all(d.is_static for d in list(oshape)[1:]):
                    o = np.prod([d.get_length() for d in list(oshape)[1:]])
                    w = [d.get_length() for d in wshape]
                    per_out = np.prod(w[2:]) if kind != "MatMul" else w[-1]
                    if kind == "GroupConvolution":
                        per_out = np.prod(w[2:])
                    total += float(o * per_out)
        out[stage.name] = total
    return out


def make_plan(md: ModelDir, ir_path: Path, cores_per_stream: int | str | None, cores: list[list[int]] | None,
              use_smt: bool, inits1: str, kind: str) -> Plan:
    """Core groups for the streams (explicit, fixed size, or in proportion to cost) and the stage layout."""
    stages = SHARE_STAGES if inits1 == "share" else RECOMPUTE_STAGES
    if kind == "single":
        if cores:
            cpus = sorted({c for g in cores for c in g})
        elif isinstance(cores_per_stream, int):
            cpus = sorted(c for g in plan_groups(3, cores_per_stream, use_smt) for c in g)
        else:
            cpus = sorted(c for core in available_cores(use_smt) for c in core)
        if not cpus:
            raise CoreSpecError(no_free_cores_message())
        return Plan("single", [("model", cpus, SINGLE_STAGES)], inits1, "single graph on all given cores")
    if cores:
        if len(cores) != 3:
            raise CoreSpecError(f"--cores needs 3 groups (one per stream), got {len(cores)}")
        validate_groups(cores)
        groups, reason = [sorted(g) for g in cores], "explicit core groups"
    elif isinstance(cores_per_stream, int):
        groups, reason = plan_groups(3, cores_per_stream, use_smt), f"{cores_per_stream} cores per stream"
    else:
        total = len(available_cores(use_smt))
        if total < 3:
            raise CoreSpecError(f"multi-stream needs at least 3 physical cores, {total} usable")
        macs = stage_macs(ir_path, [s for s in stages if s.name in STREAM_STAGES or s.name == "inits1"])
        costs = [macs["stream1"], macs["stream2"] + macs.get("inits1", 0.0), macs["stream3"]]
        sizes = proportional_sizes(costs, total)
        groups = plan_groups(3, sizes, use_smt)
        reason = f"cores in proportion to stream cost (MACs {', '.join(f'{c / 1e6:.0f}M' for c in costs)})"
    union = sorted({c for g in groups for c in g})
    by_name = {s.name: s for s in stages}
    workers = [("stem+tail", union, (by_name["stem"], by_name["tail"])),
               ("stream1", groups[0], (by_name["stream1"],)),
               ("stream2", groups[1], tuple(by_name[n] for n in ("inits1", "stream2") if n in by_name)),
               ("stream3", groups[2], (by_name["stream3"],))]
    return Plan("multistream", workers, inits1, reason)


def _tensor_shapes(ir_path: Path, max_batch: int) -> dict[str, tuple[int, ...]]:
    from parnet_cpu.runtime.engine import core

    model = core().read_model(str(ir_path))
    shapes = {}
    for op in model.get_ops():
        for out in op.outputs():
            for name in out.get_names():
                ps = out.get_partial_shape()
                if name in (INPUT_NAME, OUTPUT_NAME, "stem", "inits1", *STREAM_STAGES) and op.get_type_name() != "Result":
                    shapes[name] = (max_batch,) + tuple(d.get_length() for d in list(ps)[1:])
    return shapes


@dataclass
class _Slot:
    index: int
    views: dict[str, np.ndarray]
    conns: dict[str, object]  # worker name -> parent end of this slot's pipe
    request: object = None  # in-process single graph: this slot's OpenVINO infer request


@dataclass
class StageStats:
    seconds: dict[str, list[float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, stage: str, s: float) -> None:
        with self.lock:
            lst = self.seconds.setdefault(stage, [])
            lst.append(s)
            if len(lst) > 10000:
                del lst[:5000]

    def summary(self) -> dict[str, dict[str, float]]:
        with self.lock:
            return {k: {"count": len(v), "median_ms": float(np.median(v) * 1e3)} for k, v in self.seconds.items() if v}


class Runtime:
    """Thread-safe ParNet inference on pinned core groups.

    >>> with Runtime("out/", cores_per_stream=4) as rt:
    ...     logits = rt.infer(images)           # (N, C, H, W) float32 -> (N, classes)
    ...     future = rt.submit(images)          # concurrent.futures.Future
    """

    def __init__(self, model_dir: str | Path, cores_per_stream: int | str | None = "auto",
                 cores: list[list[int]] | str | None = None, precision: str | None = None, plan: str = "auto",
                 inits1: str = "recompute", use_smt: bool = False, max_batch: int = 8, inflight: int = 2,
                 start_timeout: float = 300.0) -> None:
        if plan not in ("auto", "multistream", "single"):
            raise ValueError(f"plan must be auto, multistream or single, got {plan!r}")
        if inits1 not in ("recompute", "share"):
            raise ValueError("inits1 must be 'recompute' or 'share'")
        if isinstance(cores, str):
            from parnet_cpu.runtime.cores import parse_groups

            cores = parse_groups(cores)
        if isinstance(cores_per_stream, str) and cores_per_stream != "auto":
            raise CoreSpecError(f"cores_per_stream must be a positive integer or 'auto', got {cores_per_stream!r}")
        if isinstance(cores_per_stream, int) and cores_per_stream < 1:
            raise CoreSpecError("cores_per_stream must be at least 1")
        if max_batch < 1 or inflight < 1:
            raise ValueError("max_batch and inflight must be >= 1")
        self.model_dir = ModelDir.open(model_dir)
        self.precision = precision or ("int8" if "int8" in self.model_dir.precisions else "fp32")
        self.ir_path = self.model_dir.ir_path(self.precision)
        self.input_shape = self.model_dir.input_shape()
        self.max_batch, self.inflight = max_batch, inflight
        self.stats = StageStats()
        self._closed = False
        self._procs: list = []
        self._shms: list[shared_memory.SharedMemory] = []
        self._claim: CoreClaim | None = None
        self._start_timeout = start_timeout

        kind = "single" if plan == "single" else "multistream"
        try:
            self.plan = make_plan(self.model_dir, self.ir_path, cores_per_stream, cores, use_smt, inits1, kind)
        except CoreSpecError as exc:
            if plan != "auto" or cores:
                raise
            self.plan = make_plan(self.model_dir, self.ir_path, cores_per_stream, None, use_smt, inits1, "single")
            self.plan.reason = f"single graph: {exc}"
        self._claim = CoreClaim(set(self.plan.cpus), exclusive=not cores)
        try:
            self._start(self.plan)
            if plan == "auto" and self.plan.kind == "multistream":
                self._choose_plan(cores_per_stream, use_smt, inits1)
        except BaseException:
            self.close()
            raise
        self._executor = ThreadPoolExecutor(max_workers=inflight, thread_name_prefix="parnet-rt")

    # ------------------------------------------------------------------ start-up (not the hot path)
    @staticmethod
    def _in_process(plan: Plan) -> bool:
        """The single graph on every CPU this process may use needs no pinned worker (its threads cannot
        leave those CPUs anyway), so it runs here and saves the hand-over (~0.3 ms per call measured)."""
        return plan.kind == "single" and set(plan.cpus) == os.sched_getaffinity(0)

    def _start_in_process(self, plan: Plan) -> None:
        from parnet_cpu.runtime.engine import CompileOptions, compile_model

        self._compiled = compile_model(self.ir_path, CompileOptions(precision=self.precision,
                                                                    num_threads=len(plan.cpus), pinning=True))
        self._stages, self._stage_worker, self._stage_by_name = [], {}, {}
        self._slots = queue.Queue()
        for i in range(self.inflight):
            self._slots.put(_Slot(i, {}, {}, self._compiled.create_infer_request()))
        plan.reason += "; in this process (its CPUs are all the process may use: no hand-over)"

    def _start(self, plan: Plan) -> None:
        self._inproc = self._in_process(plan)  # decided once: the process's affinity may change later
        if self._inproc:
            return self._start_in_process(plan)
        shapes = _tensor_shapes(self.ir_path, self.max_batch)
        names = sorted({t for _, _, stages in plan.workers for s in stages for t in s.inputs + s.outputs})
        layout, views = [], []
        for _ in range(self.inflight):
            sizes = {n: int(np.prod(shapes[n])) * 4 for n in names}
            shm = shared_memory.SharedMemory(create=True, size=max(1, sum(sizes.values())))
            self._shms.append(shm)
            offset, slot_layout, slot_views = 0, {}, {}
            for n in names:
                slot_layout[n] = TensorSlot(shm.name, offset, shapes[n])
                slot_views[n] = np.ndarray(shapes[n], np.float32, buffer=shm.buf, offset=offset)
                offset += sizes[n]
            layout.append(slot_layout)
            views.append(slot_views)
        ctx = mp.get_context("spawn")
        pipes = {name: [ctx.Pipe() for _ in range(self.inflight)] for name, _, _ in plan.workers}
        for name, cpus, stages in plan.workers:
            spec = WorkerSpec(name, tuple(cpus), str(self.ir_path), self.precision, stages, tuple(layout))
            proc = ctx.Process(target=worker_main, args=(spec, [child for _, child in pipes[name]]),
                               name=f"parnet-{name}", daemon=True)
            proc.start()
            self._procs.append(proc)
        self._stage_worker = {s.name: name for name, _, stages in plan.workers for s in stages}
        self._stages = [s for _, _, stages in plan.workers for s in stages]
        order = [st.name for st in SHARE_STAGES + RECOMPUTE_STAGES + SINGLE_STAGES]
        self._stages.sort(key=lambda s: order.index(s.name))
        self._stage_by_name = {s.name: s for s in self._stages}
        self._slots: queue.Queue[_Slot] = queue.Queue()
        for i in range(self.inflight):
            self._slots.put(_Slot(i, views[i], {name: pipes[name][i][0] for name in pipes}))
        deadline = time.monotonic() + self._start_timeout
        for name in pipes:
            conn = pipes[name][0][0]
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"worker {name} did not start within {self._start_timeout:.0f} s")
            msg = conn.recv()
            if msg[0] != "ready":
                raise RuntimeError(f"worker {name} failed to start:\n{msg[2]}")

    def _stop_workers(self) -> None:
        for slot in list(self._slots.queue) if hasattr(self, "_slots") else []:
            for conn in slot.conns.values():
                try:
                    conn.send(None)
                except (OSError, ValueError):
                    pass
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        self._procs = []
        for shm in self._shms:
            shm.close()
            try:
                shm.unlink()
            except FileNotFoundError:
                pass
        self._shms = []
        self._compiled = None

    def _choose_plan(self, cores_per_stream, use_smt: bool, inits1: str) -> None:
        """`plan="auto"`: keep multi-stream only if it measures faster than the single graph on the
        same cores; the decision is cached per machine and model in the model folder."""
        key = self._cache_key()
        cache_path = self.model_dir.path / PLAN_CACHE
        cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
        if key in cache:
            choice = cache[key]["choice"]
        else:
            x = np.zeros((1, *self.input_shape), np.float32)
            multi = self._measure(x)
            cpus = self.plan.cpus
            self._stop_workers()
            single_plan = Plan("single", [("model", cpus, SINGLE_STAGES)], inits1, "")
            self._start(single_plan)
            single = self._measure(x)
            choice = "multistream" if multi < single else "single"
            cache[key] = {"choice": choice, "multistream_ms": multi * 1e3, "single_ms": single * 1e3,
                          "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
            try:
                cache_path.write_text(json.dumps(cache, indent=2))
            except OSError:
                pass  # read-only model folder: decide again next time
            if choice == "single":
                self.plan = Plan("single", single_plan.workers, inits1,
                                 f"auto: single graph measured faster ({single * 1e3:.2f} vs {multi * 1e3:.2f} ms)")
                return
            self._stop_workers()
            self._start(self.plan)
            self.plan.reason += f"; auto: multi-stream measured faster ({multi * 1e3:.2f} vs {single * 1e3:.2f} ms)"
            return
        if choice == "single":
            cpus = self.plan.cpus
            self._stop_workers()
            self.plan = Plan("single", [("model", cpus, SINGLE_STAGES)], inits1, f"auto (cached): single graph faster")
            self._start(self.plan)
        else:
            self.plan.reason += "; auto (cached): multi-stream faster"

    def _cache_key(self) -> str:
        import openvino as ov

        from parnet_cpu.system.cpuinfo import describe_machine

        info = describe_machine(query_openvino=False)
        digest = hashlib.sha256(self.ir_path.with_suffix(".bin").read_bytes()).hexdigest()[:16]
        return json.dumps([info.model_name, self.plan.cpus, self.precision, digest, ov.get_version(),
                           platform.node()])

    def _measure(self, x: np.ndarray, iters: int = 10) -> float:
        for _ in range(3):
            self._run(x)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            self._run(x)
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    # ------------------------------------------------------------------ hot path
    def _check(self, batch: np.ndarray) -> np.ndarray:
        if self._closed:
            raise RuntimeClosedError("this Runtime is closed")
        batch = np.asarray(batch)
        if batch.ndim == 3:
            batch = batch[None]
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self.input_shape:
            raise ValueError(f"expected images of shape (N, {', '.join(map(str, self.input_shape))}), "
                             f"got {tuple(batch.shape)}")
        if not 1 <= batch.shape[0] <= self.max_batch:
            raise ValueError(f"batch of {batch.shape[0]} images; this Runtime takes 1..{self.max_batch} "
                             "(raise max_batch)")
        if not np.issubdtype(batch.dtype, np.floating):
            raise ValueError(f"expected float32 images, got {batch.dtype}")
        return batch

    def _run(self, batch: np.ndarray) -> np.ndarray:
        n = batch.shape[0]
        slot = self._slots.get()
        try:
            if slot.request is not None:
                t0 = time.perf_counter()
                out = slot.request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)}, share_inputs=True)
                self.stats.add("model", time.perf_counter() - t0)
                return out[0]  # share_outputs=False: already the caller's own copy
            slot.views[INPUT_NAME][:n] = batch
            done, sent = {INPUT_NAME}, set()
            outstanding: dict[object, int] = {}  # worker connection -> stages sent, not yet answered
            while OUTPUT_NAME not in done:
                for st in self._stages:
                    if st.name not in sent and all(t in done for t in st.inputs):
                        conn = slot.conns[self._stage_worker[st.name]]
                        conn.send(("run", slot.index, st.name, n))
                        sent.add(st.name)
                        outstanding[conn] = outstanding.get(conn, 0) + 1
                busy = [c for c, k in outstanding.items() if k]
                if not busy:
                    raise RuntimeError("stage graph cannot make progress")
                for conn in wait(busy):
                    try:
                        msg = conn.recv()
                    except EOFError:
                        raise RuntimeError("a runtime worker process died; close and recreate the Runtime") from None
                    if msg[0] == "error":
                        raise RuntimeError(f"stage {msg[1]} failed in its worker:\n{msg[2]}")
                    outstanding[conn] -= 1
                    done.update(self._stage_by_name[msg[1]].outputs)
                    self.stats.add(msg[1], msg[2])
            return slot.views[OUTPUT_NAME][:n].copy()
        finally:
            self._slots.put(slot)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Logits for a batch of preprocessed images (N, C, H, W); blocks until done."""
        return self._run(self._check(batch))

    def submit(self, batch: np.ndarray) -> Future:
        """Queue a batch; returns a Future of its logits. Up to `inflight` batches run pipelined."""
        batch = self._check(batch)
        return self._executor.submit(self._run, batch)

    # ------------------------------------------------------------------ introspection and shutdown
    def thread_affinity(self) -> dict[str, dict]:
        """For each worker: its core group and the Cpus_allowed_list of every one of its threads,
        read by the worker from /proc/self/task/*/status."""
        if self._inproc:
            return {"model": {"cpus": self.plan.cpus, "pid": os.getpid(), "threads": thread_affinities()}}
        out = {}
        slot = self._slots.get()
        try:
            for name, cpus, _ in self.plan.workers:
                conn = slot.conns[name]
                conn.send(("threads",))
                msg = conn.recv()
                out[name] = {"cpus": cpus, "pid": msg[1], "threads": msg[2]}
        finally:
            self._slots.put(slot)
        return out

    def message_round_trip_ms(self, n: int = 200) -> float:
        """Median parent<->worker message round trip: the unit cost of one hand-over between stages
        (0 when the single graph runs in this process)."""
        if self._inproc:
            return 0.0
        slot = self._slots.get()
        try:
            conn = slot.conns[self.plan.workers[-1][0]]
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                conn.send(("ping",))
                conn.recv()
                times.append(time.perf_counter() - t0)
        finally:
            self._slots.put(slot)
        return float(np.median(times) * 1e3)

    def describe(self) -> dict:
        return {"model": str(self.model_dir.path), "precision": self.precision, "max_batch": self.max_batch,
                "inflight": self.inflight, "plan": self.plan.describe()}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if hasattr(self, "_executor"):
            self._executor.shutdown(wait=True)
        self._stop_workers()
        if self._claim is not None:
            self._claim.release()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
