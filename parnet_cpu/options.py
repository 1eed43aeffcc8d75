"""Every numeric option of the command line and of the Python API, declared once.

A spec says what an option's value may be: an integer or a finite float, its range, and whether None or a
word ("auto") stands for a default. Flags take `arg(name)` (or `arg_list(name)`) as their argparse `type=`;
`Runtime`, `ServeConfig`, the batchers and `api.quantize` call `check(name, value)`. Both refuse with the
same words (the option, the value, the allowed range), so NaN, infinities, negative counts and absurd sizes
stop at the door instead of in a timer, an allocation or a worker. Torch-free and stdlib-only: every room
imports it.
"""
from __future__ import annotations

import argparse
import math
import numbers
import re
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

# a number as typed on a command line: ASCII digits, optional sign, decimals and exponent, nothing else
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", re.ASCII)

MAX_BATCH = 1024  # images per batch: beyond this one batch's tensors outgrow any CPU's caches and most RAM
MAX_CPUS = 4096  # cores on one machine (Linux's usual NR_CPUS is 4096-8192)
MAX_THREADS = 1024  # threads of one pool (decoding, parsing, torch): more only adds switching
MAX_IMAGES = 10**9  # image counts (limits)
DAY_S = 86400.0  # the longest timeout: a day
MIN_TIMEOUT_S = 0.001  # the shortest: a millisecond (less times out every request)


class OptionError(ValueError):
    """A numeric option outside its spec; `option` is its name (Python keyword or flag)."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option


@dataclass(frozen=True)
class Num:
    """One option's allowed values: `kind` int or float (always finite), in [low, high] ((low, high] with
    `low_open`); `none`: None means "the default"; `words`: strings allowed as they are (e.g. "auto")."""

    kind: type
    low: float
    high: float
    low_open: bool = False
    none: bool = False
    words: tuple[str, ...] = ()
    unit: str = ""

    def rule(self) -> str:
        """The allowed values in words, e.g. "a positive integer in [1, 64] (must be >= 1 and <= 64) or 'auto'"."""
        sign = "positive " if self.low > 0 or self.low_open else "non-negative " if self.low == 0 else ""
        noun = "integer" if self.kind is int else "finite number"
        unit = f" of {self.unit}" if self.unit else ""
        low, high = _shown(self.low), _shown(self.high)
        interval = f"{'(' if self.low_open else '['}{low}, {high}]"
        words = "".join(f" or {w!r}" for w in self.words)
        limits = f"(must be {'>' if self.low_open else '>='} {low} and <= {high})"
        return f"a {sign}{noun}{unit} in {interval} {limits}{words}"

    def _in_range(self, value: float) -> bool:
        return (self.low < value if self.low_open else self.low <= value) and value <= self.high

    def check(self, option: str, value: Any) -> Any:
        """`value` as the option's kind (int or float), the allowed word, or None; else OptionError."""
        if value is None and self.none or isinstance(value, str) and value in self.words:
            return value
        if self.kind is int:
            ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        else:
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and (
                isinstance(value, numbers.Integral) or math.isfinite(value))  # isfinite(10**400) overflows
        if not ok or not self._in_range(value):
            raise OptionError(option, f"expected {self.rule()}, got {_value(value)}")
        return self.kind(value)

    def parse(self, option: str, text: str) -> Any:
        """The command-line text of one value, checked."""
        if text in self.words:
            return text
        if not _PLAIN_NUMBER.fullmatch(text):  # int()/float() also take '8_0', ' 8' and non-ASCII digits
            raise OptionError(option, f"expected {self.rule()}, got {_value(text)}")
        try:
            value = int(text) if self.kind is int else float(text)
        except ValueError:
            raise OptionError(option, f"expected {self.rule()}, got {_value(text)}") from None
        try:
            return self.check(option, value)
        except OptionError:
            raise OptionError(option, f"expected {self.rule()}, got {_value(text)}") from None


def _shown(x: float) -> str:
    """A bound as people write it: 4294967295, 0.001, 1e+09 never."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _value(value: Any) -> str:
    """The refused value for a message, cut short (a 5000-digit integer is not worth echoing)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _int(low: int, high: int, **kw: Any) -> Num:
    return Num(int, low, high, **kw)


def _float(low: float, high: float, **kw: Any) -> Num:
    return Num(float, low, high, **kw)


def _seconds(high: float = DAY_S, **kw: Any) -> Num:
    return Num(float, MIN_TIMEOUT_S, high, unit="seconds", **kw)


_BATCH = _int(1, MAX_BATCH)
_THREADS = _int(1, MAX_THREADS, none=True)
_LIMIT = _int(1, MAX_IMAGES, none=True)
_CORES_PER_STREAM = _int(1, MAX_CPUS, none=True, words=("auto",))

