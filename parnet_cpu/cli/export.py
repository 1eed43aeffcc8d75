"""`parnet-cpu export`: reparameterize and write a model folder (OpenVINO IR, optional ONNX)."""
from __future__ import annotations

import argparse

from parnet_cpu.cli.common import (add_json_arg, add_model_args, check_out_arg, check_output_arg, model_from_args,
                                   sigterm_as_interrupt, write_json_arg)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="reparameterize a model and write OpenVINO IR (and ONNX)",
                       description="Fuse the training-form ParNet into its deploy form and write a model folder.")
    add_model_args(p)
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx")
    p.add_argument("--overwrite", action="store_true", help="replace an output folder written by parnet-cpu (never anything else)")
    add_json_arg(p, "what was written (folder, parameter counts, configuration)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    with sigterm_as_interrupt():
        check_output_arg(args, "json", "export")
        check_out_arg(args.out, args.overwrite, args)  # before any work (and before torch is even imported)
        from parnet_cpu.outputs import output_lock
        from parnet_cpu.models.parnet import count_parameters

        with output_lock(args.out):  # a second run to the same --out is refused now, not overwritten later
            out, model, deploy = _export(args)
    print(f"exported {args.model}: {count_parameters(model):,} params (training form) -> "
          f"{count_parameters(deploy):,} (deploy form) to {out}/")
    write_json_arg(args, "export", {"out": str(out), "model": args.model, "onnx": args.onnx,
                                    "params_train": count_parameters(model), "params_deploy": count_parameters(deploy),
                                    "config": model.cfg.to_dict()})
    return 0


def _export(args: argparse.Namespace):
    """The job itself (the output folder was checked and is held)."""
    from parnet_cpu.artifacts import ModelDirError
    from parnet_cpu.cli import CliError
    from parnet_cpu.export import export_model_dir
    from parnet_cpu.outputs import OutputError
    from parnet_cpu.reparam.fuse import reparameterize

    model, source = model_from_args(args)
    deploy = reparameterize(model)
    try:
        out = export_model_dir(deploy, args.out, source=source, onnx=args.onnx, overwrite=args.overwrite)
    except (ModelDirError, OutputError) as exc:
        raise CliError(str(exc)) from None
    return out, model, deploy
