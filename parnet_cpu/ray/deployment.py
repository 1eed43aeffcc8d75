"""Ray Serve: N replicas of `parnet-cpu serve`'s app, each one leased `Runtime` on its own cores.

Every replica runs the server's own Starlette app (`serve.app.create_app`) behind Ray Serve's ASGI ingress,
so clients see the same HTTP API, errors and health endpoints as `parnet-cpu serve` (KServe v2 +
`/v1/classify`); Ray's proxy routes requests to replicas, restarts a replica whose process died, and
replaces one whose health check fails. The health check is the app's own liveness: a runtime that failed
more often than `max_restarts` (the app's `/v2/health/live` answers 503) fails it, as an orchestrator's
liveness probe would. Torch-free.

    from ray import serve
    from parnet_cpu.ray import deployment
    serve.run(deployment("out/", replicas=2), route_prefix="/")
"""
from __future__ import annotations

import dataclasses
import os
import signal
import threading
from typing import Any

from ray import serve

from parnet_cpu.artifacts import ModelDir
from parnet_cpu.ray.placement import check_address, pin_process, pool_cores, pool_env, resolved
from parnet_cpu.serve.app import ServeConfig, create_app, open_runtime

__all__ = ["ParnetReplica", "deployment", "leased_runtime", "run_server"]

SERVE_FIELDS = {f.name for f in dataclasses.fields(ServeConfig)} - {"model", "cores", "plan", "cores_per_stream",
                                                                    "replicas", "p99_ms"}


def leased_runtime(config: ServeConfig):
    """The app's runtime factory in a replica: `open_runtime` (lease, start, self-test) on the replica's share
    of the node's cores (`config.cores` is "share:N"), then the replica's own threads pinned to it. Also what
    the app calls to replace a runtime whose worker died."""
    rt = open_runtime(config)
    pin_process(rt.plan.cpus)
    return rt


@serve.ingress()
class ParnetReplica:
    """One replica: the server's ASGI app, built in the replica process (`__serve_build_asgi_app__`); its
    lifespan starts the leased runtime before Ray routes any request here."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config

    def __serve_build_asgi_app__(self):
        return create_app(self.config, runtime_factory=leased_runtime)

    def check_health(self) -> None:
        """Ray Serve's liveness probe: fails exactly when the app's /v2/health/live would answer 503."""
        svc = self.app.state.service
        why = svc.failure()
        if why is not None and not svc.recoverable():
            raise RuntimeError(f"the runtime failed {svc.restarts} time(s), last: {why}")


def deployment(model_dir: str | os.PathLike, replicas: int = 1, *, replicas_per_node: int | None = None,
               num_cpus: float = 1.0, config: ServeConfig | None = None, **options: Any) -> serve.Application:
    """A Ray Serve application of `replicas` replicas of `parnet-cpu serve` on `model_dir` (a path that
    exists on every node). Each replica leases `1/replicas_per_node` of its node's free cores (default: all
    replicas on one node); Ray places at most `replicas_per_node` replicas on a node. `num_cpus` is what
    Ray's scheduler counts per replica, not the cores it gets. The server's settings: `config` (a
    `ServeConfig`, as `parnet-cpu serve` builds it) or `options`, any of its fields (name, max_batch,
    max_wait_ms, max_queue, precision, share_cores, infer_timeout_s, max_restarts, ...); its core fields
    (cores, plan, cores_per_stream, replicas) are this function's to set."""
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas must be a positive integer, got {replicas!r}")
    per_node = replicas if replicas_per_node is None else replicas_per_node
    cores = pool_cores(per_node)
    unknown = sorted(set(options) - SERVE_FIELDS)
    if unknown:
        raise TypeError(f"unknown serve option(s) {', '.join(unknown)}; known: {', '.join(sorted(SERVE_FIELDS))}")
    model = resolved(model_dir)
    ModelDir.open(model)  # a wrong folder is said here, not by every replica on start-up
    base = config if config is not None else ServeConfig(model=model, **options)
    config = dataclasses.replace(base, **options, model=model, cores=cores, plan="single", cores_per_stream="auto",
                                 replicas=1, p99_ms=None)
    dep = serve.deployment(
        ParnetReplica, name=config.name, num_replicas=replicas,
        max_replicas_per_node=per_node if per_node < replicas else None,
        # the app's own queue answers 503 when full, as `parnet-cpu serve` does: Ray queues nothing in front
        max_ongoing_requests=config.max_queue + config.max_batch,
        ray_actor_options={"num_cpus": num_cpus, "runtime_env": {"env_vars": pool_env(f"ray-serve/{config.name}")}},
        health_check_period_s=max(1.0, config.health_interval_s), health_check_timeout_s=30.0)
    return dep.bind(config)


def run_server(model_dir: str | os.PathLike, replicas: int, *, address: str | None = None, host: str = "127.0.0.1",
               port: int = 8000, ready=None, **kwargs: Any) -> None:
    """`parnet-cpu serve --ray [ADDRESS] --replicas N`: connect to the Ray cluster at `address` ("auto", a
    head's host:port, ray://...) or start a local one (None), deploy, and serve until SIGINT/SIGTERM; then the
    application is deleted (and a local cluster stopped). `ready(url)` is called once requests are answered."""
    import ray

    app = deployment(model_dir, replicas, **kwargs)
    name = kwargs["config"].name if kwargs.get("config") is not None else kwargs.get("name", "parnet")
    stop = threading.Event()
    check_address(address)
    ray.init(address=address, include_dashboard=False, log_to_driver=True)
    # after ray.init, which installs a SIGTERM handler of its own that exits at once: ours drains first
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name=name, route_prefix="/")
        if ready is not None:
            ready(f"http://{host}:{port}")
        stop.wait()
        serve.delete(name)
        if address is None:
            serve.shutdown()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        ray.shutdown()
