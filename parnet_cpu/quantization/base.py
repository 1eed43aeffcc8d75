"""What every quantization backend shares: the options, the error, the backend contract and the registry.

A backend is one module `parnet_cpu/quantization/<name>_backend.py` holding a `QuantizationBackend`
subclass decorated with `@register`. It declares its name, the INT8 file it writes, its defaults (the
ignored-scope policy) and its CLI help; the registry finds it by module name on first use, so the
pipeline (`ptq.py`), `parnet-cpu quantize --backend`, `parnet-cpu eval --backend` and the benchmark's
engine list pick it up without being edited. This module imports no backend at module level (backends
import it), which keeps `parnet_cpu.quantization` free of import cycles (`lint-imports`).
Backend modules must stay cheap to import (torch, NNCF, OpenVINO inside their methods): the CLI
imports them all to build its `--backend` choices, also on a serving install without torch.
"""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

# Short names for ignored-scope patterns (regexes on OpenVINO node names of the exported IR).
IGNORED_SCOPE_ALIASES = {
    "se": r".*\.se\.conv/.*",  # the Skip-Squeeze-Excitation gate convs
    "stem": r".*\.inits\.0\.0\.conv/.*",  # the very first conv (3 input channels)
    "head": r".*\.head\.fc/.*",  # the classifier
    "fusion": r".*\.(downsamples_2\.1|combine)\.\d\.conv/.*",  # the grouped fusion convs
}


class QuantizationError(RuntimeError):
    """Quantization cannot proceed (bad data, labels that do not fit the model, ...)."""


@dataclass(frozen=True)
class QuantizeOptions:
    """Defaults chosen from benchmarks/quant_quality.py on the shipped Fashion-MNIST ParNet (10,000 test
    images): keeping the SE gate convs and the stem conv in float plus full bias correction raised
    INT8-vs-FP32 logit SQNR from 19.2 to 24.4 dB and cut changed predictions from 83 to 47 at ~0.02 ms;
    preset mixed beat performance in combination; 300 images matched 1000; SmoothQuant does not apply
    to CNNs in NNCF (it needs model_type=transformer, which was worse).
    Issue 14 (benchmarks/matrix_unit.py, ParNet-S batch 8, AVX-512 VNNI): quantizing the stem too gave
    no speed over running the float leftovers in bf16 (the compile-time default now, see
    `runtime.engine.float_leftovers`) and cost ~0.1 pt on Fashion-MNIST, so the scope stays."""

    subset_size: int = 300
    preset: str = "mixed"
    fast_bias_correction: bool = False
    ignored_scope: tuple[str, ...] = ("se", "stem")
    max_drop: float | None = None  # NNCF's unit: a top-1 fraction (0.01 = 1 point); enables accuracy-controlled PTQ
    backend: str = "openvino"  # a registered backend: backend_names() (openvino, torch, ipex)
    eval_limit: int | None = 5000  # held-out images evaluated (None: all)
    batch_size: int = 32
    seed: int = 0
    num_workers: int | None = None
    progress: bool = True


def max_drop_units(max_drop: float | None) -> dict[str, float | None]:
    """`max_drop` (NNCF's fraction) in both units, as reports record it: a reader who thinks in points and one
    who thinks in NNCF's fraction both read it right."""
    return {"max_drop_fraction": max_drop, "max_drop_points": None if max_drop is None else round(max_drop * 100, 9)}


def ignored_scope_patterns(items: Sequence[str]) -> list[str]:
    return [IGNORED_SCOPE_ALIASES.get(item, item) for item in items]


