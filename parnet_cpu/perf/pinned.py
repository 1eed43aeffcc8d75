"""Run one function in a fresh process pinned to given CPUs, and get its result back (or a clear error).

The one pinned child-process harness of the project: `parnet-cpu bench` runs every competing engine in
one, the per-layer cost model (`costmodel.profile_stages`, used by `parnet-cpu plan`) profiles in one,
`bench --cost-model` times each thread count in one. The child is spawned (no inherited OpenVINO/torch
thread pools), pins every thread of itself before `target` imports anything heavy, and sends back
`("ok", result)` or `("error", "Type: message")`.

The parent closes its copy of the child's end of the pipe right after the start, so the child holds the
only writer: a child that dies without answering (segfault, OOM kill, `os._exit`) makes the parent's
`recv()` see end-of-file at once instead of waiting forever; a child that never answers is killed after
`timeout_s`. Both raise `PinnedChildError` naming what ran and how it ended.
"""
from __future__ import annotations

import multiprocessing as mp
from typing import Any, Callable, Sequence

DEFAULT_TIMEOUT_S = 1800.0  # compiling and timing a large model on one core takes minutes, never half an hour
JOIN_TIMEOUT_S = 30.0


class PinnedChildError(RuntimeError):
    """The pinned child raised (the message is its "Type: message"), died, or did not answer in time."""


class PinnedChildTimeout(PinnedChildError):
    """The pinned child gave no answer within the timeout; it has been killed."""


def _child_main(target: Callable[..., Any], args: tuple, cpus: list[int], conn) -> None:
    from parnet_cpu.system.affinity import pin_process

    try:
        pin_process(cpus)
        result = target(*args)
    except Exception as exc:  # reported to the parent, which decides whether it is fatal
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    else:
        conn.send(("ok", result))
    finally:
        conn.close()


def _stop(proc) -> None:
    proc.join(timeout=JOIN_TIMEOUT_S)
    if proc.is_alive():
        proc.kill()
        proc.join(timeout=5)


def run_pinned(target: Callable[..., Any], args: Sequence = (), cpus: Sequence[int] = (), *,
               timeout_s: float = DEFAULT_TIMEOUT_S, what: str = "pinned child") -> Any:
    """`target(*args)` in a spawned process pinned to `cpus`; its return value (both must pickle).

    Raises `PinnedChildError` with the child's exception as "Type: message", or saying that the child
    died (with its exit code) or, as `PinnedChildTimeout`, gave no answer in `timeout_s` seconds."""
    ctx = mp.get_context("spawn")
    parent_end, child_end = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(target, tuple(args), list(cpus), child_end), daemon=True)
    proc.start()
    child_end.close()  # the child now holds the only writer: its death is end-of-file here
    try:
        if not parent_end.poll(timeout_s):
            proc.kill()
            raise PinnedChildTimeout(f"{what}: no answer in {timeout_s:g} s (child killed)")
        try:
            status, payload = parent_end.recv()
        except EOFError:
            proc.join(timeout=5)
            code = proc.exitcode
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            raise PinnedChildError(f"{what}: the child process died without answering ({how})") from None
    finally:
        parent_end.close()
        _stop(proc)
    if status != "ok":
        raise PinnedChildError(payload)
    return payload
