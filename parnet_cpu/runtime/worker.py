"""A stage worker: one process per core group, pinned before OpenVINO starts.

OpenVINO respects a process affinity mask that is set before its Core is created, while inside one
process it hands out cores only in compile order. So each core group is its own process: the mask is
set first, then the stages are compiled with as many threads as the group has cores. Stage tensors
live in shared memory created by the parent; inputs and outputs are bound to it with zero-copy
`ov.Tensor`s, so a hand-over between groups is a pointer, not a copy.
"""
from __future__ import annotations

import ast
import inspect
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from multiprocessing import shared_memory
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Literal, Optional, Union

from parnet_cpu.runtime.partition import Stage
from parnet_cpu.system.affinity import pin_process, thread_affinities

SYNC_REPLY = b"parnet-sync:"  # + the parent's token, sent raw: the parent skips bytes up to it (Runtime._resync)

# ---------------------------------------------------------------------------------------------------------
# What travels between the parent (`Runtime`) and a worker over one slot's pipe. Besides the `WorkerSpec`
# (and its `TensorSlot`s) handed over at spawn, every message is a plain tuple whose first item names its
# kind; the types below are its one definition. Tuples on purpose: a run/done pair crosses the pipe once
# per stage per call, and a plain tuple pickles and unpickles ~7x faster than a NamedTuple (measured
# 0.5 vs 3.7 us a round), which would add ~30 us to every multi-stream call.

# parent -> worker
RUN, SYNC, PING, THREADS = "run", "sync", "ping", "threads"
RunStage = tuple[Literal["run"], int, str, int]  # (RUN, slot index, stage name, images in the batch)
SyncRequest = tuple[Literal["sync"], bytes]  # (SYNC, token): answered raw with SYNC_REPLY + token
PingRequest = tuple[Literal["ping"]]  # answered PONG: one message round trip
ThreadsRequest = tuple[Literal["threads"]]  # answered ThreadsReply
STOP = None  # the worker ends (as it does when every pipe closes)
Request = Optional[Union[RunStage, SyncRequest, PingRequest, ThreadsRequest]]

# worker -> parent
READY, DONE, ERROR, PONG = "ready", "done", "error", "pong"
Ready = tuple[Literal["ready"], int, dict]  # (READY, pid, thread id -> Cpus_allowed_list): compiled and pinned
StageDone = tuple[Literal["done"], str, float]  # (DONE, stage name, seconds its inference took)
Failure = tuple[Literal["error"], str, str]  # (ERROR, stage name or "startup", formatted traceback)
Pong = tuple[Literal["pong"]]
ThreadsReply = tuple[Literal["threads"], int, dict]  # (THREADS, pid, thread id -> Cpus_allowed_list)
Reply = Union[Ready, StageDone, Failure, Pong, ThreadsReply]  # plus the raw sync marker


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
    stages: tuple[Stage, ...]
    layout: tuple[dict[str, TensorSlot], ...]  # per in-flight slot: tensor name -> where it lives
    num_threads: int | None = None
    cache_dir: str | None = None  # the Runtime's checked compiled-model cache (engine.CompileCache)


def _is_main_guard(node: ast.AST) -> bool:
    """`if __name__ == "__main__":` (either side of the ==)."""
    if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare) or len(node.test.ops) != 1 \
            or not isinstance(node.test.ops[0], ast.Eq):
        return False
    sides = [node.test.left, *node.test.comparators]
    return any(isinstance(e, ast.Name) and e.id == "__name__" for e in sides) and \
        any(isinstance(e, ast.Constant) and e.value == "__main__" for e in sides)


def _under_main_guard(tree: ast.Module, line: int) -> bool:
    """Whether top-level code at `line` runs only under `if __name__ == "__main__":` (in its body, at any depth)."""
    nodes: list[ast.AST] = list(tree.body)
    while True:
        node = next((n for n in nodes if n.lineno <= line <= (n.end_lineno or n.lineno)), None)
        if node is None:
            return False
        if _is_main_guard(node) and node.body[0].lineno <= line <= (node.body[-1].end_lineno or line):
            return True
        nodes = [c for c in ast.iter_child_nodes(node) if isinstance(c, (ast.stmt, ast.excepthandler))]


def unguarded_main_problem() -> str | None:
    """Why starting worker processes now would fail, or None: they are spawned, and a spawned process
    first imports the main script again, so a script that creates the Runtime outside
    `if __name__ == "__main__":` would have every worker create a Runtime of its own (Python refuses that,
    and the worker dies before it answers). Found from the call stack and the script's own source."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or not path:  # interactive, python -c: spawn re-runs nothing
        return None
    # what multiprocessing.spawn re-runs in a child: `python -m pkg.mod` by name, except a package's
    # __main__ (`python -m pkg`); a script by path, except IPython
    name = getattr(getattr(main, "__spec__", None), "name", None)
    if name is not None and (name == "__main__" or name.endswith(".__main__")):
        return None
    if name is None and Path(path).stem == "ipython":
        return None
    frame = inspect.currentframe()
    while frame is not None and not (frame.f_globals is vars(main) and frame.f_code.co_name == "<module>"):
        frame = frame.f_back
    if frame is None:  # not reached from the script's top-level code (a thread, a callback)
        return None
    line = frame.f_lineno
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"), filename=path)
    except (OSError, SyntaxError, ValueError):
        return None
    if _under_main_guard(tree, line):
        return None
    return (f"{path}, line {line}, starts the Runtime's worker processes while the script is being run at the "
            "top level, without a main guard. Worker processes are started with 'spawn': each one imports "
            f"{Path(path).name} again, so it would start a Runtime of its own. Put the code that creates and "
            "uses the Runtime under this line (the rule of Python's multiprocessing):\n\n"
            'if __name__ == "__main__":\n')


def _attach(layout, shms: dict):
    """numpy views over shared memory for every slot's tensors."""
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

        from parnet_cpu.runtime.engine import CompileOptions, compile_model
        from parnet_cpu.runtime.partition import cut_stage

        opts = CompileOptions(precision=spec.precision, num_threads=spec.num_threads or len(spec.cpus), pinning=True,
                              cache_dir=spec.cache_dir)
        compiled = {s.name: compile_model(cut_stage(spec.ir_path, s), opts) for s in spec.stages}
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

        ready: Ready = (READY, os.getpid(), thread_affinities())
        conns[0].send(ready)
    except BaseException:
        failed: Failure = (ERROR, "startup", traceback.format_exc())
        conns[0].send(failed)
        return

    open_conns = list(conns)
    while open_conns:
        for conn in wait(open_conns):
            try:
                msg: Request = conn.recv()
            except EOFError:
                open_conns.remove(conn)
                continue
            if msg is STOP:
                open_conns = []
                break
            try:
                if msg[0] == PING:
                    conn.send((PONG,))
                    continue
                if msg[0] == THREADS:
                    conn.send((THREADS, os.getpid(), thread_affinities()))
                    continue
                if msg[0] == SYNC:
                    conn.send_bytes(SYNC_REPLY + msg[1])
                    continue
                _, slot, stage, n = msg  # RunStage
                ins, outs = tensors(slot, stage, n)
                req = requests[slot][stage]
                for i, t in enumerate(ins):
                    req.set_input_tensor(i, t)
                for i, t in enumerate(outs):
                    req.set_output_tensor(i, t)
                t0 = time.perf_counter()
                req.infer()
                conn.send((DONE, stage, time.perf_counter() - t0))
            except Exception:
                conn.send((ERROR, msg[2] if len(msg) > 2 else "?", traceback.format_exc()))
    for shm in shms.values():
        shm.close()
