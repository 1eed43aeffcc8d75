"""One leased `Runtime` per Ray process (a Serve replica or a Data actor), on its own cores.

Ray's CPU count is a scheduling number: it decides how many replicas or actors a node runs, never which
cores they run on. The cores come from the project's machine-wide leases (`runtime.leases`): each process
opens its Runtime with `cores="share:N"`, which leases it an equal, disjoint part of the node's free cores
among the N members of its pool (N = the replicas or actors one node runs). The pool is named by
`$PARNET_CPU_POOL`, set per deployment through Ray's `runtime_env`, so two deployments on one node are two
pools and a restarted replica takes the share its dead predecessor left (the kernel frees a dead process's
leases). The process's own threads (HTTP parsing, decoding) are then pinned to the same cores, so nothing a
replica does runs on another replica's cores.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

from parnet_cpu.runtime.leases import POOL_ENV, POOL_SPEC_PREFIX

__all__ = ["check_address", "pin_process", "pool_env", "pool_cores"]


def pool_cores(members_per_node: int) -> str:
    """The Runtime `cores` value of one member of a pool of `members_per_node` processes per node."""
    if isinstance(members_per_node, bool) or not isinstance(members_per_node, int) or members_per_node < 1:
        raise ValueError(f"the replicas or actors per node must be a positive integer, got {members_per_node!r}")
    return f"{POOL_SPEC_PREFIX}{members_per_node}"


def pool_env(pool: str) -> dict[str, str]:
    """Ray `runtime_env` variables naming the lease pool (one per deployment or dataset run), plus the lease
    folder of this process when one is set (a test's or a user's namespace must reach the workers)."""
    env = {POOL_ENV: pool}
    if os.environ.get("PARNET_CPU_LEASE_DIR"):
        env["PARNET_CPU_LEASE_DIR"] = os.environ["PARNET_CPU_LEASE_DIR"]
    return env


def pin_process(cpus) -> None:
    """Pin this process and its child processes to `cpus` (threads started later inherit it): the runtime's
    workers hold the leased cores already; this keeps the process's own work (Ray's threads, HTTP parsing,
    image decoding) and its helpers (multiprocessing's resource tracker) off the cores other replicas
    lease. A thread already pinned inside `cpus` (a runtime worker's) keeps its narrower set; a thread or
    process that ends meanwhile is skipped."""
    cpus = set(cpus)
    todo = [os.getpid()]
    while todo:
        pid = todo.pop()
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(int(tid), (os.sched_getaffinity(int(tid)) & cpus) or cpus)
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
            except (ProcessLookupError, FileNotFoundError):
                pass


def resolved(model_dir: str | os.PathLike) -> str:
    """The model folder as an absolute path: Ray processes do not start in the caller's directory."""
    return str(Path(model_dir).expanduser().resolve())


def check_address(address: str | None, timeout: float = 10.0) -> None:
    """A HOST:PORT Ray address that nothing answers is a `ConnectionError` at once: `ray.init` would retry
    for minutes, printing only gRPC warnings. "auto", ray:// and None (start a local instance) pass."""
    if not address or address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConnectionError(f"Ray address {address!r}: expected HOST:PORT (the head's GCS port, 6379 by default), "
                              "'auto' or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConnectionError(f"no Ray cluster answers at {address}: {exc}") from None