class QuantizationBackend(ABC):
    """One way of turning the deploy-form model into an INT8 artifact in a model folder, and of running
    what it wrote. Compiled models are callables: numpy batch in, [numpy logits] out (OpenVINO's
    convention)."""

    name: ClassVar[str]  # `--backend NAME`, report["backend"]
    artifact_file: ClassVar[str]  # the INT8 file it writes into the model folder
    precisions: ClassVar[tuple[str, ...]] = ("int8",)  # what `quantize` writes (the FP32 IR is the pipeline's)
    cli_help: ClassVar[str]  # one phrase for `--backend` help
    rank: ClassVar[int] = 100  # order in choices and listings (the default backend first)
    bench_engine: ClassVar[str | None] = None  # `parnet-cpu bench` engine running its INT8 artifact, if any
    default_ignored_scope: ClassVar[tuple[str, ...]] = ()  # `--ignored-scope` not given

    @classmethod
    def resolve_ignored_scope(cls, requested: Sequence[str] | None) -> tuple[str, ...]:
        """The ignored scope for the CLI's `--ignored-scope` (None: not given; 'none' drops everything)."""
        if requested is None:
            return cls.default_ignored_scope
        return tuple(p for p in requested if p != "none")

    @classmethod
    def available(cls) -> bool:
        """Whether this environment can run it (checked without importing anything heavy)."""
        return True

    def check_options(self, opts: QuantizeOptions) -> None:
        """Raise QuantizationError for options this backend cannot honour (before any work). Default:
        every option applies."""
        return None

    @abstractmethod
    def quantize(self, folder: Path, deploy, calibration, opts: QuantizeOptions, validation) -> None:
        """Write `artifact_file` into `folder` (which holds the FP32 artifacts already)."""

    @abstractmethod
    def compile(self, folder: Path, precision: str):
        """A callable model of `folder` in `precision` (fp32 or int8)."""

    @abstractmethod
    def layer_precisions(self, compiled) -> dict:
        """{"counts": {kind: n}, "layers": [...]}: what runs in which precision."""

    @abstractmethod
    def versions(self) -> dict:
        """Versions of the libraries it used, for the report."""

    def report_extras(self, folder: Path) -> dict[str, Any]:
        """Backend-specific entries appended to report.json."""
        return {}


def reject_nncf_options(opts: QuantizeOptions, backend: str) -> None:
    """For backends without NNCF: --max-drop and an explicit --ignored-scope are errors. The default
    ignored scope (QuantizeOptions' own, an NNCF default) is not a request and passes."""
    if opts.max_drop is not None or (opts.ignored_scope and opts.ignored_scope != QuantizeOptions.ignored_scope):
        raise QuantizationError(f"--max-drop-points/--max-drop-fraction and --ignored-scope are OpenVINO/NNCF options; "
                                f"not available with --backend {backend}")


# ----------------------------------------------------------------------------- registry

_REGISTRY: dict[str, type[QuantizationBackend]] = {}
_discovered = False


def register(cls: type[QuantizationBackend]) -> type[QuantizationBackend]:
    """Class decorator: make a backend known by its `name`."""
    known = _REGISTRY.get(cls.name)
    if known is not None and known is not cls:
        raise ValueError(f"backend {cls.name!r} registered twice ({known.__module__}, {cls.__module__})")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    """Import every `*_backend` module of this package once (each registers itself)."""
    global _discovered
    if _discovered:
        return
    package = __name__.rpartition(".")[0]
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name.endswith("_backend"):
            importlib.import_module(f"{package}.{info.name}")
    _discovered = True


def backend_classes() -> tuple[type[QuantizationBackend], ...]:
    _discover()
    return tuple(sorted(_REGISTRY.values(), key=lambda cls: (cls.rank, cls.name)))


def backend_names() -> tuple[str, ...]:
    """Registered backends, default first: the `--backend` choices."""
    return tuple(cls.name for cls in backend_classes())


def backend_class(name: str) -> type[QuantizationBackend]:
    """The class of a backend by name, without instantiating it (which may import heavy packages)."""
    names = backend_names()
    if name not in _REGISTRY:
        choices = f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else ", ".join(names)
        raise QuantizationError(f"unknown backend {name!r}; choose {choices}")
    return _REGISTRY[name]


def get_backend(name: str) -> QuantizationBackend:
    """A ready backend (instantiating it fails early, e.g. when IPEX is not installed)."""
    return backend_class(name)()


def backends_help() -> str:
    """`--backend` help: each backend's phrase, the default marked."""
    default = QuantizeOptions.backend
    return "; ".join(f"{cls.name}: {cls.cli_help}" + (" (default)" if cls.name == default else "")
                     for cls in backend_classes())


def quantization_engines() -> tuple[str, ...]:
    """Every benchmark engine a backend provides (`bench --engines` choices beyond the built-in ones)."""
    return tuple(cls.bench_engine for cls in backend_classes() if cls.bench_engine)


def bench_engines(folder: str | Path) -> tuple[str, ...]:
    """Benchmark engines for the INT8 artifacts present in a model folder and runnable here."""
    folder = Path(folder)
    return tuple(cls.bench_engine for cls in backend_classes()
                 if cls.bench_engine and (folder / cls.artifact_file).is_file() and cls.available())


def backend_for_engine(engine: str) -> QuantizationBackend:
    """The backend behind a benchmark engine name from `bench_engines`."""
    for cls in backend_classes():
        if cls.bench_engine == engine:
            return cls()
    raise QuantizationError(f"no quantization backend runs the engine {engine!r}")


def module_available(module: str) -> bool:
    """Whether `module` can be found (not imported: IPEX's import has side effects and may fail)."""
    return importlib.util.find_spec(module) is not None
