"""Argument groups and helpers shared by several sub-commands (one definition, many users)."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from contextlib import contextmanager, redirect_stdout
from dataclasses import replace
from typing import Iterator, Sequence

from parnet_cpu.cli import CliError
from parnet_cpu.options import arg, arg_list


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (kill, `docker stop`, systemd) acts like Ctrl-C, so the same cleanup runs (the temporary
    output folder is removed) and the command exits with status 130 instead of dying mid-write."""
    received: list[int] = []

    def interrupt(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    except Exception:
        if received:  # the interrupt surfaced wrapped (e.g. an ImportError while a C extension loaded)
            raise KeyboardInterrupt(f"signal {received[0]}") from None
        raise
    finally:
        signal.signal(signal.SIGTERM, old)


# argparse dests whose values are paths a command reads, and the flag each is shown as (a test walks every
# sub-command's options and fails on a path-like flag that is in neither map, so none is missed)
INPUT_FLAGS = {"model": "--model-dir", "data": "--data", "val": "--val", "calib": "--calib", "labels": "--labels",
               "classes": "--classes", "checkpoint": "--checkpoint", "fmnist_dir": "--fmnist-dir", "fit": "--fit",
               "machine": "--machine", "images": "--images", "class_names": "--class-names", "root": "--root"}
# argparse dests of what a command writes (single files, or folders for export/quantize/dataset/demo/bench)
OUTPUT_FLAGS = {"json": "--json", "report": "--report", "plot": "--plot", "export": "--export", "out": "--out",
                "report_folder": "--report-folder"}


STDOUT = "-"  # `--json` without FILE (or `--json -`): the JSON goes to stdout, alone
# output folders a command writes only some named files into (bench --report-folder): another output may lie in
# such a folder but not be one of those files. Every other output, file or folder, is the command's as a whole:
# nothing else may be it or lie inside it (a model folder is replaced whole).
OUTPUT_FOLDER_FILES = {"report_folder": ("benchmark_report.json", "parnet_bench.json")}


def _path_value(dest: str, value: object) -> bool:
    """Does this flag value name a path? Not when unset, a boolean, or `--json` meaning stdout."""
    return value is not None and not isinstance(value, bool) and not (dest == "json" and value == STDOUT)


def command_paths(args: argparse.Namespace) -> dict[str, object]:
    """Flag -> path(s) of everything the command reads: what an output must not be, nor lie inside (its
    outputs among themselves: `check_output_clash`). An input (`--model parnet_s`, `--data fmnist`) only
    counts where it names an existing path."""
    found: dict[str, object] = {}
    for dest, flag in INPUT_FLAGS.items():
        value = getattr(args, dest, None)
        if not _path_value(dest, value) or not (isinstance(value, list) or os.path.lexists(str(value))):
            continue  # unset, or a variant name, `--data fmnist`: not a path
        if dest == "model" and not os.path.isdir(str(value)):
            flag = "--model"
        found[flag] = value
    return found


def check_output_clash(args: argparse.Namespace, dest: str, value: object | None = None) -> None:
    """Refuse (CliError) output `dest` (at `value`, default its flag's value) where it would be another output
    of the command, lie inside one, or contain one: two outputs cannot be one file, and a folder the command
    writes whole takes nothing else. In an `OUTPUT_FOLDER_FILES` folder only the files the command writes
    there itself are taken (`bench --report-folder peers --json peers/mine.json` is fine)."""
    value = getattr(args, dest, None) if value is None else value
    if not _path_value(dest, value):
        return
    flag, command = OUTPUT_FLAGS[dest], getattr(args, "command", None) or "this command"
    target = os.path.realpath(os.path.expanduser(str(value)))

    def same(a: str, b: str) -> bool:
        return a == b or (os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))

    for other, other_flag in OUTPUT_FLAGS.items():
        where = getattr(args, other, None)
        if other == dest or not _path_value(other, where):
            continue
        real = os.path.realpath(os.path.expanduser(str(where)))
        if other in OUTPUT_FOLDER_FILES:
            for name in OUTPUT_FOLDER_FILES[other]:
                if same(target, os.path.join(real, name)):
                    raise CliError(f"{flag} {value} is {name} in {other_flag} {where}, a file {command} writes there "
                                   f"itself: name another file for {flag}")
        elif same(target, real):
            raise CliError(f"{flag} {value} is also {other_flag} {where}: two outputs of {command} cannot be one "
                           f"file; name another file for {flag}")
        elif target.startswith(real.rstrip(os.sep) + os.sep):
            raise CliError(f"{flag} {value} lies inside {other_flag} {where}, which {command} writes as a whole: "
                           f"put {flag} elsewhere")
        elif real.startswith(target.rstrip(os.sep) + os.sep):
            raise CliError(f"{flag} {value} contains {other_flag} {where}, another output of {command}: put "
                           f"{other_flag} elsewhere")


