"""Issue 21, class 3: every numeric option, on the command line and in the Python API, passes one layer
(`parnet_cpu.options`) that refuses non-finite, negative and absurd values with the option's name.

The flag test walks the real `parnet-cpu` argparse tree, so a numeric flag added later without the layer
fails here; the API tests walk the signatures and fields of `Runtime`, the batchers, `ServeConfig` and
`QuantizeOptions` the same way.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import os
import subprocess
import sys

import pytest

from parnet_cpu.options import SPECS, Arg, OptionError, arg, check

BAD_TEXTS = ("nan", "NaN", "inf", "-inf", "infinity", "1e308", "-1", "1" + "0" * 40, "1e999", "", "0x10", "1.5e", "8_0", " 8", "\uff11", "\u0661")
PROBES = ("1", "0.5", "64", "1,1,1", "0.5,0.5,0.5", "2")  # what a numeric flag's type takes


def _subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command words, parser) for every parser in the tree, nested sub-commands included."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subcommands(sub, path + (name,))


def _is_number(value) -> bool:
    if isinstance(value, tuple):
        return bool(value) and all(_is_number(v) for v in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number_text(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _numeric(action: argparse.Action) -> bool:
    """Does this flag take numbers? Judged by what it does, not by how it is declared: its type turns one of
    the probes into a number (or numbers), or it has no type but a numeric default text ("1,8")."""
    if isinstance(action.type, Arg) or action.type in (int, float):
        return True
    if action.type is None:
        return isinstance(action.default, str) and all(_number_text(v) for v in action.default.split(","))
    for text in PROBES:
        try:
            if _is_number(action.type(text)):
                return True
        except Exception:
            continue
    return False


def _numeric_flags(parser: argparse.ArgumentParser):
    for path, p in _subcommands(parser):
        for action in p._actions:
            if action.option_strings and action.nargs != 0 and _numeric(action):
                yield path, action


@pytest.fixture(scope="module")
def parser():
    from parnet_cpu.cli import build_parser

    return build_parser()


def test_every_numeric_flag_of_every_command_uses_the_option_layer(parser):
    flags = list(_numeric_flags(parser))
    without = [f"{' '.join(path)} {action.option_strings[0]}" for path, action in flags
               if not isinstance(action.type, Arg)]
    assert not without, f"numeric flags that bypass parnet_cpu.options (type=arg(...)): {without}"
    # the walk sees them all: the ones the issue names, list flags, flags in shared groups and nested commands
    seen = {(path[0], a.option_strings[0]) for path, a in flags}
    for expected in (("serve", "--max-wait-ms"), ("serve", "--body-timeout"), ("serve", "--max-body-mb"),
                     ("serve", "--max-batch"), ("serve", "--cpu-threads"), ("serve", "--port"),
                     ("bench", "--batches"), ("bench", "--sweep"), ("bench", "--quiet-wait"), ("plan", "--cpus"),
                     ("export", "--std"), ("train", "--lr"), ("quantize", "--max-drop-points"), ("dataset", "--limit")):
        assert expected in seen, expected
    assert len(flags) >= 60, len(flags)


def test_the_walk_finds_a_numeric_flag_declared_without_the_layer():
    """The check above can fail: a flag typed int, float or a home-made number parser is found."""
    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    s = sub.add_parser("new")
    s.add_argument("--a", type=float)
    s.add_argument("--b", type=lambda t: max(1, int(t)))
    s.add_argument("--c", type=lambda t: tuple(float(v) for v in t.split(",")))
    s.add_argument("--d", default="1,8")
    s.add_argument("--e", type=arg("max_batch"))
    s.add_argument("--name", type=str.lower)
    found = {a.option_strings[0]: isinstance(a.type, Arg) for _, a in _numeric_flags(p)}
    assert found == {"--a": False, "--b": False, "--c": False, "--d": False, "--e": True}


def test_every_numeric_flag_refuses_non_finite_negative_and_absurd_values(parser, capsys):
    checked = 0
    for path, action in _numeric_flags(parser):
        spec, flag = action.type.spec, action.option_strings[0]
        for bad in BAD_TEXTS:
            if bad == "-1" and spec.low < 0:
                continue  # (no option allows negatives today)
            if bad == " 8" and type(action.type).__name__ == "ArgList":
                continue  # a list's items may follow ", " ("1, 8")
            with pytest.raises(SystemExit) as exit_:
                parser.parse_args([*path, f"{flag}={bad}"])
            err = capsys.readouterr().err
            assert exit_.value.code == 2, (path, flag, bad)
            assert f"argument {flag}" in err and "expected" in err and "Traceback" not in err, (path, flag, bad, err)
            assert spec.rule() in err, err  # the same words as the Python API's
            checked += 1
        if isinstance(action.default, str) and action.default not in spec.words:
            action.type(action.default)  # a text default is converted by the type: it must pass
        elif action.default is not None and not isinstance(action.default, str):
            assert check(action.type.name, action.default) == action.default, (path, flag)  # defaults in range
    assert checked > 600


def test_the_range_is_enforced_at_both_ends_and_words_pass(parser, capsys):
    ok = parser.parse_args(["serve", "--model-dir", "m", "--max-wait-ms", "0", "--max-batch", "1024",
                            "--cores-per-stream", "auto", "--replicas", "auto", "--port", "0"])
    assert (ok.max_wait_ms, ok.max_batch, ok.cores_per_stream, ok.replicas, ok.port) == (0.0, 1024, "auto", "auto", 0)
    assert parser.parse_args(["bench", "--batches", "1,8,1024", "--sweep", "auto,2"]).batches == (1, 8, 1024)
    assert type(parser.parse_args(["bench"]).batches) is tuple  # plain: such values can land in checkpoints
    for args in (["serve", "--model-dir", "m", "--max-batch", "1025"], ["serve", "--model-dir", "m", "--port", "65536"],
                 ["serve", "--model-dir", "m", "--max-batch", "8.0"], ["serve", "--model-dir", "m", "--replicas", "0"],
                 ["serve", "--model-dir", "m", "--body-timeout", "0"], ["serve", "--model-dir", "m", "--p99-ms", "0"],
                 ["bench", "--batches", "1,nan"], ["bench", "--sweep", "auto,0"], ["export", "--crop-pct", "0"],
                 ["export", "--mean", "0.5,inf,0.5"], ["train", "--out", "x", "--data", "d", "--ema-decay", "1.5"],
                 ["plan", "--handover-ms", "1e400"], ["quantize", "--calib", "c", "--eval-limit", "-0.5"]):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(args)
        assert exit_.value.code == 2 and "expected" in capsys.readouterr().err, args


def _cli(*args: str, module: str = "parnet_cpu") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})


@pytest.mark.parametrize("flag, value, module", [("--max-wait-ms", "inf", "parnet_cpu"),
                                                 ("--max-batch", "100000", "parnet_cpu.cli.serve")])
def test_serve_refuses_a_bad_number_before_loading_anything(tmp_path, flag, value, module):
    """Before: --max-wait-ms inf served and hung every request; --max-batch 100000 died in std::bad_alloc. Now
    exit 2 naming the flag, before the model folder is even looked at (this one does not exist)."""
    args = ("serve",) if module == "parnet_cpu" else ()
    out = _cli(*args, "--model-dir", str(tmp_path / "no-such-model"), flag, value, module=module)
    assert out.returncode == 2, out.stderr
    assert f"argument {flag}" in out.stderr and repr(value) in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "model folder" not in out.stderr


def _is_numeric_annotation(annotation: object) -> bool:
    """int or float, alone or in a union ("int | str | None"); not a list of core ids."""
    return isinstance(annotation, str) and bool({"int", "float"} & {t.strip() for t in annotation.split("|")})


def _numeric_params(func) -> list[str]:
    """Parameters annotated int or float: every one must have a spec."""
    return [name for name, p in inspect.signature(func).parameters.items() if _is_numeric_annotation(p.annotation)]


def _bad_values(name: str) -> list:
    spec = SPECS[name]
    bad = [math.nan, math.inf, -math.inf, 1e308, -1, 10**30, True, "8", spec.high + 1, 10**400]
    return bad + ([spec.low] if spec.low_open else [])


def _refuses(make, name: str) -> None:
    for bad in _bad_values(name):
        with pytest.raises(ValueError, match=rf"^{name}: expected .*got ") as err:
            make(bad)
        assert isinstance(err.value, OptionError) and err.value.option == name, (name, bad)


def test_runtime_refuses_bad_options_before_opening_the_model(tmp_path):
    from parnet_cpu.runtime.runtime import Runtime

    names = _numeric_params(Runtime.__init__)
    assert {"max_batch", "inflight", "timeout", "start_timeout", "cores_per_stream"} <= set(names)
    missing = tmp_path / "no-such-model"
    for name in names:
        assert name in SPECS, f"Runtime({name}=...) has no spec in parnet_cpu/options.py"
        _refuses(lambda v, name=name: Runtime(missing, **{name: v}), name)
    with pytest.raises(ValueError, match=r"^max_batch: .*\[1, 1024\].*got 100000$"):
        Runtime(missing, max_batch=100000)


def test_serve_config_refuses_every_bad_numeric_field():
    from parnet_cpu.serve.app import ServeConfig

    numeric = [f.name for f in dataclasses.fields(ServeConfig) if _is_numeric_annotation(f.type)]
    assert {"max_wait_ms", "body_timeout_s", "max_body_bytes", "cpu_threads", "max_batch"} <= set(numeric)
    for name in numeric:
        assert name in SPECS, f"ServeConfig.{name} has no spec in parnet_cpu/options.py"
        _refuses(lambda v, name=name: ServeConfig(model="m", **{name: v}), name)
    ServeConfig(model="m")  # the defaults pass
    with pytest.raises(ValueError, match=r"^max_wait_ms: .*got nan$"):
        ServeConfig(model="m", max_wait_ms=float("nan"))


class _RuntimeShape:
    """What a batcher reads from a runtime at construction (nothing runs: construction is under test)."""

    max_batch, inflight, input_shape = 8, 2, (3, 32, 32)

    def submit(self, batch):  # pragma: no cover - never called
        raise AssertionError


def test_batchers_refuse_every_bad_numeric_option():
    from parnet_cpu.serve.batcher import Batcher, DynamicBatcher

    rt = _RuntimeShape()
    for cls, make in ((DynamicBatcher, lambda **kw: DynamicBatcher(rt.submit, **kw)),
                      (Batcher, lambda **kw: Batcher(rt, **kw))):
        names = _numeric_params(cls.__init__)
        assert names, cls
        for name in names:
            assert name in SPECS, f"{cls.__name__}({name}=...) has no spec in parnet_cpu/options.py"
            if cls is Batcher and name == "max_batch":  # larger values are the runtime's limit (documented)
                assert Batcher(rt, max_batch=10**30).max_batch == rt.max_batch
                for bad in (math.nan, 0, -1, True, 2.0, "8"):
                    with pytest.raises(ValueError, match="^max_batch: "):
                        Batcher(rt, max_batch=bad)
                continue
            _refuses(lambda v, name=name, make=make: make(**{name: v}), name)


def test_quantize_api_refuses_bad_options_before_building_anything(tmp_path):
    import parnet_cpu
    from parnet_cpu.quantization.base import QuantizeOptions

    numeric = [f.name for f in dataclasses.fields(QuantizeOptions) if _is_numeric_annotation(f.type)]
    assert {"subset_size", "batch_size", "max_drop", "eval_limit", "seed", "num_workers"} <= set(numeric)
    for name in numeric:
        assert name in SPECS, f"QuantizeOptions.{name} has no spec in parnet_cpu/options.py"
        for bad in (math.nan, math.inf, -1, 10**30):
            with pytest.raises(ValueError, match=f"^{name}: expected"):
                parnet_cpu.quantize("no-such-variant", tmp_path / "calib", tmp_path / "out", **{name: bad})
    assert not (tmp_path / "out").exists()


def test_every_spec_is_sane():
    """Finite bounds, low <= high, defaults-worthy: no spec lets an infinity or a negative count through."""
    for name, spec in SPECS.items():
        assert spec.kind in (int, float) and math.isfinite(spec.low) and math.isfinite(spec.high), name
        assert 0 <= spec.low < spec.high, name
