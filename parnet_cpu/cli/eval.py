"""`parnet-cpu eval`: top-1/top-5 of a saved model folder (FP32, BF16 or INT8) on an image folder."""
from __future__ import annotations

import argparse

from parnet_cpu.cli import CliError
from parnet_cpu.cli.common import (add_json_arg, add_model_dir_arg, add_overwrite_arg, check_output_arg,
                                     write_json_arg)
from parnet_cpu.options import arg
from parnet_cpu.quantization.base import QuantizeOptions, backend_names


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="accuracy of a model folder on a labelled image folder")
    add_model_dir_arg(p)
    p.add_argument("--data", required=True, help="labelled image folder (any supported layout)")
    p.add_argument("--labels", metavar="FILE", help="a label file kept outside --data: Kaggle LOC_val_solution.csv, "
                   "devkit ILSVRC2012_validation_ground_truth.txt or Caffe val.txt (type read from its name)")
    p.add_argument("--precision", choices=("fp32", "bf16", "int8"),
                   help="default: int8 if the folder has it, else fp32 (bf16 runs the FP32 IR with bf16 kernels)")
    p.add_argument("--backend", choices=backend_names(), default=QuantizeOptions.backend,
                   help="engine that runs the model (torch/ipex: their INT8 artifact from `quantize --backend`)")
    p.add_argument("--limit", type=arg("limit"), help="evaluate only the first N images")
    p.add_argument("--batch-size", type=arg("batch_size"), default=32)
    p.add_argument("--workers", type=arg("workers"))
    add_json_arg(p, "the full result (with per-class counts)")
    add_overwrite_arg(p, "an existing --json file")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from parnet_cpu.artifacts import ModelDir, ModelDirError
    from parnet_cpu.outputs import report_stamp
    from parnet_cpu.data import DatasetError, detect_layout, match_model_classes
    from parnet_cpu.evaluation import accuracy_summary, run_models
    from parnet_cpu.runtime.engine import CompileOptions, compile_model, precision_supported

    check_output_arg(args, "json", "eval")  # before the evaluation, not found unwritable after it
    try:
        md = ModelDir.open(args.model)
        precision = args.precision or ("int8" if args.backend != "openvino" else md.default_precision)
        ir = md.ir_path("fp32" if precision == "bf16" else precision) if args.backend == "openvino" else None
        ds = match_model_classes(detect_layout(args.data, label_file=args.labels), md.class_names)
    except (ModelDirError, DatasetError) as exc:
        raise CliError(str(exc)) from None
    if not ds.has_labels:
        raise CliError(f"{args.data} has no labels (layout {ds.layout}); eval needs a labelled folder")
    if precision == "bf16" and not precision_supported("bf16"):
        raise CliError("this CPU has no native bf16 (needs avx512_bf16 or AMX); use fp32 or int8")
    num_classes = md.config["num_classes"]
    if ds.num_classes is not None and ds.num_classes > num_classes:
        raise CliError(f"the data has {ds.num_classes} classes but the model predicts {num_classes}; for a model "
                       "fine-tuned on some of them, name its classes in output order when exporting "
                       "(`--classes FILE`) or put a classes.txt in the data folder")
    samples = ds.samples[: args.limit] if args.limit else ds.samples
    if args.backend == "openvino":
        compiled = compile_model(ir, CompileOptions(precision=precision))
    else:
        from parnet_cpu.quantization.base import QuantizationError, get_backend

        if precision == "bf16":
            raise CliError("--precision bf16 is an OpenVINO option")
        try:
            compiled = get_backend(args.backend).compile(md.path, precision)
        except (QuantizationError, FileNotFoundError) as exc:
            raise CliError(f"{exc} (run `parnet-cpu quantize --backend {args.backend}` first)") from None
    outs = run_models({precision: compiled}, samples, md.preprocess_config(), args.batch_size, args.workers,
                      progress=not args.quiet, desc=f"eval {precision}")
    result = {**report_stamp("eval"), "model": str(md.path), "precision": precision, "backend": args.backend, "ir": ir.name if ir else None, "data": str(ds.root), "layout": ds.layout,
              "label_file": str(ds.label_file) if ds.label_file is not None else None,
              "label_mapping": ds.label_mapping,
              **accuracy_summary(outs.logits[precision], outs.labels, md.class_names),
              "skipped": outs.report.failures, "skipped_files": ds.skipped_files}
    if "top1" not in result:
        raise CliError("no image could be decoded and evaluated")
    print(f"{precision}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  on {result['labelled']} images"
          + (f" ({len(result['skipped'])} undecodable skipped)" if result["skipped"] else ""))
    write_json_arg(args, "eval", result)
    return 0