def check_out_arg(out: str, overwrite: bool, args: argparse.Namespace | None = None, **inputs: str | None) -> None:
    """Refuse a bad --out model folder before any work (see `outputs.check_output_dir`); its inputs: every path
    flag of `args` (`command_paths`) plus `inputs` (flag name -> path)."""
    from parnet_cpu.artifacts import foreign_model_dir_problem
    from parnet_cpu.outputs import OutputError, check_output_dir

    every = {**(command_paths(args) if args is not None else {}), **{f"--{k}": v for k, v in inputs.items()}}
    if args is not None:
        check_output_clash(args, "out", out)
    try:
        check_output_dir(out, overwrite, every, foreign=foreign_model_dir_problem)
    except OutputError as exc:
        raise CliError(str(exc)) from None


def check_output_arg(args: argparse.Namespace, dest: str, report: str | None = None) -> None:
    """Refuse, before any work, a single-file output flag (`dest`: json, report, plot, export, out) that would
    destroy an input or another output of the command, or replace a file this tool did not write (a
    `report` of that kind it wrote may be replaced; anything else needs --overwrite): see
    `outputs.check_output_file`. Unset: nothing to check."""
    from parnet_cpu.outputs import OutputError, check_output_file

    out = getattr(args, dest, None)
    if not _path_value(dest, out):
        return
    check_output_clash(args, dest)
    try:
        check_output_file(out, OUTPUT_FLAGS[dest], command_paths(args),
                          overwrite=bool(getattr(args, "overwrite", False)), report=report)
    except OutputError as exc:
        raise CliError(str(exc)) from None


@contextmanager
def output_arg(args: argparse.Namespace, dest: str, report: str | None = None, mode: str = "w") -> Iterator:
    """Write the single-file output `dest` of the command: `outputs.output_file` (checked again, atomic, a
    place's OSError is exit 74 naming the flag and path) with this command's inputs and other outputs."""
    from parnet_cpu.outputs import OutputError, output_file

    check_output_arg(args, dest, report)  # said as a usage error (exit 2); output_file checks once more
    try:
        with output_file(getattr(args, dest), OUTPUT_FLAGS[dest], command_paths(args),
                         overwrite=bool(getattr(args, "overwrite", False)), report=report, mode=mode) as f:
            yield f
    except OutputError as exc:  # something became an input or a foreign file since the check
        raise CliError(str(exc)) from None


def write_report_arg(args: argparse.Namespace, dest: str, kind: str, obj: dict) -> None:
    """A JSON report flag (--json, --report) through `output_arg`, stamped as `kind` (`outputs.report_stamp`)
    so the next run of the command recognises it as its own to replace. When the place refuses the report
    after the command's work is done (a disk that filled meanwhile, /dev/full), the report goes to stdout
    instead of being lost and the error that follows (exit 74, or 2 for a refused path) says where it is: a
    slim, a quantization or an evaluation has already happened, and the report is the only account of it."""
    from parnet_cpu.outputs import OutputError, report_stamp

    body = obj if "report" in obj else {**report_stamp(kind), **obj}
    text = json.dumps(body, indent=2, sort_keys=True, default=str) + "\n"
    try:
        with output_arg(args, dest, report=kind) as f:
            f.write(text)
    except (OSError, CliError, OutputError):
        where = "printed above (JSON)" if sys.stdout is not None else "lost: stdout is closed too"
        if sys.stdout is not None:  # None: the process was started with its stdout closed (`>&-`)
            print(text, end="", flush=True)
        print(f"the {kind} report is {where}, because --{dest.replace('_', '-')} {getattr(args, dest)} could not "
              "be written", file=sys.stderr)
        raise


JSON_HELP = "write {what} as JSON to FILE, or to stdout without FILE (or with -)"
_json_stdout: list = []  # the real stdout while `stdout_for_json` lends sys.stdout's place to stderr


def add_json_arg(p: argparse.ArgumentParser, what: str) -> None:
    """The one `--json [FILE]` of every command (a test walks the parser): FILE is a checked single-file output
    (stamped, atomic; a report of the same command may be replaced), no FILE or `-` is stdout."""
    p.add_argument("--json", nargs="?", const=STDOUT, metavar="FILE", help=JSON_HELP.format(what=what))