# option name (the Python keyword; a flag names its spec with `arg(name)`) -> what it may be
SPECS: dict[str, Num] = {
    # model and preprocessing (export, quantize, train)
    "num_classes": _int(1, 100_000, none=True),
    "planes": _int(1, 8192),
    "blocks": _int(1, 64),
    "input_size": _int(32, 4096, none=True),
    "in_chans": _int(1, 64, none=True),
    "stem_stride": _int(1, 2, none=True),
    "mean": _float(0.0, 1.0),  # of 0-1 pixel values
    "std": _float(0.0, 1.0, low_open=True),
    "crop_pct": _float(0.1, 1.0, none=True),  # timm's crop_pct lie in 0.75..1.0; below 0.1 the resize is >10x the input
    # data and batches
    "batch_size": _BATCH,
    "max_batch": _BATCH,
    "workers": _THREADS,
    "num_workers": _THREADS,
    "threads": _THREADS,
    "cpu_threads": _THREADS,
    "limit": _LIMIT,
    "top_k": _int(1, 100_000),
    "seed": _int(0, 2**32 - 1),
    # quantization
    "subset_size": _int(1, 1_000_000),
    # accuracy-controlled PTQ's allowed top-1 drop: NNCF's unit (a fraction, 0.01 = 1 point) in the Python API,
    # points on the command line (--max-drop-points); above 20 points no INT8 model is worth keeping, and the
    # bound refuses a points value (1, 0.5) given where a fraction is meant
    "max_drop": _float(0.0, 0.2, low_open=True, none=True, unit="top-1 fraction (NNCF's max_drop: 0.01 = 1 point)"),
    "max_drop_points": _float(0.0, 20.0, low_open=True, none=True, unit="top-1 points (1 = NNCF's max_drop 0.01)"),
    "eval_limit": _int(0, MAX_IMAGES, none=True),  # 0 or None: every held-out image
    # measuring (bench, profile, plan)
    "cores_per_stream": _CORES_PER_STREAM,
    "warmup": _int(0, 100_000),
    "iters": _int(1, 10_000_000),
    "min_seconds": _float(0.0, 3600.0, unit="seconds"),
    "rounds": _int(1, 1000),
    "quiet_wait": _float(0.0, DAY_S, unit="seconds"),
    "top": _int(1, 100_000),
    "cpus": _int(1, MAX_CPUS, none=True),
    "sockets": _int(1, 64),
    "handover_ms": _float(0.0, 1000.0, none=True, unit="milliseconds"),
    # training
    "epochs": _int(1, 100_000),
    "lr": _float(0.0, 10.0, low_open=True, none=True),
    "weight_decay": _float(0.0, 1.0, none=True),
    "warmup_epochs": _float(0.0, 100_000.0),
    "label_smoothing": _float(0.0, 1.0),
    "ema_decay": _float(0.0, 1.0),
    "crop_padding": _int(0, 1024),
    "max_steps": _int(1, MAX_IMAGES, none=True),
    # serving and the runtime
    "port": _int(0, 65535),
    "replicas": _int(1, MAX_CPUS, words=("auto",)),
    "p99_ms": Num(float, MIN_TIMEOUT_S * 1e3, DAY_S * 1e3, none=True, unit="milliseconds"),
    "inflight": _int(1, 64),
    "max_wait_ms": _float(0.0, 10_000.0, unit="milliseconds"),
    "max_wait_s": _float(0.0, 10.0, unit="seconds"),
    "max_queue": _int(1, 1_000_000),
    "max_body_mb": _float(0.001, 1024.0, unit="MiB"),
    "max_body_bytes": _int(1024, 1024 * 2**20, unit="bytes"),
    "max_image_pixels": _int(1, 1_000_000_000),
    "max_connections": _int(1, 1_000_000),
    "retry_after_s": _int(0, int(DAY_S), unit="seconds"),
    "header_timeout_s": _seconds(),
    "body_timeout_s": _seconds(),
    "infer_timeout_s": _seconds(),
    "graceful_timeout_s": _float(0.0, DAY_S, unit="seconds"),
    "health_interval_s": _seconds(3600.0),
    "max_restarts": _int(0, 1000),
    "start_timeout": _seconds(),
    "timeout": _seconds(none=True),  # a runtime call; None: no limit
}


def check(name: str, value: Any) -> Any:
    """The Python API's check: `value` (as int or float) if option `name` allows it, else `OptionError`
    (a ValueError) naming the option, the value and the allowed range."""
    return SPECS[name].check(name, value)


def check_all(**values: Any) -> dict[str, Any]:
    """`check` for several keyword options at once; returns them checked."""
    return {name: check(name, value) for name, value in values.items()}


def check_fields(obj: Any) -> None:
    """`check` every field of a dataclass instance that names a spec (e.g. `ServeConfig`)."""
    if not is_dataclass(obj):
        raise TypeError(f"check_fields takes a dataclass instance, got {type(obj).__name__}")
    for f in fields(obj):
        if f.name in SPECS:  # the checked value (plain int/float) replaces e.g. a numpy scalar
            object.__setattr__(obj, f.name, check(f.name, getattr(obj, f.name)))


class Arg:
    """argparse `type=` for one value of option `name`: the spec's check, refused as a usage error (exit 2;
    argparse puts the flag in front of the message)."""

    def __init__(self, name: str) -> None:
        self.name, self.spec = name, SPECS[name]
        self.__name__ = name  # argparse shows a type's __name__ in some messages

    def __call__(self, text: str) -> Any:
        try:
            return self.spec.parse(self.name, text)
        except OptionError as exc:
            raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[1]) from None

    def __repr__(self) -> str:
        return f"arg({self.name!r})"


class ArgList(Arg):
    """argparse `type=` for comma-separated values of option `name` (e.g. --batches 1,8), each checked."""

    def __call__(self, text: str) -> tuple:
        """A plain tuple: the values may end up in a checkpoint's config, which `weights_only` loading reads."""
        items = text.split(",")
        try:
            return tuple(self.spec.parse(self.name, item.strip()) for item in items)
        except OptionError:
            raise argparse.ArgumentTypeError(f"expected comma-separated values, each {self.spec.rule()}, "
                                             f"got {_value(text)}") from None

    def __repr__(self) -> str:
        return f"arg_list({self.name!r})"


def arg(name: str) -> Arg:
    return Arg(name)


def arg_list(name: str) -> ArgList:
    return ArgList(name)
