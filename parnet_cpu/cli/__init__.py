"""`parnet-cpu` command line: one module per sub-command, each exposing `register(subparsers)`.

Sub-command modules import heavy packages (torch, openvino, nncf) inside their handlers, so
`parnet-cpu info` or `--help` stay fast and a serving install without torch still works.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import importlib.util
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
    "parnet_cpu.cli.slim",
    "parnet_cpu.cli.bench",
    "parnet_cpu.cli.profile",
    "parnet_cpu.cli.plan",
    "parnet_cpu.cli.serve",
    "parnet_cpu.cli.train",
    "parnet_cpu.cli.dataset",
)


# what the `full` extra adds to the torch-free base install (pyproject.toml)
FULL_INSTALL_MODULES = frozenset({"torch", "nncf", "onnx", "onnxruntime", "torchao", "matplotlib"})
# What a command needs from it to run at all. On an install without them `--help` marks the command and the
# command is refused before its arguments are read or anything is written (issue 26). Commands that need the
# full install for some options only (eval --backend torch, bench's torch and ONNX engines) are not listed:
# `main` says the same install command when they reach a missing package.
FULL_INSTALL_NEEDS: dict[str, tuple[str, ...]] = {
    "demo": ("torch", "nncf", "matplotlib"),
    "models": ("torch",),
    "export": ("torch",),
    "quantize": ("torch", "nncf"),
    "train": ("torch",),
}
FULL_INSTALL_MARK = "[full install]"
INSTALL_FULL = "pip install 'parnet-cpu[full]' (torch: a CPU wheel, see scripts/install.sh)"


class CliError(Exception):
    """An error the user can fix: printed without a traceback, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parnet-cpu",
        description="ParNet on CPU: reparameterize, quantize (OpenVINO+NNCF) and run with pinned multi-stream execution.",
    )
    from parnet_cpu import __version__

    parser.add_argument("--version", action="version", version=f"parnet-cpu {__version__}")
    missing = {name: absent for name, needs in FULL_INSTALL_NEEDS.items() if (absent := missing_modules(needs))}
    if missing:
        absent = ", ".join(sorted(set().union(*missing.values())))
        parser.epilog = f"Commands marked {FULL_INSTALL_MARK} need the full install ({absent} not installed here): {INSTALL_FULL}"
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CommandParser)
    for module_name in COMMANDS:
        importlib.import_module(module_name).register(_Registrar(sub, missing))
    return parser


def missing_modules(names: tuple[str, ...]) -> tuple[str, ...]:
    """The packages among `names` that this install cannot import (looked up, not imported: --help stays fast)."""
    def absent(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is None
        except ValueError:  # already imported without a spec: present
            return False
        except ImportError:  # a finder that refuses it: not importable
            return True
    return tuple(n for n in names if absent(n))


def needs_full_install(missing: tuple[str, ...] | list[str]) -> str:
    """The one message for a command run without the full install: what is missing and the install command."""
    verb = "is" if len(missing) == 1 else "are"
    return f"this command needs the full install ({', '.join(missing)} {verb} not installed): {INSTALL_FULL}"


class CommandParser(argparse.ArgumentParser):
    """A sub-command's parser. One whose packages this install lacks refuses at the first look at its
    arguments (before argparse checks them and before the command writes anything); its --help still shows."""

    missing: tuple[str, ...] = ()

    def parse_known_args(self, args=None, namespace=None):
        if self.missing and not {"-h", "--help"} & set(args or ()):
            self.exit(2, f"{self.prog}: error: {needs_full_install(self.missing)}\n")
        self._argv = list(args or ())
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        """argparse's error, plus why a positional went missing when `--json` (its FILE optional) took it."""
        argv = getattr(self, "_argv", [])
        if "arguments are required" in message and "--json" in argv:
            i = argv.index("--json")
            if i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                message += (f" (`--json {argv[i + 1]}` took {argv[i + 1]!r} as its FILE: put --json after the "
                            "positional arguments, or write --json=FILE or --json -)")
        super().error(message)


class _Registrar:
    """What each command's `register` is given: the sub-command list, marking a command this install lacks
    packages for (its help line, its description) and arming its parser's refusal."""

    def __init__(self, sub: argparse._SubParsersAction, missing: dict[str, tuple[str, ...]]):
        self.sub, self.missing = sub, missing

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        absent = self.missing.get(name, ())
        if absent:
            kwargs["help"] = f"{kwargs.get('help') or ''} {FULL_INSTALL_MARK}".strip()
            kwargs["description"] = f"{needs_full_install(absent)}. {kwargs.get('description') or ''}".strip()
        parser = self.sub.add_parser(name, **kwargs)
        parser.missing = absent
        return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from parnet_cpu.cli.common import stdout_for_json  # (common imports CliError from here)

    try:
        with stdout_for_json(args):  # `--json` to stdout: the JSON alone there, the rest on stderr
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
            print(f"parnet-cpu {args.command}: error: {needs_full_install([exc.name.split('.')[0]])}", file=sys.stderr)
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
