"""`Runtime`: ParNet's three streams on their own pinned core groups, running concurrently.

One request flows stem -> (stream 1 | stream 2 | stream 3 in parallel) -> tail. Each core group is a
worker process (see `worker.py`); the stem and the tail run in a worker pinned to all the groups'
cores together; a single-graph plan that owns every CPU of the process runs in the process itself.
Several requests can be in flight (`inflight` slots), so the stem of request k+1 can
run while the streams of request k do. With workers, the parent only moves small messages and copies the
input in and the logits out.

Which stages run on which CPUs, and `plan="auto"`'s cached choice, is `plan.py`; what travels between
this process and the workers is declared in `worker.py`. This module starts a plan and runs calls on it.
"""
from __future__ import annotations

import asyncio
import ctypes
import math
import multiprocessing as mp
import os
import queue
import signal
import struct
import threading
import time
import warnings
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from functools import cached_property
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from multiprocessing.connection import wait
from pathlib import Path

import numpy as np

from parnet_cpu.artifacts import INPUT_NAME, OUTPUT_NAME, STAGE_TENSORS, ModelDir
from parnet_cpu.options import OptionError, check, check_all
from parnet_cpu.runtime.cores import CoreSpecError, parse_groups
from parnet_cpu.runtime.leases import (CoreLease, ProcessBound, lease_transaction, mark_pool, parse_pool_spec,
                                      pool_share)
from parnet_cpu.runtime.partition import RECOMPUTE_STAGES, SHARE_STAGES, SINGLE_STAGES
from parnet_cpu.runtime.plan import Plan, PlanCache, choose, make_plan, single_plan
from parnet_cpu.runtime.timing import measure_latency
from parnet_cpu.runtime.engine import CompileCache
from parnet_cpu.system.openvino_core import core as openvino_core
from parnet_cpu.runtime.classify import TopK, check_top_k, softmax_top_k
from parnet_cpu.data.inputs import MAX_IMAGE_PIXELS, ImageInput, preprocess_batch, preprocess_input
from parnet_cpu.runtime.worker import (ERROR, PING, READY, RUN, STOP, SYNC, SYNC_REPLY, THREADS, Reply, RunStage,
                                       TensorSlot, WorkerSpec, unguarded_main_problem, worker_main)
from parnet_cpu.system.affinity import thread_affinities
from parnet_cpu.system.load import other_load, wait_for_quiet


class RuntimeClosedError(RuntimeError):
    pass


class RuntimeForkedError(RuntimeClosedError):
    """This process is a fork of the one that created the Runtime: the workers, pipes, shared memory and
    OpenVINO threads belong to the parent, so the child refuses every call (and its exit leaves them alone)."""


class SharedMemoryError(CoreSpecError):
    """/dev/shm cannot hold the plan's stage tensors. A `CoreSpecError`, as the other resources a plan
    cannot get, so every command reports it as a clear error."""


class RuntimeBrokenError(RuntimeError):
    """A worker process died (killed, out of memory): this Runtime refuses every later call with the cause;
    close it and create a new one."""


class StageError(RuntimeError):
    """A stage raised inside its worker. Only this call fails: the runtime stays usable."""


class InputError(ValueError):
    """A batch that is not this model's input: wrong shape or dtype, no image, or a value that is NaN, infinite
    or beyond the FP32 range. Refused before it runs: the model would otherwise answer it (ReLU turns NaN
    into finite logits), a silent answer for an input that has none."""


def check_images(batch: object, input_shape: tuple[int, ...]) -> np.ndarray:
    """The one input check of every entry: `Runtime.infer`/`submit` (so `classify`, the async calls and
    whatever batches onto them), `Batcher.infer` and the v2 server (`serve.v2`). Preprocessed images
    (N, C, H, W), or one (C, H, W), of a floating dtype, at least one, every value finite in FP32.
    Returns them as float32 (no copy when they already are). Costs one `isfinite` pass over the batch
    (tens of µs for 1x3x224x224, against milliseconds of inference)."""
    x = np.asarray(batch)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(input_shape):
        raise InputError(f"expected images of shape (N, {', '.join(map(str, input_shape))}), got {tuple(x.shape)}")
    if x.shape[0] < 1:
        raise InputError("batch of 0 images: a batch needs at least one image")
    if not np.issubdtype(x.dtype, np.floating):
        raise InputError(f"expected float32 preprocessed images, got {x.dtype} (classify() takes raw images)")
    if x.dtype != np.float32:
        with np.errstate(over="ignore"):
            x = x.astype(np.float32)  # a float64 beyond the FP32 range becomes inf here: refused below
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1))
        which = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        raise InputError(f"the images contain NaN or infinity (or a number beyond the FP32 range): image(s) {which} "
                         f"of {x.shape[0]}; a model has no answer for them (a preprocessed image is finite)")
    return x


