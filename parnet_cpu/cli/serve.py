"""`parnet-cpu serve`: HTTP inference server (Open Inference Protocol / KServe v2 REST + /v1/classify).

One process per machine (or per core set): the runtime already uses every core it is given, so the
server scales by replicas behind a load balancer, never by uvicorn workers. See docs/serving.md.

Also runnable as `python -m parnet_cpu.cli.serve --model-dir DIR ...`.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import socket
import sys

from parnet_cpu.cli import CliError
from parnet_cpu.cli.bench import cores_per_stream_arg
from parnet_cpu.cli.common import add_json_arg, add_model_dir_arg, check_output_arg, stdout_for_json, write_json_arg
from parnet_cpu.options import arg


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_dir_arg(p)
    p.add_argument("--name", type=model_name_arg, default="parnet",
                   help="model name in the v2 API: letters, digits, '.', '_', '-' (default: parnet)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=arg("port"), default=8000, help="TCP port (default: 8000; 0 = any free port)")
    r = p.add_argument_group("runtime")
    r.add_argument("--cores-per-stream", type=cores_per_stream_arg, default="auto", metavar="N",
                   help="cores per ParNet stream, or auto (default)")
    r.add_argument("--cores", help="explicit groups, one per stream, separated by ':' e.g. 0-3:4-7:8-11")
    r.add_argument("--precision", choices=("fp32", "bf16", "int8"), help="default: int8 if present, else fp32")
    r.add_argument("--plan", choices=("auto", "single", "multistream"), default="auto")
    r.add_argument("--share-cores", action="store_true",
                   help="run on cores another Runtime on this machine holds (warns; both run slower). "
                   "Default: only free cores, and a clear error naming the holder when none are")
    r.add_argument("--replicas", type=replicas_arg, default=1, metavar="N|auto",
                   help="N single-graph runtimes on disjoint free core groups behind one batcher, for "
                   "throughput (default: 1); auto: the most throughput whose p99 meets --p99-ms, measured at start")
    r.add_argument("--p99-ms", type=arg("p99_ms"), metavar="MS",
                   help="latency target for --replicas auto (default: 1.5x one replica's p50 at batch 1)")
    r.add_argument("--inflight", type=arg("inflight"), default=2,
                   help="batches inside the runtime at once (default: 2)")
    b = p.add_argument_group("batching and limits")
    b.add_argument("--max-batch", type=arg("max_batch"), default=8,
                   help="images per batch (default: 8; 1 = no batching)")
    b.add_argument("--max-wait-ms", type=arg("max_wait_ms"), default=2.0,
                   help="how long the oldest request waits for a "
                   "fuller batch (default: 2)")
    b.add_argument("--max-queue", type=arg("max_queue"), default=256,
                   help="images waiting; beyond this 503 (default: 256)")
    b.add_argument("--max-body-mb", type=arg("max_body_mb"), default=32.0,
                   help="request body limit, 413 above (default: 32)")
    b.add_argument("--max-image-pixels", type=arg("max_image_pixels"), default=40_000_000,
                   help="decoded image limit (default: 40M)")
    b.add_argument("--cpu-threads", type=arg("cpu_threads"),
                   help="threads for decoding/parsing (default: min(4, CPUs))")
    b.add_argument("--max-connections", type=arg("max_connections"), default=256,
                   help="open connections; requests beyond answer "
                   "503 (default: 256)")
    b.add_argument("--header-timeout", type=arg("header_timeout_s"), default=10.0,
                   help="seconds for a request's line and headers "
                   "to arrive, else the connection is closed (default: 10)")
    b.add_argument("--body-timeout", type=arg("body_timeout_s"), default=60.0,
                   help="seconds for a request's whole body to "
                   "arrive, else 408 (default: 60)")
    b.add_argument("--infer-timeout", type=arg("infer_timeout_s"), default=60.0,
                   help="seconds one batch may take in the runtime, "
                   "else 504 (a stopped or stuck worker; default: 60)")
    o = p.add_argument_group("operations")
    o.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="serve through Ray Serve (the 'ray' extra): --replicas N replicas, each one runtime on its "
                   "own leased cores, the same HTTP API; ADDRESS: a Ray cluster (auto, HOST:PORT, ray://...), "
                   "or none to start a local one. See docs/serving.md, Scaling out")
    o.add_argument("--runtime-restarts", type=arg("max_restarts"), default=3,
                   help="times the server replaces its runtime when a "
                   "worker process dies (then /v2/health/live turns 503; 0: at once; default: 3)")
    o.add_argument("--graceful-timeout", type=arg("graceful_timeout_s"), default=30.0,
                   help="seconds to drain in-flight requests after SIGTERM (default: 30)")
    o.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    o.add_argument("--no-access-log", dest="access_log", action="store_false", help="no per-request log line")
    add_json_arg(o, "the start-up plan (address, model, runtime plan and cores), once the server is ready,")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="HTTP server: KServe v2 inference protocol + /v1/classify, dynamic batching")
    add_arguments(p)
    p.set_defaults(handler=run)


def model_name_arg(text: str) -> str:
    """--name: refused unless the v2 routes can serve it (the same check as `ServeConfig`)."""
    try:
        from parnet_cpu.serve.app import check_model_name
    except ImportError:  # no web stack: run() says what is missing
        return text
    try:
        return check_model_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


replicas_arg = arg("replicas")


def _validate(args: argparse.Namespace) -> None:
    """What no single flag's type can see (each number is checked by its type: `parnet_cpu.options`)."""
    if args.max_queue < args.max_batch:
        raise CliError("--max-queue must be at least --max-batch")
    if args.replicas != 1 and (args.cores or args.plan != "auto" or args.cores_per_stream != "auto"):
        raise CliError("--replicas runs single-graph runtimes on free cores it splits itself: drop --cores, "
                       "--plan and --cores-per-stream")
    if args.p99_ms is not None and args.replicas != "auto":
        raise CliError("--p99-ms needs --replicas auto")
    if args.ray is not None and (args.replicas == "auto" or args.cores or args.plan != "auto"
                                 or args.cores_per_stream != "auto"):
        raise CliError("--ray runs --replicas N (a number) single-graph replicas, each on its leased share of its "
                       "node's cores: drop --replicas auto, --cores, --plan and --cores-per-stream")


