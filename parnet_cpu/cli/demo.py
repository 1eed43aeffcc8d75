"""`parnet-cpu demo`: reparameterize, quantize, evaluate and benchmark the embedded default model."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the main job end to end on the shipped reference model (a few minutes)")
    p.add_argument("--out", default="parnet-demo", help="working folder (default: ./parnet-demo)")
    p.add_argument("--test-limit", type=int, help="evaluate only the first N test images (default: all 10,000)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from parnet_cpu.demo import run_demo

    run_demo(args.out, args.test_limit)
    return 0