@contextmanager
def stdout_for_json(args: argparse.Namespace) -> Iterator[None]:
    """With `--json` to stdout, stdout carries the JSON alone (`| jq` works): whatever else the command prints
    (tables, progress, `wrote ...`) goes to stderr meanwhile. Entered once, around the command's handler."""
    if not json_to_stdout(args):
        yield
        return
    _json_stdout.append(sys.stdout)
    try:
        with redirect_stdout(sys.stderr):
            yield
    finally:
        _json_stdout.pop()


def json_to_stdout(args: argparse.Namespace) -> bool:
    """`--json` alone or `--json -`: commands whose text would only repeat the JSON (info, verify) skip it."""
    return getattr(args, "json", None) == STDOUT


def write_json_arg(args: argparse.Namespace, kind: str, obj: dict) -> None:
    """The one writer of `--json`: to stdout as it is, or to FILE through `write_report_arg` (stamped as `kind`,
    checked, atomic; on stdout if the place refuses it after all). Unset: nothing."""
    if getattr(args, "json", None) is None:
        return
    if args.json != STDOUT:
        write_report_arg(args, "json", kind, obj)
        return
    stream = _json_stdout[-1] if _json_stdout else sys.stdout
    stream.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    stream.flush()


def add_overwrite_arg(p: argparse.ArgumentParser, what: str = "an existing output file") -> None:
    """--overwrite for commands with single-file outputs: replace {what} this tool did not write (never an
    input of the command)."""
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace {what} even when it is not a report of this command (never an input)")


class _VariantFlagOnFolderCommand(argparse.Action):
    """`--model` on a command that reads a model folder: a usage error naming --model-dir. Registered (not
    just absent) because argparse would otherwise take `--model` as an abbreviation of `--model-dir`."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} names a variant (export, quantize, train); this command reads a model "
                     f"folder: use --model-dir {values or 'DIR'}")


def add_model_dir_arg(p: argparse.ArgumentParser, required: bool = True, extra_help: str = "") -> None:
    """--model-dir DIR for the commands that read a model folder. One meaning per flag name across the CLI:
    --model NAME is a variant (the commands that build a model), so here it is refused, naming --model-dir."""
    p.add_argument("--model-dir", dest="model", metavar="DIR", required=required,
                   help="model folder written by export or quantize" + extra_help)
    p.add_argument("--model", nargs="?", action=_VariantFlagOnFolderCommand, dest="model_flag_refused",
                   default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def add_model_args(p: argparse.ArgumentParser, default: str = "parnet_s") -> None:
    """--model NAME [--checkpoint FILE] plus overrides that build any ParNet configuration."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default=default, help=f"registered variant (default: {default}); see `parnet-cpu models`")
    g.add_argument("--checkpoint", help="weights: authors' .pth.tar (state_dict / state_dict_ema) or our own file")
    g.add_argument("--ema", action="store_true", help="load state_dict_ema instead of state_dict")
    g.add_argument("--num-classes", type=arg("num_classes"))
    g.add_argument("--planes", type=arg_list("planes"), help="override widths, e.g. 16,32,64,128")
    g.add_argument("--blocks", type=arg_list("blocks"), help="override blocks per stage, e.g. 5,6,6,1")
    g.add_argument("--input-size", type=arg("input_size"), help="input side in pixels (multiple of 32)")
    g.add_argument("--in-chans", type=arg("in_chans"))
    g.add_argument("--activation", choices=("relu", "silu"))
    g.add_argument("--stem-stride", type=arg("stem_stride"), choices=(1, 2))
    g.add_argument("--classes", metavar="FILE", help="the model's class names in output order, one per line (e.g. "
                   "the 10 synsets of a fine-tune); sets --num-classes, stored in the model folder, and matched "
                   "against class-folder names by eval and quantize")
    p_ = p.add_argument_group("preprocessing (stored in the model folder; default: the variant's)")
    p_.add_argument("--mean", type=arg_list("mean"), help="per-channel mean on the 0-1 scale, e.g. 0.485,0.456,0.406")
    p_.add_argument("--std", type=arg_list("std"), help="per-channel std on the 0-1 scale, e.g. 0.229,0.224,0.225")
    p_.add_argument("--crop-pct", type=arg("crop_pct"), help="centre-crop fraction: resize the short side to "
                    "input/crop-pct, then crop input x input (0.875 for ImageNet; 1.0: no crop)")
    p_.add_argument("--interpolation", choices=("nearest", "bilinear", "bicubic", "lanczos"),
                    help="resize filter")