def _bind(host: str, port: int) -> socket.socket:
    """Bind before the runtime starts: a taken port fails fast, and nothing accepts until uvicorn listens."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as exc:
        raise CliError(f"cannot bind {host}:{port}: {exc}") from None
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _start_runtime(config):
    """Start the runtime's worker processes with SIGINT ignored, which they inherit: Ctrl-C then reaches
    only the server, which drains in-flight requests before it stops the workers itself."""
    from parnet_cpu.artifacts import ModelDirError
    from parnet_cpu.runtime.cores import CoreSpecError
    from parnet_cpu.serve.app import open_runtime

    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        previous = None
    try:
        return open_runtime(config)
    except (CoreSpecError, ModelDirError, ValueError) as exc:
        raise CliError(str(exc)) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def run(args: argparse.Namespace) -> int:
    from parnet_cpu.artifacts import ModelDir, ModelDirError

    _validate(args)
    check_output_arg(args, "json", "serve")  # before the port and the cores are taken
    try:
        ModelDir.open(args.model)
    except ModelDirError as exc:
        raise CliError(str(exc)) from None
    try:
        import uvicorn

        from parnet_cpu.serve.app import ServeConfig, create_app
        from parnet_cpu.serve.metrics import configure_logging
        from parnet_cpu.serve.http_protocol import RepeatFilter, connection_budget, server_protocol
    except ImportError as exc:
        raise CliError(f"serving needs the web stack ({exc.name} is missing): "
                       "pip install starlette uvicorn prometheus-client python-multipart") from None
    configure_logging(args.log_level)
    for handler in logging.getLogger().handlers:
        handler.addFilter(RepeatFilter())  # a flood of one warning (failing accepts, garbage requests) stays small
    log = logging.getLogger("parnet_cpu.serve")
    config = ServeConfig(model=args.model, name=args.name, cores_per_stream=args.cores_per_stream, cores=args.cores,
                         precision=args.precision, plan=args.plan, share_cores=args.share_cores,
                         replicas=args.replicas, p99_ms=args.p99_ms,
                         max_batch=args.max_batch,
                         max_wait_ms=args.max_wait_ms, max_queue=args.max_queue, inflight=args.inflight,
                         max_body_bytes=int(args.max_body_mb * 1024 * 1024), max_image_pixels=args.max_image_pixels,
                         cpu_threads=args.cpu_threads, access_log=args.access_log,
                         infer_timeout_s=args.infer_timeout, body_timeout_s=args.body_timeout,
                         header_timeout_s=args.header_timeout, max_connections=args.max_connections,
                         max_restarts=args.runtime_restarts)
    if args.ray is not None:
        return _serve_on_ray(args, config)
    sock = _bind(args.host, args.port)
    if not _is_loopback(args.host):
        log.warning("binding a non-loopback address: the API has no authentication; put it behind a proxy "
                    "or a network policy", extra={"host": args.host})
    runtime = _start_runtime(config)
    try:
        try:
            budget = connection_budget(args.max_connections)  # with the runtime's descriptors open
        except ValueError as exc:
            raise CliError(str(exc)) from None
        (log.warning if budget.max_connections < budget.asked else log.info)(
            f"at most {budget.max_connections} connections (--max-connections {budget.asked}; file descriptor "
            f"limit {budget.fd_soft_limit or 'unlimited'}, {budget.fds_in_use} in use); requests beyond answer "
            f"503, connections beyond {budget.max_open} are closed at once", extra=budget.describe())
        app = create_app(config, runtime=runtime)
        host, port = sock.getsockname()[:2]
        plan = {"url": f"http://{args.host}:{port}", "host": host, "port": port, "pid": os.getpid(),
                "model": args.model, "name": args.name, "max_connections": budget.max_connections}
        ready_server = _server_reporting_ready(uvicorn, args, lambda: {**plan, "runtime": runtime.describe()})
        server = ready_server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                                               server_header=False, log_level=args.log_level,
                                               timeout_graceful_shutdown=args.graceful_timeout,
                                               http=server_protocol(args.header_timeout, budget),
                                               limit_concurrency=None, ws="none", backlog=budget.backlog))
        log.info("listening", extra={"host": host, "port": port, "url": f"http://{args.host}:{port}"})
        try:
            server.run(sockets=[sock])
        except SystemExit as exc:
            if exc.code:
                raise CliError("the server failed to start (see the log above)") from None
        if not server.started:
            raise CliError("the server failed to start (see the log above)")
        if server.report_error is not None:  # the plan could not be written: the server stopped at once
            raise server.report_error
    finally:
        runtime.close()  # idempotent: normally the app already closed it after draining
        sock.close()
    return 0


def _server_reporting_ready(uvicorn, args: argparse.Namespace, plan):
    """A uvicorn.Server class that writes `--json` (`plan()`) once it is ready: listening, and the app's start-up
    (runtime, self-test, batcher) done. Where the plan cannot be written, the server stops at once and `run`
    raises the error: a supervisor waiting for the file never waits on a server that cannot say it is up."""
    log = logging.getLogger("parnet_cpu.serve")

    class ReadyServer(uvicorn.Server):
        report_error: BaseException | None = None

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started and not self.should_exit:
                try:
                    write_json_arg(args, "serve", plan())
                except (OSError, CliError) as exc:
                    log.error(f"--json {args.json}: {exc}; stopping")
                    self.report_error, self.should_exit = exc, True

    return ReadyServer


def _serve_on_ray(args: argparse.Namespace, config) -> int:
    """`--ray [ADDRESS]`: the same app as replicas of a Ray Serve deployment (`parnet_cpu.ray`), until
    SIGINT/SIGTERM. Ray is imported only here."""
    try:
        from parnet_cpu.ray.deployment import run_server
    except ImportError as exc:
        raise CliError(f"--ray needs the 'ray' extra ({exc.name} is missing): pip install 'parnet-cpu[ray]'") from None
    log = logging.getLogger("parnet_cpu.serve")
    address = None if args.ray == "local" else args.ray
    try:
        run_server(args.model, int(args.replicas), address=address, host=args.host, port=args.port, config=config,
                   ready=lambda url: (log.info("listening (Ray Serve)", extra={"url": url, "replicas": args.replicas}),
                                      write_json_arg(args, "serve", {"url": url, "model": args.model, "name": args.name,
                                                                     "ray": args.ray, "replicas": args.replicas})))
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise CliError(f"Ray Serve: {exc}") from None
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m parnet_cpu.cli.serve`: the same command without the `parnet-cpu` entry point."""
    parser = argparse.ArgumentParser(prog="parnet-cpu serve", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        with stdout_for_json(args):
            return run(args)
    except CliError as exc:
        print(f"parnet-cpu serve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
