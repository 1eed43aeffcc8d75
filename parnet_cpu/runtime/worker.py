"""A stage worker: one process per core group, pinned before OpenVINO starts.

OpenVINO respects a process affinity mask that is set before its Core is created, while inside one
process it hands out cores only in compile order. So each core group is its own process: the mask is
set first, then the stages are compiled with as many threads as the group has cores. Stage tensors
live in shared memory created by the parent; inputs and outputs are bound to it with zero-copy
`ov.Tensor`s, so a hand-over between groups is a pointer, not a copy.
"""
from __future__ import annotations

import os
import signal
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

SYNC_REPLY = b"parnet-sync:"  # + the parent's token, sent raw: the parent skips bytes up to it (Runtime._resync)


@dataclass(frozen=True)
class TensorSlot:
    """Where one named tensor of one in-flight slot lives in shared memory."""

    shm_name: str
    offset: int
    shape: tuple[int, ...]  # with the maximum batch as first dimension


@dataclass(frozen=True)
class WorkerSpec:
    name: str
    cpus: tuple[int, ...]
    ir_path: str
    precision: str
    stages: tuple  # tuple[partition.Stage, ...]
    layout: tuple  # per slot: dict tensor name -> TensorSlot
    num_threads: int | None = None


def thread_affinities() -> dict[int, str]:
    """Cpus_allowed_list of every thread of this process, straight from /proc."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("Cpus_allowed_list:"):
                        out[int(tid)] = line.split(":", 1)[1].strip()
        except FileNotFoundError:  # thread ended meanwhile
            pass
    return out


def pin_process(cpus) -> None:
    """Confine every thread of this process to `cpus`. sched_setaffinity(0) moves only the calling
    thread; threads started while the worker was being unpickled (numpy's BLAS pool) need their own
    call. Threads created later inherit the mask."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:
            pass


def _attach(layout, shms: dict):
    """numpy views over shared memory for every slot's tensors."""
    from multiprocessing import shared_memory

    import numpy as np

    views = []
    for slot in layout:
        v = {}
        for name, ts in slot.items():
            if ts.shm_name not in shms:
                # spawned workers share the parent's resource tracker, which unlinks the segment once, at close
                shms[ts.shm_name] = shared_memory.SharedMemory(name=ts.shm_name)
            v[name] = np.ndarray(ts.shape, np.float32, buffer=shms[ts.shm_name].buf, offset=ts.offset)
        views.append(v)
    return views


def worker_main(spec: WorkerSpec, conns: list[Connection]) -> None:
    # Ctrl-C in a terminal reaches the whole process group: only the parent decides what an interrupt
    # means (it abandons the call and resynchronises). The worker ends when the parent says so or goes away.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    shms: dict = {}
    try:
        pin_process(spec.cpus)  # before OpenVINO creates any thread; a failure goes back to the parent
        import openvino as ov

        from parnet_cpu.runtime.engine import CompileOptions
        from parnet_cpu.runtime.partition import cut_stage

        core = ov.Core()
        opts = CompileOptions(precision=spec.precision, num_threads=spec.num_threads or len(spec.cpus), pinning=True)
        compiled = {s.name: core.compile_model(cut_stage(spec.ir_path, s), "CPU", opts.properties())
                    for s in spec.stages}
        stages = {s.name: s for s in spec.stages}
        views = _attach(spec.layout, shms)
        requests = [{name: c.create_infer_request() for name, c in compiled.items()} for _ in spec.layout]
        bound: dict[tuple[int, str, int], tuple] = {}

        def tensors(slot: int, stage: str, n: int):
            key = (slot, stage, n)
            if key not in bound:
                s, v = stages[stage], views[slot]
                bound[key] = ([ov.Tensor(v[t][:n], shared_memory=True) for t in s.inputs],
                              [ov.Tensor(v[t][:n], shared_memory=True) for t in s.outputs])
            return bound[key]

        conns[0].send(("ready", os.getpid(), thread_affinities()))
    except BaseException:
        conns[0].send(("error", "startup", traceback.format_exc()))
        return

    import time

    open_conns = list(conns)
    while open_conns:
        for conn in wait(open_conns):
            try:
                msg = conn.recv()
            except EOFError:
                open_conns.remove(conn)
                continue
            if msg is None:
                open_conns = []
                break
            try:
                if msg[0] == "ping":
                    conn.send(("pong",))
                    continue
                if msg[0] == "threads":
                    conn.send(("threads", os.getpid(), thread_affinities()))
                    continue
                if msg[0] == "sync":
                    conn.send_bytes(SYNC_REPLY + msg[1])
                    continue
                _, slot, stage, n = msg
                ins, outs = tensors(slot, stage, n)
                req = requests[slot][stage]
                for i, t in enumerate(ins):
                    req.set_input_tensor(i, t)
                for i, t in enumerate(outs):
                    req.set_output_tensor(i, t)
                t0 = time.perf_counter()
                req.infer()
                conn.send(("done", stage, time.perf_counter() - t0))
            except Exception:
                conn.send(("error", msg[2] if len(msg) > 2 else "?", traceback.format_exc()))
    for shm in shms.values():
        shm.close()
