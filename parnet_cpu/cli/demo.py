"""`parnet-cpu demo`: reparameterize, quantize, evaluate and benchmark the embedded default model."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the main job end to end: ParNet-S speed-up on this CPU, INT8 accuracy on the shipped reference model")
    p.add_argument("--out", default="parnet-demo", help="working folder (default: ./parnet-demo)")
    p.add_argument("--test-limit", type=int, help="evaluate only the first N test images (default: all 10,000)")
    p.add_argument("--quick", action="store_true", help="time each row for 0.2 s instead of 1 s (less precise)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from parnet_cpu.demo import run_demo

    if args.test_limit is not None and args.test_limit < 1:
        from parnet_cpu.cli import CliError

        raise CliError("--test-limit must be at least 1")
    run_demo(args.out, args.test_limit, min_seconds=0.2 if args.quick else 1.0)
    return 0