def read_class_names(path: str) -> tuple[str, ...]:
    """--classes FILE: the model's class names in output order (the classes.txt format)."""
    from parnet_cpu.data import DatasetError, read_classes_file

    try:
        return read_classes_file(path)
    except DatasetError as exc:
        raise CliError(f"--classes: {exc}") from None


def config_overrides(args: argparse.Namespace) -> dict:
    """The ParNetConfig fields the model and preprocessing flags set (None: not given)."""
    names = read_class_names(args.classes) if getattr(args, "classes", None) else None
    num_classes = args.num_classes
    if names is not None:
        if num_classes is not None and num_classes != len(names):
            raise CliError(f"--num-classes {num_classes} but --classes {args.classes} lists {len(names)} names")
        num_classes = len(names)
    return dict(num_classes=num_classes, planes=args.planes, num_blocks=args.blocks, input_size=args.input_size,
                in_chans=args.in_chans, activation=args.activation, stem_stride=args.stem_stride,
                class_names=names, mean=getattr(args, "mean", None), std=getattr(args, "std", None),
                crop_pct=getattr(args, "crop_pct", None), interpolation=getattr(args, "interpolation", None))


def model_from_args(args: argparse.Namespace, *, data_classes: int | None = None,
                    data_class_names: Sequence[str] | None = None, seed: int | None = None, fresh: bool = False):
    """Build (and load) the training-form model the arguments describe; returns (model, source).

    For training: `data_classes` / `data_class_names` (what the training set has) fill the class count and
    names the flags leave open, `seed` seeds the initialisation, and `fresh` means a model without
    --checkpoint starts from random weights on purpose (no shipped weights, no warning)."""
    from parnet_cpu.models.checkpoint import CheckpointError, load_checkpoint
    from parnet_cpu.models.parnet import build_model, resolve_config, shipped_weights

    if os.path.isfile(os.path.join(args.model, "parnet.json")):  # a model folder, not a variant name
        raise CliError(f"--model {args.model} is a model folder; this command builds a model from a variant name "
                       "(parnet_s, parnet_m, ...: `parnet-cpu models`). Folders go to eval, bench, serve, plan and "
                       "profile as --model-dir")
    try:
        overrides = config_overrides(args)
        cfg = resolve_config(args.model, **overrides)
        if data_classes is not None and overrides["num_classes"] is None and cfg.num_classes != data_classes:
            print(f"note: the data has {data_classes} classes: num_classes set to {data_classes}", file=sys.stderr)
            cfg = replace(cfg, num_classes=data_classes, class_names=None)
        if data_class_names is not None and len(data_class_names) == cfg.num_classes and cfg.class_names is None:
            cfg = replace(cfg, class_names=tuple(data_class_names))
        if not fresh:  # a model folder is written from it (training writes a checkpoint, as it always did)
            check_preprocessing(cfg)
    except (ValueError, TypeError) as exc:
        raise CliError(str(exc)) from None
    if seed is not None:
        import torch

        torch.manual_seed(seed)  # deterministic initialisation
    model = build_model(cfg)
    source = {"model": args.model, "config": cfg.to_dict(), "checkpoint": None}
    checkpoint = args.checkpoint
    if checkpoint is None and not fresh and cfg == resolve_config(args.model):
        checkpoint = shipped_weights(args.model)  # e.g. parnet_fmnist: its weights ship with the package
    if checkpoint:
        try:
            source["checkpoint"] = load_checkpoint(model, checkpoint, use_ema=args.ema)
        except CheckpointError as exc:
            raise CliError(str(exc)) from None
    elif not fresh:
        warn_random_weights()
    return model, source


def check_preprocessing(cfg) -> None:
    """Mean/std must fit the input channels; a folder written with a bad pair would only fail at load."""
    for key in ("mean", "std"):
        values = getattr(cfg, key)
        if len(values) != cfg.in_chans:
            raise ValueError(f"--{key} needs {cfg.in_chans} value(s), one per input channel, got {len(values)}")
    if any(v <= 0 for v in cfg.std):
        raise ValueError(f"--std values must be positive, got {cfg.std}")


def warn_random_weights() -> None:
    print("!" * 78 + "\n!! WARNING: no --checkpoint given: the model has RANDOM weights.\n"
          "!! Fine for speed measurements; accuracy figures from it mean nothing.\n"
          "!! For real accuracy pass the authors' checkpoint, e.g. --checkpoint parnet_s.pth.tar\n"
          "!! (see README: 'Your ImageNet folder and the authors' checkpoint').\n" + "!" * 78, file=sys.stderr)