class InferenceTimeout(TimeoutError):
    """A call got no answer within its timeout (a stopped or overloaded worker). Only this call fails:
    the slot is resynchronised before its next use, so a late answer is never handed to another call."""


def _tensor_shapes(ir_path: Path, max_batch: int) -> dict[str, tuple[int, ...]]:
    from parnet_cpu.system.openvino_core import core

    model = core().read_model(str(ir_path))
    shapes = {}
    for op in model.get_ops():
        for out in op.outputs():
            for name in out.get_names():
                ps = out.get_partial_shape()
                if name in (INPUT_NAME, OUTPUT_NAME, *STAGE_TENSORS) and op.get_type_name() != "Result":
                    shapes[name] = (max_batch,) + tuple(d.get_length() for d in list(ps)[1:])
    return shapes


SHM_DIR = "/dev/shm"  # where Linux keeps POSIX shared memory (shm_open)


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def shared_memory_problem(needed: int, what: str) -> str | None:
    """Why /dev/shm cannot hold `needed` more bytes for `what`, or None. A tmpfs that is full when a mapped
    page is first touched kills the process touching it with SIGBUS (no exception, no message: Docker's
    default /dev/shm is 64 MiB), so the space is checked before anything is mapped."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None  # nothing to measure: creating the segment then fails loudly by itself
    free, size = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    if needed <= free:
        return None
    suggest = -(-(size - free + needed) // (64 << 20)) * 64  # what it holds now plus this, in 64 MiB steps
    return (f"{what} needs {_mib(needed)} of shared memory in {SHM_DIR}, which has {_mib(free)} free (of "
            f"{_mib(size)}); mapping more than it holds would kill this process with SIGBUS at the first batch. "
            f"Give it a larger {SHM_DIR} (docker run --shm-size={suggest}m ...; Kubernetes: an emptyDir with "
            f"medium: Memory mounted at {SHM_DIR}), or lower max_batch or inflight, or use plan='single' (no "
            "shared memory when it runs on all of this process's CPUs)")


def _create_segment(size: int, what: str) -> shared_memory.SharedMemory:
    """A shared-memory segment whose pages are reserved now (posix_fallocate): a /dev/shm that another process
    fills meanwhile fails here with `SharedMemoryError`, never with SIGBUS when a batch first touches a page."""
    try:
        shm = shared_memory.SharedMemory(create=True, size=size)
    except OSError as exc:  # ENOSPC (no inode left), EMFILE, ...: said as what it is, with the fix
        raise SharedMemoryError(f"{what}: cannot create a {_mib(size)} shared-memory segment in {SHM_DIR} "
                                f"({exc.strerror or exc}); give it a larger /dev/shm (docker run --shm-size=...), "
                                "or use plan='single'") from None
    try:
        fd = os.open(os.path.join(SHM_DIR, shm.name), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return shm  # shm_open keeps its segments elsewhere here: nothing to reserve by path
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        shm.close()
        shm.unlink()
        raise SharedMemoryError(shared_memory_problem(size, what) or
                                f"{what}: reserving {_mib(size)} in {SHM_DIR} failed ({exc.strerror}); give it a "
                                "larger /dev/shm (docker run --shm-size=...) or lower max_batch or inflight") from None
    finally:
        os.close(fd)
    return shm


_LIVE: "weakref.WeakSet[Runtime]" = weakref.WeakSet()  # every Runtime of this process, for `_after_fork_in_child`


def _keep_forever(obj: object) -> None:
    """Add a reference nobody drops: `obj` is never destroyed in this process."""
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))


def _after_fork_in_child() -> None:
    """`os.register_at_fork`: in a forked child, detach every Runtime the parent had (`_detach_after_fork`) and
    never destroy the process's OpenVINO Core: after a compile it owns executors whose threads did not survive
    the fork, and their destructor waits for those threads forever (the child hung at exit)."""
    for rt in list(_LIVE):
        rt._detach_after_fork()
    if openvino_core.cache_info().currsize:
        _keep_forever(openvino_core())


os.register_at_fork(after_in_child=_after_fork_in_child)


@dataclass
class _Slot:
    index: int
    views: dict[str, np.ndarray]
    conns: dict[str, object]  # worker name -> parent end of this slot's pipe
    request: object = None  # in-process single graph: this slot's OpenVINO infer request
    # a call on this slot ended before reading every reply it caused (interrupt, timeout, failed stage):
    # its pipes may hold stale replies, even half of one, so they are resynchronised before the next use
    dirty: bool = False
    names: dict = field(default_factory=dict)  # parent end of a pipe -> worker name
    full: object = None  # in-process: a request compiled for exactly max_batch images (static shape)

    def __post_init__(self) -> None:
        self.names = {conn: name for name, conn in self.conns.items()}


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


class Runtime(ProcessBound):
    """Thread-safe ParNet inference on pinned core groups.

    >>> with Runtime("out/", cores_per_stream=4) as rt:
    ...     logits = rt.infer(images)           # (N, C, H, W) float32 -> (N, classes)
    ...     future = rt.submit(images)          # concurrent.futures.Future

    Its cores are leased machine-wide (`leases.CoreLease`): by default it takes only cores no other Runtime,
    in any process, holds, and refuses explicit `cores` that another holds (naming its pid); `share=True`
    allows it, with a warning. The model folder is verified first (`ModelDir.verify`).
    In each of N worker processes of one server (uvicorn/gunicorn `--workers N`), `cores="share:N"` leases
    that worker an equal, disjoint part of the free cores without it knowing its index (`cores.pool_share`).

    Embedding: `preprocess`, `classify`, `infer_async`, `classify_async`, `class_names`, `input_shape`,
    `preprocess_config`, `healthy`; `parnet_cpu.Batcher` batches concurrent asyncio calls onto it.
    """

    def __init__(self, model_dir: str | Path, cores_per_stream: int | str | None = "auto",
                 cores: list[list[int]] | str | None = None, precision: str | None = None, plan: str = "auto",
                 inits1: str = "recompute", use_smt: bool = False, max_batch: int = 8, inflight: int = 2,
                 start_timeout: float = 300.0, share: bool = False, timeout: float | None = 60.0) -> None:
        if plan not in ("auto", "multistream", "single"):
            raise ValueError(f"plan must be auto, multistream or single, got {plan!r}")
        if inits1 not in ("recompute", "share"):
            raise ValueError("inits1 must be 'recompute' or 'share'")
        pool = parse_pool_spec(cores)  # "share:N": one of N server workers, each on its own share of the cores
        if pool is not None:
            if plan == "multistream":
                raise ValueError("cores='share:N' runs the single graph on each worker's share (as serve --replicas "
                                 "does); use plan='auto' or 'single'")
            cores, plan = None, "single"
        if isinstance(cores, str):
            cores = parse_groups(cores)
        # ranges: options.py; the checked values (plain int/float, e.g. from numpy scalars) are the ones kept
        checked = check_all(cores_per_stream=cores_per_stream, max_batch=max_batch, inflight=inflight,
                            start_timeout=start_timeout, timeout=timeout)
        cores_per_stream, max_batch, inflight = checked["cores_per_stream"], checked["max_batch"], checked["inflight"]
        start_timeout, timeout = checked["start_timeout"], checked["timeout"]
        self.model_dir = ModelDir.open(model_dir)
        self.precision = precision or self.model_dir.default_precision
        self.ir_path = self.model_dir.ir_path(self.precision)
        self.input_shape = self.model_dir.input_shape()
        # compiled models are cached (engine.CompileCache): a restart imports them instead of compiling
        self.compile_cache = CompileCache.for_model(self.model_dir, self.ir_path, self.precision)
        self.max_batch, self.inflight = max_batch, inflight
        self.stats = StageStats()
        self._closed = False
        self._procs: list = []
        self._shms: list[shared_memory.SharedMemory] = []
        self._claim: CoreLease | None = None
        self._start_timeout = start_timeout
        self.timeout = timeout  # seconds a call may take (None: no limit); infer/submit can override it
        self._broken: str | None = None  # why this runtime cannot answer any more (a worker died)
        self._broken_lock = threading.Lock()
        self._pid, self._forked = os.getpid(), None  # _forked: the refusal, in a forked child of this process
        self._ov_objects: list = []  # in-process OpenVINO objects: a forked child must never destroy them
        _LIVE.add(self)

        kind = "single" if plan == "single" else "multistream"
        with lease_transaction():  # plan on free cores and lease them, with no other runtime in between
            if pool is not None:
                cores = [pool_share(pool, use_smt)]
            fallback = None
            try:
                self.plan = make_plan(self.model_dir, self.ir_path, cores_per_stream, cores, use_smt, inits1, kind,
                                      share)
            except CoreSpecError as exc:
                if plan != "auto" or cores:
                    raise
                fallback = f"single graph: {exc}"
            if fallback is None and plan == "auto" and not cores and self.plan.kind == "multistream":
                problem = self._shm_problem(self.plan)  # e.g. Docker's 64 MiB /dev/shm: the single graph needs none
                if problem:
                    warnings.warn(f"plan='auto' runs the single graph: {problem}", RuntimeWarning, stacklevel=2)
                    fallback = f"single graph: {problem}"
            if fallback is not None:  # out of the except: its refusal must not be chained to the multi-stream one
                self.plan = make_plan(self.model_dir, self.ir_path, cores_per_stream, None, use_smt, inits1,
                                      "single", share)
                self.plan.reason = fallback
            self._claim = CoreLease(self.plan.cpus, share=share)
            if pool is not None:
                mark_pool(self._claim, pool)
                self.plan.reason = f"worker pool {pool.key}: this worker's share; " + self.plan.reason
        try:
            self._start(self.plan)
            if plan == "auto" and self.plan.kind == "multistream":
                self._choose_plan(cores_per_stream, use_smt, inits1)
        except BaseException:
            self.close()
            raise
        if self.compile_cache is not None:
            self.compile_cache.seal()  # every compile of this start is done: record the blobs it wrote
        self._executor = ThreadPoolExecutor(max_workers=inflight, thread_name_prefix="parnet-rt")

    # ------------------------------------------------------------------ start-up (not the hot path)
    @staticmethod
    def _in_process(plan: Plan) -> bool:
        """The single graph on every CPU this process may use needs no pinned worker (its threads cannot
        leave those CPUs anyway), so it runs here and saves the hand-over (~0.3 ms per call measured)."""
        return plan.kind == "single" and set(plan.cpus) == os.sched_getaffinity(0)

    def _start_in_process(self, plan: Plan) -> None:
        from parnet_cpu.runtime.engine import CompileOptions, compile_model
        from parnet_cpu.system.openvino_core import core

        opts = CompileOptions(precision=self.precision, num_threads=len(plan.cpus), pinning=True,
                              cache_dir=self._compile_cache_dir)
        self._compiled = compile_model(self.ir_path, opts)
        # Full batches run on a second compile with the batch fixed, as benchmark_app does: static shapes
        # measured ~2 % faster than the dynamic batch (ParNet-S INT8 batch 8; benchmarks/matrix_unit.py).
        full = core().read_model(str(self.ir_path))
        full.reshape({full.inputs[0]: [self.max_batch, *self.input_shape]})
        full_compiled = compile_model(full, opts)
        self._stages, self._stage_worker, self._stage_by_name = [], {}, {}
        self._slots = queue.Queue()
        for i in range(self.inflight):
            self._slots.put(_Slot(i, {}, {}, self._compiled.create_infer_request(),
                                  full=full_compiled.create_infer_request()))
        self._ov_objects += [self._compiled, full_compiled, *(s.request for s in self._slots.queue),
                             *(s.full for s in self._slots.queue)]
        # The first numpy call into OpenVINO runs pybind11's one-time numpy API set-up, which deadlocked the
        # whole process when two threads made their first call at once (two slots' first infer, seen under
        # `predict`): make that first call here, in one thread, before any concurrent use.
        self._slots.queue[0].request.infer({0: np.zeros((1, *self.input_shape), np.float32)})
        plan.reason += "; in this process (its CPUs are all the process may use: no hand-over)"

    @property
    def _compile_cache_dir(self) -> str | None:
        return None if self.compile_cache is None else str(self.compile_cache.dir)

    def _start(self, plan: Plan) -> None:
        self._inproc = self._in_process(plan)  # decided once: the process's affinity may change later
        if self._inproc:
            return self._start_in_process(plan)
        problem = unguarded_main_problem()
        if problem:
            raise RuntimeError(problem)
        shapes, names, sizes, what = self._shm_layout(plan)
        problem = self._shm_problem(plan)
        if problem:
            raise SharedMemoryError(problem)
        layout, views = [], []
        for _ in range(self.inflight):
            shm = _create_segment(max(1, sum(sizes.values())), what)
            self._shms.append(shm)
            offset, slot_layout, slot_views = 0, {}, {}
            for n in names:
                slot_layout[n] = TensorSlot(shm.name, offset, shapes[n])
                slot_views[n] = np.ndarray(shapes[n], np.float32, buffer=shm.buf, offset=offset)
                offset += sizes[n]
            layout.append(slot_layout)
            views.append(slot_views)
        ctx = mp.get_context("spawn")
        pipes = {w.name: [ctx.Pipe() for _ in range(self.inflight)] for w in plan.workers}
        for w in plan.workers:
            spec = WorkerSpec(w.name, tuple(w.cpus), str(self.ir_path), self.precision, w.stages, tuple(layout),
                              cache_dir=self._compile_cache_dir)
            proc = ctx.Process(target=worker_main, args=(spec, [child for _, child in pipes[w.name]]),
                               name=f"parnet-{w.name}", daemon=True)
            proc.start()
            self._procs.append(proc)
        self._stage_worker = {s.name: w.name for w in plan.workers for s in w.stages}
        self._stages = [s for w in plan.workers for s in w.stages]
        order = [st.name for st in SHARE_STAGES + RECOMPUTE_STAGES + SINGLE_STAGES]
        self._stages.sort(key=lambda s: order.index(s.name))
        self._stage_by_name = {s.name: s for s in self._stages}
        # SimpleQueue: its put/get are single C calls, so an interrupt cannot lose a slot half-way through
        self._slots: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
        self._slot_list = [_Slot(i, views[i], {name: pipes[name][i][0] for name in pipes})
                           for i in range(self.inflight)]
        for slot in self._slot_list:
            self._slots.put(slot)
        deadline = time.monotonic() + self._start_timeout
        for w, proc in zip(plan.workers, self._procs):
            name, conn = w.name, pipes[w.name][0][0]
            # a worker that dies before answering (killed, out of memory) ends the wait at once
            if not wait([conn, proc.sentinel], max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"worker {name} did not start within {self._start_timeout:.0f} s")
            if not conn.poll():
                proc.join(1)
                raise RuntimeError(f"worker {name} (pid {proc.pid}) exited with code {proc.exitcode} while starting; "
                                   "its own error is on this process's stderr")
            msg: Reply = conn.recv()
            if msg[0] != READY:
                raise RuntimeError(f"worker {name} failed to start:\n{msg[2]}")

    def _shm_layout(self, plan: Plan) -> tuple[dict, list[str], dict[str, int], str]:
        """Shapes (at max_batch), names and byte sizes of the tensors one in-flight slot shares with workers,
        and what they are, in words."""
        shapes = _tensor_shapes(self.ir_path, self.max_batch)
        names = sorted({t for w in plan.workers for s in w.stages for t in s.inputs + s.outputs})
        what = (f"the {plan.kind} plan ({self.inflight} in-flight slot(s) x {len(names)} tensors of "
                f"{self.max_batch} images)")
        return shapes, names, {n: int(np.prod(shapes[n])) * 4 for n in names}, what

    def _shm_problem(self, plan: Plan) -> str | None:
        """Why /dev/shm cannot hold every slot of `plan` (checked at start-up, before anything is mapped)."""
        if self._in_process(plan):
            return None
        _, _, sizes, what = self._shm_layout(plan)
        return shared_memory_problem(self.inflight * max(1, sum(sizes.values())), what)

    def _stop_workers(self) -> None:
        for slot in getattr(self, "_slot_list", []):
            for conn in slot.conns.values():
                try:
                    conn.send(STOP)
                except (OSError, ValueError):
                    pass
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
            if proc.is_alive():  # stopped (SIGSTOP) or ignoring SIGTERM
                proc.kill()
                proc.join(timeout=5)
        self._procs, self._slot_list = [], []
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
        same (leased) cores. The decision is cached in the model folder per machine, core set, precision
        and model, with when, where and under what load it was measured; a measurement taken while other
        work kept those CPUs busy (or on shared cores) decides this start only and is not cached."""
        cache = PlanCache(self.model_dir)
        key = cache.key(self.plan.cpus, self.precision, self.ir_path)
        entry = cache.lookup(key)
        if entry is None:
            cpus = self.plan.cpus
            load_before = wait_for_quiet(cpus)
            x = np.zeros((1, *self.input_shape), np.float32)
            multi = self._measure(x)
            self._stop_workers()
            self._start(single_plan(cpus, inits1, ""))
            single = self._measure(x)
            verdict = choose(multi, single, cpus, load_before, other_load(cpus),
                             bool(self._claim and self._claim.shared))
            cache.record(key, verdict.entry)
            if verdict.choice == "single":
                self.plan = single_plan(cpus, inits1, f"auto: single graph measured faster ({single * 1e3:.2f} vs "
                                                      f"{multi * 1e3:.2f} ms)" + verdict.note)
                return
            self._stop_workers()
            self._start(self.plan)
            self.plan.reason += (f"; auto: multi-stream measured faster ({multi * 1e3:.2f} vs {single * 1e3:.2f} ms)"
                                 + verdict.note)
            return
        if entry["choice"] == "single":
            cpus = self.plan.cpus
            self._stop_workers()
            self.plan = single_plan(cpus, inits1, f"auto (cached {entry.get('measured', '?')}): single graph faster")
            self._start(self.plan)
        else:
            self.plan.reason += f"; auto (cached {entry.get('measured', '?')}): multi-stream faster"

    def _measure(self, x: np.ndarray, iters: int = 10) -> float:
        """Median seconds of one call (after 3 warm-up calls)."""
        return measure_latency(lambda: self._run(x), warmup=3, iters=iters)["median_ms"] / 1e3

    # ------------------------------------------------------------------ hot path
    def _check(self, batch: np.ndarray, timeout: float | None) -> np.ndarray:
        """Every call's door (`infer`, `submit`; everything else goes through them): the runtime's state,
        the per-call `timeout` (checked only when one is given: the default costs nothing) and the images
        (`check_images`)."""
        if self._closed:  # also in a forked child (`_detach_after_fork`): no per-call pid check needed
            raise self._closed_error()
        if self._broken is not None:
            raise RuntimeBrokenError(self._broken)
        if timeout is not None and timeout != math.inf:  # inf: no limit, as documented on `infer`
            try:
                check("timeout", timeout)
            except OptionError as exc:
                raise OptionError("timeout", f"{exc.args[0].split(': ', 1)[1]}; or math.inf (no limit), or None "
                                  f"(the Runtime's timeout, {self.timeout} s)") from None
        return check_images(batch, self.input_shape)

    def _run(self, batch: np.ndarray, timeout: float | None = None) -> np.ndarray:
        n = batch.shape[0]
        deadline = self._deadline(timeout)
        slot = self._take_slot(deadline)
        try:
            if slot.request is not None:
                request = slot.full if n == self.max_batch and slot.full is not None else slot.request
                t0 = time.perf_counter()
                out = request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)}, share_inputs=True)
                self.stats.add("model", time.perf_counter() - t0)
                return out[0]  # share_outputs=False: already the caller's own copy
            if self._broken is not None:
                raise RuntimeBrokenError(self._broken)
            if slot.dirty:
                self._resync(slot, deadline)
            slot.dirty = True  # until every reply this call causes has been read
            slot.views[INPUT_NAME][:n] = batch
            done, sent = {INPUT_NAME}, set()
            outstanding: dict[str, int] = {}  # worker -> stages sent to it, not yet answered
            while OUTPUT_NAME not in done:
                for st in self._stages:
                    if st.name not in sent and all(t in done for t in st.inputs):
                        worker = self._stage_worker[st.name]
                        msg: RunStage = (RUN, slot.index, st.name, n)
                        try:  # inline, not self._send: this loop is the per-call cost
                            slot.conns[worker].send(msg)
                        except (OSError, ValueError):  # BrokenPipeError: the worker is gone
                            raise self._worker_died(worker) from None
                        sent.add(st.name)
                        outstanding[worker] = outstanding.get(worker, 0) + 1
                busy = [slot.conns[w] for w, k in outstanding.items() if k]
                if not busy:
                    raise RuntimeError("stage graph cannot make progress")
                ready = wait(busy, None if deadline == math.inf else max(0.0, deadline - time.monotonic()))
                if not ready:
                    raise self._timed_out([w for w, k in outstanding.items() if k], timeout)
                for conn in ready:
                    worker = slot.names[conn]
                    try:
                        reply: Reply = conn.recv()  # StageDone or Failure
                    except (EOFError, OSError):
                        raise self._worker_died(worker) from None
                    if reply[0] == ERROR:
                        raise StageError(f"stage {reply[1]} failed in runtime worker '{worker}' (this call only; "
                                         f"the runtime stays usable):\n{reply[2]}")
                    outstanding[worker] -= 1
                    done.update(self._stage_by_name[reply[1]].outputs)
                    self.stats.add(reply[1], reply[2])
            out = slot.views[OUTPUT_NAME][:n].copy()
            slot.dirty = False
            return out
        finally:
            self._slots.put(slot)

    def _run_chunks(self, batch: np.ndarray, timeout: float | None = None) -> np.ndarray:
        """A batch larger than `max_batch`: chunks of `max_batch` images one after another, logits in order."""
        m = self.max_batch
        return np.concatenate([self._run(batch[i:i + m], timeout) for i in range(0, batch.shape[0], m)])

    def infer(self, batch: np.ndarray, timeout: float | None = None) -> np.ndarray:
        """Logits for a batch of preprocessed images (N, C, H, W); blocks until done, at most `timeout`
        seconds (default: the Runtime's `timeout`; `math.inf`: no limit), then raises `InferenceTimeout`.
        A batch of more than `max_batch` images runs as chunks of `max_batch` (the timeout applies to each
        chunk); the logits come back in the order of the images."""
        batch = self._check(batch, timeout)
        if batch.shape[0] <= self.max_batch:
            return self._run(batch, timeout)
        return self._run_chunks(batch, timeout)

    def submit(self, batch: np.ndarray, timeout: float | None = None) -> Future:
        """Queue a batch; returns a Future of its logits. Up to `inflight` batches run pipelined; a batch
        larger than `max_batch` is split as in `infer`. The batch is copied now, so the answer belongs to
        the images as they were when submitted, whatever the caller does with its array afterwards."""
        batch = np.array(self._check(batch, timeout), dtype=np.float32, order="C", copy=True)
        return self._executor.submit(self._run if batch.shape[0] <= self.max_batch else self._run_chunks, batch,
                                     timeout)

    # ------------------------------------------------------------------ failures: timeouts, dead workers, resync
    def _deadline(self, timeout: float | None) -> float:
        t = self.timeout if timeout is None else timeout
        return math.inf if t is None else time.monotonic() + t

    @staticmethod
    def _remaining(deadline: float) -> float | None:
        return None if deadline == math.inf else max(0.0, deadline - time.monotonic())

    def _take_slot(self, deadline: float) -> _Slot:
        try:
            return self._slots.get(timeout=self._remaining(deadline))
        except queue.Empty:
            raise InferenceTimeout(f"all {self.inflight} in-flight slots stayed busy until the timeout: the calls "
                                   "ahead of this one are stuck (see their errors)") from None

    def _send(self, slot: _Slot, worker: str, msg: tuple) -> None:
        try:
            slot.conns[worker].send(msg)
        except (OSError, ValueError):  # BrokenPipeError: the worker is gone
            raise self._worker_died(worker) from None

    def _recv(self, conn, worker: str) -> tuple:
        try:
            return conn.recv()
        except (EOFError, OSError):
            raise self._worker_died(worker) from None

    def _resync(self, slot: _Slot, deadline: float) -> None:
        """Drop whatever an abandoned call left in this slot's pipes. A receive interrupted half-way leaves
        part of a message behind, so raw bytes are skipped up to a random marker each worker echoes; each
        worker answers in order, so the marker also means its stale stages have finished."""
        markers = {}
        for worker in slot.conns:
            token = os.urandom(16)
            self._send(slot, worker, (SYNC, token))
            markers[worker] = struct.pack("!i", len(SYNC_REPLY) + 16) + SYNC_REPLY + token  # Connection framing
        for worker, marker in markers.items():
            conn, tail = slot.conns[worker], b""
            while not tail.endswith(marker):
                if not conn.poll(self._remaining(deadline)):
                    raise self._timed_out([worker], None)
                chunk = os.read(conn.fileno(), 1 << 16)
                if not chunk:
                    raise self._worker_died(worker)
                tail = (tail + chunk)[-len(marker):]
        slot.dirty = False

    def _proc(self, worker: str):
        return next((p for p in self._procs if p.name == f"parnet-{worker}"), None)

    def _timed_out(self, workers: list[str], timeout: float | None) -> BaseException:
        for worker in workers:
            proc = self._proc(worker)
            if proc is not None and not proc.is_alive():
                return self._worker_died(worker)
        who = ", ".join(f"'{w}' (pid {getattr(self._proc(w), 'pid', '?')})" for w in workers)
        t = self.timeout if timeout is None else timeout
        return InferenceTimeout(f"no answer within {t:g} s from runtime worker {who}: it is stopped, stuck or "
                                "overloaded. This call was abandoned; its late answers will be discarded")

    def _worker_died(self, worker: str) -> RuntimeBrokenError:
        """Record (once) which worker died and how; every later call is refused with this message."""
        with self._broken_lock:
            if self._broken is None:
                proc = self._proc(worker)
                how = "closed its pipe"
                if proc is not None:
                    proc.join(timeout=2)  # reap it, to learn how it ended
                    code = proc.exitcode
                    if code is None:
                        how = "stopped answering (its pipe closed) but is still running"
                    elif code < 0:
                        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
                        how = f"was killed by {name}" + (" (kill -9, or the kernel's out-of-memory killer)"
                                                         if -code == signal.SIGKILL else "")
                    else:
                        how = f"exited with code {code}"
                cpus = self.plan.worker_cpus(worker)
                self._broken = (f"runtime worker '{worker}' (pid {getattr(proc, 'pid', '?')}, CPUs "
                                f"{','.join(map(str, cpus))}) {how}; this Runtime cannot answer any more: close it "
                                "and create a new one")
        return RuntimeBrokenError(self._broken)

    def failure(self) -> str | None:
        """Why this Runtime cannot answer (closed, or a worker process died), or None. Cheap (one
        non-blocking waitpid per worker): health probes may call it as often as they like."""
        if self._closed:
            return self._forked or "this Runtime is closed"
        if self._broken is None:
            for proc in self._procs:
                if not proc.is_alive():
                    self._worker_died(proc.name.removeprefix("parnet-"))
                    break
        return self._broken

    def healthy(self) -> bool:
        """True while every worker process is alive and the Runtime is open."""
        return self.failure() is None

    def check(self) -> None:
        """Raise `RuntimeClosedError` / `RuntimeBrokenError` (with the cause) unless the Runtime is healthy."""
        why = self.failure()
        if why is not None:
            raise self._closed_error() if self._closed else RuntimeBrokenError(why)

    def _closed_error(self) -> RuntimeClosedError:
        return RuntimeForkedError(self._forked) if self._forked else RuntimeClosedError("this Runtime is closed")

    @contextmanager
    def _control_slot(self):
        """A resynchronised slot for a control exchange (threads, ping), marked dirty if it is abandoned."""
        deadline = self._deadline(None)
        slot = self._take_slot(deadline)
        try:
            if slot.dirty:
                self._resync(slot, deadline)
            slot.dirty = True
            yield slot
            slot.dirty = False
        finally:
            self._slots.put(slot)

    # ------------------------------------------------------------------ introspection and shutdown
    def thread_affinity(self) -> dict[str, dict]:
        """For each worker: its core group and the Cpus_allowed_list of every one of its threads,
        read by the worker from /proc/self/task/*/status."""
        if self._closed:
            raise self._closed_error()
        if self._inproc:
            return {"model": {"cpus": self.plan.cpus, "pid": os.getpid(), "threads": thread_affinities()}}
        out = {}
        with self._control_slot() as slot:
            for w in self.plan.workers:
                self._send(slot, w.name, (THREADS,))
                msg = self._recv(slot.conns[w.name], w.name)
                out[w.name] = {"cpus": w.cpus, "pid": msg[1], "threads": msg[2]}
        return out

    def message_round_trip_ms(self, n: int = 200) -> float:
        """Median parent<->worker message round trip: the unit cost of one hand-over between stages
        (0 when the single graph runs in this process)."""
        if self._closed:
            raise self._closed_error()
        if self._inproc:
            return 0.0
        with self._control_slot() as slot:
            conn = slot.conns[self.plan.workers[-1].name]
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                conn.send((PING,))
                conn.recv()
                times.append(time.perf_counter() - t0)
        return float(np.median(times) * 1e3)

    def describe(self) -> dict:
        if self._forked:
            raise self._closed_error()
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

    def _detach_after_fork(self) -> None:
        """In a forked child (`_after_fork_in_child`): refuse every call with the fix, and make sure nothing the
        child does, exiting included, touches the parent's runtime. Its copies of the pipes are closed (no
        message can reach a worker; a worker still sees EOF when the parent goes), the workers leave
        multiprocessing's child list (whose exit handler would SIGTERM them), the shared memory is never
        unlinked (close() returns at once), the core leases are forgotten (`leases._forget_parent_locks`), and
        the in-process OpenVINO objects are never destroyed (their destructor waits for threads the fork lost)."""
        self._forked = (f"this Runtime was created in process {self._pid}, and this process ({os.getpid()}) is a "
                        "fork of it: the Runtime's worker processes, pipes, shared memory and OpenVINO threads "
                        "belong to the parent, so it cannot run here. Create the Runtime after forking (in each "
                        "child), or start the children with 'spawn' (multiprocessing.get_context('spawn'), "
                        "ProcessPoolExecutor(mp_context=...)); a server: create it in each worker (no gunicorn "
                        "--preload of the code that creates it)")
        self._closed = True
        for slot in getattr(self, "_slot_list", []):
            for conn in slot.conns.values():
                conn.close()
        children = getattr(mp.process, "_children", set())  # what multiprocessing's exit handler terminates
        for proc in self._procs:
            children.discard(proc)
        for obj in self._ov_objects:
            _keep_forever(obj)

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------ embedding API: images in, labels out
    @cached_property
    def preprocess_config(self):
        """The model folder's preprocessing (`data.PreprocessConfig`: resize, crop, mean/std, channels)."""
        return self.model_dir.preprocess_config()

    @cached_property
    def class_names(self) -> tuple[str, ...] | None:
        """Class names in output order (from the model folder; ImageNet's for 1000 classes), or None."""
        return self.model_dir.class_names

    @cached_property
    def num_classes(self) -> int:
        return int(self.model_dir.config["num_classes"])

    def preprocess(self, image: ImageInput, max_pixels: int | None = MAX_IMAGE_PIXELS) -> np.ndarray:
        """One image (encoded bytes, a path, a PIL image or a uint8 RGB array) -> float32 (C, H, W), by the
        decoding rules and limits of `serve` and `eval` (`data.inputs.preprocess_input`)."""
        return preprocess_input(image, self.preprocess_config, max_pixels=max_pixels)

    def classify(self, images, top_k: int | None = None, timeout: float | None = None) -> list[TopK]:
        """The `top_k` most probable classes (labels, indices, softmax probabilities) of each image: one
        image, a list of images (as `preprocess` takes), or a preprocessed float batch (N, C, H, W). Default:
        5, or every class of a model with fewer."""
        top_k = check_top_k(top_k, self.num_classes)
        batch = preprocess_batch(images, self.preprocess_config)
        return softmax_top_k(self.infer(batch, timeout), top_k, self.class_names)

    async def infer_async(self, batch: np.ndarray, timeout: float | None = None) -> np.ndarray:
        """`infer` for asyncio code: awaits `submit`'s future without blocking the loop. Cancelling the
        await abandons this call only: a batch not started yet never runs, one already running finishes
        into its own future, so its logits can never reach another call."""
        return await asyncio.wrap_future(self.submit(batch, timeout))

    async def classify_async(self, images, top_k: int | None = None, timeout: float | None = None) -> list[TopK]:
        """`classify` for asyncio code: decoding runs in a thread, inference as `infer_async`."""
        top_k = check_top_k(top_k, self.num_classes)
        batch = await asyncio.to_thread(preprocess_batch, images, self.preprocess_config)
        return softmax_top_k(await self.infer_async(batch, timeout), top_k, self.class_names)
