"""`parnet-cpu slim DIR`: make a model folder serving-only (what a container image needs), still verifiable.

A folder from `quantize` holds the FP32 and INT8 IRs, the deploy-form torch weights (model_deploy.pt, for
bench's eager and ONNX baselines and the torch backends) and maybe model.onnx; a Runtime or `serve` reads
only parnet.json and one IR. slim keeps those (and report.json and the runtime's caches), records in the
manifest what it removed, and re-seals it, so `verify` passes on the slim folder (see
`artifacts.slim_model_dir`).
"""
from __future__ import annotations

import argparse

from parnet_cpu.cli.common import add_json_arg, check_output_arg, write_json_arg


def register(sub: argparse._SubParsersAction) -> None:
    from parnet_cpu.artifacts import IR_FILES

    p = sub.add_parser("slim", help="make a model folder serving-only: keep parnet.json and the IR a Runtime "
                       "serves, remove the rest (verify still passes)",
                       description="Keep parnet.json, the IR of the precisions to serve, report.json and the "
                       "runtime's caches; remove the other model files the manifest records (FP32 IR when INT8 "
                       "is kept, model_deploy.pt, model.onnx, the torch INT8 program) and re-seal the manifest, "
                       "which then says the folder is serving-only. The kept files are checked first.")
    p.add_argument("model", metavar="DIR", help="model folder written by export or quantize")
    p.add_argument("--keep", action="append", choices=tuple(IR_FILES), metavar="PRECISION",
                   help="a precision to keep (repeat for more; default: the one a Runtime loads, int8 where "
                   f"present, else fp32; choices: {', '.join(IR_FILES)})")
    add_json_arg(p, "what was kept, removed and freed")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from parnet_cpu.artifacts import slim_model_dir

    check_output_arg(args, "json", "slim")  # before any file is removed (a FILE inside DIR is refused)
    result = slim_model_dir(args.model, args.keep)  # a ModelDirError is exit 2 with its message (cli.main)
    removed = ", ".join(result["removed"]) or "nothing"
    print(f"{args.model}: serving-only, keeps {', '.join(result['kept'])}; removed {removed} "
          f"({result['bytes_freed'] / 1e6:.1f} MB freed)")
    write_json_arg(args, "slim", {"model": args.model, **result})
    return 0
