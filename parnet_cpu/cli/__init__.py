"""`parnet-cpu` command line: one module per sub-command, each exposing `register(subparsers)`.

Sub-command modules import heavy packages (torch, openvino, nncf) inside their handlers, so
`parnet-cpu info` or `--help` stay fast and a serving install without torch still works.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from parnet_cpu.artifacts import ModelDirError
from parnet_cpu.outputs import WRITE_ERRNOS, OutputBusyError, OutputError, OutputWriteError

# sub-command name -> module that registers it (order = order in --help)
COMMANDS: tuple[str, ...] = (
    "parnet_cpu.cli.demo",
    "parnet_cpu.cli.info",
    "parnet_cpu.cli.models",
    "parnet_cpu.cli.export",
    "parnet_cpu.cli.quantize",
    "parnet_cpu.cli.eval",
    "parnet_cpu.cli.predict",
    "parnet_cpu.cli.verify",
    "parnet_cpu.cli.bench",
    "parnet_cpu.cli.profile",
    "parnet_cpu.cli.plan",
    "parnet_cpu.cli.serve",
    "parnet_cpu.cli.train",
    "parnet_cpu.cli.dataset",
)


# what the `full` extra adds to the torch-free base install (pyproject.toml)
FULL_INSTALL_MODULES = frozenset({"torch", "nncf", "onnx", "onnxruntime", "torchao", "matplotlib"})


class CliError(Exception):
    """An error the user can fix: printed without a traceback, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parnet-cpu",
        description="ParNet on CPU: reparameterize, quantize (OpenVINO+NNCF) and run with pinned multi-stream execution.",
    )
    from parnet_cpu import __version__

    parser.add_argument("--version", action="version", version=f"parnet-cpu {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMANDS:
        importlib.import_module(module_name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except CliError as exc:
        print(f"parnet-cpu {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _reader_went_away()
    except OutputBusyError as exc:
        print(f"parnet-cpu {args.command}: error: {exc}", file=sys.stderr)
        return 75  # EX_TEMPFAIL: another run holds the output; try again later
    except (ModelDirError, OutputError) as exc:  # e.g. a file planted under the output lock's name (OutputPathError)
        print(f"parnet-cpu {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in WRITE_ERRNOS and not isinstance(exc, OutputWriteError):
            raise
        if isinstance(exc, OutputWriteError):  # its text names the errno (and what a writer said)
            said = f"cannot write {exc.filename}: {exc.strerror}; nothing half-written was left"
        else:
            said = f"{exc.filename or 'I/O error'}: {exc.strerror} ({errno.errorcode.get(exc.errno, exc.errno)})"
        print(f"parnet-cpu {args.command}: error: {said}", file=sys.stderr)
        return 74  # EX_IOERR: the place (disk full, quota, read-only, permissions), not the input
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in FULL_INSTALL_MODULES:
            print(f"parnet-cpu {args.command}: error: this command needs the full install ({exc.name} is not "
                  "installed): pip install 'parnet-cpu[full]' (torch: a CPU wheel, see scripts/install.sh)",
                  file=sys.stderr)
            return 2
        raise


def _reader_went_away() -> int:
    """`parnet-cpu info --json | head`: the reader closed the pipe; stop quietly, as Unix tools do.
    stdout is pointed at /dev/null so the interpreter's final flush cannot raise again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by a closed pipe


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
