"""OpenVINO compilation with explicit, reported settings.

Precision is always set explicitly: OpenVINO 2026 picks bf16 as the CPU default inference precision
wherever the CPU has avx512_bf16 or AMX (seen on this project's AMD EPYC development machine), which
silently turns an "FP32" baseline into a bf16 one (relative error ~4e-4 instead of ~3e-8 on ParNet).
FP32 here always means f32 kernels.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import stat
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from parnet_cpu.artifacts import ModelDir
from parnet_cpu.outputs import sha256_file, write_json
from parnet_cpu.system.cpuinfo import cpuinfo_flags, isa_flags, isa_level, parse_cpuinfo
from parnet_cpu.system.openvino_core import core

PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}  # int8: see float_leftovers
LEFTOVERS_ENV = "PARNET_CPU_INT8_LEFTOVERS"  # auto | bf16 | f32: reaches worker processes and every compile
LEFTOVER_CHOICES = ("auto", "bf16", "f32")




@dataclass(frozen=True)
class CompileOptions:
    precision: str = "fp32"  # fp32 | bf16 | int8 (the IR decides what is quantized)
    hint: str = "LATENCY"  # LATENCY | THROUGHPUT
    num_threads: int | None = None  # None: OpenVINO decides
    num_streams: int | None = None
    pinning: bool | None = None
    leftovers: str | None = None  # int8 IR only: precision of the ops NNCF left in float (see float_leftovers)
    perf_count: bool = False  # OpenVINO per-node counters (`profile`); off on the hot path
    cache_dir: str | None = None  # OpenVINO's compiled-model cache: `CompileCache.dir`, which checked it

    def properties(self) -> dict[str, Any]:
        props: dict[str, Any] = {"PERFORMANCE_HINT": self.hint,
                                 "INFERENCE_PRECISION_HINT": float_leftovers(self.precision, self.leftovers)}
        if self.perf_count:
            props["PERF_COUNT"] = True
        if self.num_threads is not None:
            props["INFERENCE_NUM_THREADS"] = int(self.num_threads)
        if self.num_streams is not None:
            props["NUM_STREAMS"] = int(self.num_streams)
        if self.pinning is not None:
            props["ENABLE_CPU_PINNING"] = bool(self.pinning)
        if self.cache_dir is not None:
            props["CACHE_DIR"] = str(self.cache_dir)
        return props


def float_leftovers(precision: str, leftovers: str | None = None) -> str:
    """INFERENCE_PRECISION_HINT for a compile: f32 for "fp32", bf16 for "bf16"; for an INT8 IR it sets
    the precision of the ops left in float (stem, SE gates, pooling, elementwise). `leftovers` (else the
    PARNET_CPU_INT8_LEFTOVERS environment variable, else "auto"): "auto" = bf16 where the CPU runs bf16
    natively (AMX-BF16 / AVX512_BF16), f32 elsewhere; "f32" is the pre-2026-11 default (opt-out)."""
    if precision != "int8":
        return PRECISION_HINTS[precision]
    choice = leftovers or os.environ.get(LEFTOVERS_ENV) or "auto"
    if choice not in LEFTOVER_CHOICES:
        raise ValueError(f"int8 float leftovers must be one of {', '.join(LEFTOVER_CHOICES)}, got {choice!r}")
    if choice == "auto":
        return "bf16" if precision_supported("bf16") and isa_cap_allows_bf16(os.environ.get("ONEDNN_MAX_CPU_ISA")) \
            else "f32"
    return choice


def isa_cap_allows_bf16(cap: str | None) -> bool:
    """Whether an ONEDNN_MAX_CPU_ISA cap leaves native bf16 kernels (OpenVINO's capability list ignores the
    cap, so a capped AVX2 run would otherwise get bf16 emulated in f32 code)."""
    if not cap or cap.upper() in ("ALL", "DEFAULT"):
        return True
    cap = cap.upper()
    return "BF16" in cap or "AMX" in cap or "FP16" in cap or cap.startswith("AVX10")


def default_leftovers(isa: dict[str, bool], cap: str | None = None) -> str:
    """What "auto" picks on a CPU with these ISA flags (`parnet-cpu info`, also for captured trees)."""
    has_bf16 = bool(isa.get("avx512_bf16") or (isa.get("amx_tile") and isa.get("amx_bf16")))
    return "bf16" if has_bf16 and isa_cap_allows_bf16(cap) else "f32"


def precision_supported(precision: str) -> bool:
    """Whether the CPU runs this precision natively (OpenVINO's OPTIMIZATION_CAPABILITIES)."""
    caps = set(core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    return {"fp32": "FP32", "bf16": "BF16", "int8": "INT8"}[precision] in caps


def read_model(path_or_model):
    return core().read_model(str(path_or_model)) if isinstance(path_or_model, (str, Path)) else path_or_model


def compile_model(path_or_model, options: CompileOptions = CompileOptions()):
    """Compile for the CPU. A path goes to OpenVINO as a path: with a compiled-model cache, a hit then
    skips reading the IR at all (a model object is serialised and hashed to find its blob)."""
    model = str(path_or_model) if isinstance(path_or_model, (str, Path)) else path_or_model
    return core().compile_model(model, "CPU", options.properties())


def _rt(info, key: str) -> str:
    return str(info[key].astype(str)) if key in info else "?"


def runtime_layers(compiled) -> list[dict[str, str]]:
    """Each executed layer of the compiled (runtime) graph, read back rather than assumed: its type,
    the precision it really runs in, and the kernel OpenVINO chose (e.g. `jit_avx2_I8`, `brgconv_avx512_amx`)."""
    return [{"name": op.get_friendly_name(), "type": _rt(op.get_rt_info(), "layerType"),
             "precision": _rt(op.get_rt_info(), "runtimePrecision"), "kernel": _rt(op.get_rt_info(), "primitiveType")}
            for op in compiled.get_runtime_model().get_ordered_ops()]


# ---------------------------------------------------------------------------------------------- compile cache
# OpenVINO's model cache (CACHE_DIR) saves the compiled model as a blob and imports it at the next compile with
# the same model and properties: a restarted server or a new replica does not compile again. OpenVINO notices
# a truncated or foreign blob and compiles again, but it imports a blob with flipped bits in its weights
# without a word (measured: logits off by 1e26), so every blob here is recorded with its sha256 once it is
# complete, and a blob that is unrecorded or does not match is removed before OpenVINO may read it.

CACHE_ENV = "PARNET_CPU_COMPILE_CACHE"  # "off" (or 0/false/no): compile from the IR at every start
COMPILE_CACHE = "compile_cache"  # inside the model folder, or inside its folder of the user cache
BLOB_DIGESTS = "blobs.json"
_LOCK = ".lock"


class CompileCacheWarning(UserWarning):
    """The compiled-model cache cannot be used for this start: it compiles from the IR, as without a cache."""


def user_cache_dir() -> Path | None:
    """$XDG_CACHE_HOME/parnet-cpu, else ~/.cache/parnet-cpu (the XDG rule: a relative XDG_CACHE_HOME is
    ignored); None when there is no home to put it in (a uid without a passwd entry and no HOME)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        home = os.path.expanduser("~")
        if not os.path.isabs(home):
            return None
        base = os.path.join(home, ".cache")
    return Path(base) / "parnet-cpu"


def private_dir(base: Path, *parts: str) -> Path | None:
    """`base/parts...`, each missing folder on the way created 0700 (as XDG asks), if `base` and every part
    below it is a real folder (no link) of this user that nobody else may write: a blob planted anywhere
    on that way would be imported as the model. Else None."""
    path, levels = base, [base]
    for part in parts:
        path = path / part
        levels.append(path)
    try:
        for level in [*reversed(base.parents), *levels]:
            if not level.exists():
                level.mkdir(mode=0o700, exist_ok=True)
        for level in levels:
            st = os.lstat(level)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
                return None
    except OSError:
        return None
    return path if os.access(path, os.W_OK | os.X_OK) else None


def cache_root(model_dir: ModelDir) -> Path | None:
    """Where a model's start-up caches (the plan choice, compiled models) live: the model folder itself when
    this process may write there, else the model's own folder of the user cache, keyed by its name and
    recorded digests (a read-only model folder: KServe's model mount, Docker `-v ...:ro`, an NFS export).
    None: nowhere to write, so every start measures and compiles again."""
    folder = model_dir.path
    if os.access(folder, os.W_OK | os.X_OK):  # also False on a read-only mount (EROFS), even for root
        return folder
    base = user_cache_dir()
    if base is None:
        return None
    files = model_dir.manifest.get("files") or {}
    ident = hashlib.sha256(json.dumps(sorted((n, str((r or {}).get("sha256"))) for n, r in files.items()))
                           .encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", folder.resolve().name)[:64] or "model"
    return private_dir(base, "models", f"{name}-{ident}")


@lru_cache(maxsize=1)
def _cpu_identity() -> tuple[str, str, str]:
    """(CPU model name, ISA level, inference-relevant ISA flags) from /proc/cpuinfo: what a compiled blob
    depends on (OpenVINO keys its blobs by model and properties, not by the CPU that compiled them)."""
    try:
        entries = parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        entries = []
    isa = isa_flags(cpuinfo_flags(entries))
    model = next((e["model name"] for e in entries if "model name" in e), "?")
    return model, isa_level(isa), ",".join(sorted(k for k, v in isa.items() if v))


def compile_cache_key(model_dir: ModelDir, ir_path: Path, precision: str, leftovers: str | None = None) -> str:
    """The cache folder's name: precision and ISA in words, then a digest of the IR's recorded sha256s, the
    float precision it runs in, the CPU (model, ISA flags, ONEDNN_MAX_CPU_ISA) and OpenVINO's version, so
    different models, precisions, CPUs or OpenVINO releases never share a folder."""
    import openvino as ov

    files = model_dir.manifest.get("files") or {}
    digests = [(files.get(n) or {}).get("sha256") or sha256_file(model_dir.path / n)
               for n in (ir_path.name, ir_path.with_suffix(".bin").name)]
    cpu_model, level, flags = _cpu_identity()
    parts = [*digests, precision, float_leftovers(precision, leftovers), cpu_model, flags,
             os.environ.get("ONEDNN_MAX_CPU_ISA", ""), ov.get_version()]
    return f"{precision}-{level}-" + hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Exclusive flock on the cache folder: processes starting together check and record in turn."""
    fd = os.open(folder / _LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_digests(path: Path) -> dict[str, dict]:
    """The recorded blobs; an unreadable or foreign file records nothing (its blobs are then removed)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict) and isinstance(v.get("size"), int)
            and isinstance(v.get("sha256"), str)}


@dataclass(frozen=True)
class CompileCache:
    """One model's compiled-model cache for one precision and CPU: pass `dir` as `CompileOptions.cache_dir`
    to every compile of that model, then `seal()` once they are done."""

    dir: Path

    @classmethod
    def for_model(cls, model_dir: ModelDir, ir_path: Path, precision: str,
                  leftovers: str | None = None) -> "CompileCache | None":
        """The checked cache folder (`cache_root`/compile_cache/`compile_cache_key`), or None (with a
        CompileCacheWarning when something prevents it) when this start compiles without one."""
        if os.environ.get(CACHE_ENV, "").strip().lower() in ("0", "off", "false", "no"):
            return None
        root = cache_root(model_dir)
        if root is None:
            warnings.warn(f"compiled-model cache not used: {model_dir.path} is read-only and the user cache folder "
                          f"{user_cache_dir() or '(no home folder)'} is not usable (it must be a folder of this "
                          "user that no one else may write; set XDG_CACHE_HOME to one, or "
                          f"{CACHE_ENV}=off to silence this): compiling from the IR", CompileCacheWarning, stacklevel=3)
            return None
        folder = root / COMPILE_CACHE / compile_cache_key(model_dir, ir_path, precision, leftovers)
        # in the model folder it is read like the model files (umask); in the user cache, only by its owner (0700)
        try:
            if root == model_dir.path:
                folder.mkdir(parents=True, exist_ok=True)
            elif private_dir(root, COMPILE_CACHE, folder.name) is None:
                raise OSError(f"cannot make a private folder (0700, this user's) at {folder}")
            cache = cls(folder)
            problem = cache.check()
        except OSError as exc:
            problem = f"{folder}: {exc.strerror or exc}"
        if problem:
            warnings.warn(f"compiled-model cache not used: {problem}", CompileCacheWarning, stacklevel=3)
            return None
        return cache

    def check(self) -> str | None:
        """Remove every blob that is not recorded or does not match its size and sha256 (a torn write, a
        flipped bit, a planted file), before OpenVINO may import it. Returns why the cache cannot be used
        (a bad blob that cannot be removed), else None."""
        with _locked(self.dir):
            recorded = _read_digests(self.dir / BLOB_DIGESTS)
            kept: dict[str, dict] = {}
            for entry in os.scandir(self.dir):
                if not entry.name.endswith(".blob"):
                    continue
                rec, path = recorded.get(entry.name), Path(entry.path)
                good = (rec is not None and entry.is_file(follow_symlinks=False)
                        and entry.stat(follow_symlinks=False).st_size == rec["size"] and sha256_file(path) == rec["sha256"])
                if good:
                    kept[entry.name] = rec
                    continue
                try:
                    path.unlink()
                except OSError as exc:
                    return f"cannot remove {path}, which is {'corrupt' if rec else 'not recorded'} ({exc.strerror})"
            if kept != recorded:
                write_json(self.dir / BLOB_DIGESTS, kept)
        return None

    def seal(self) -> int:
        """Record the sha256 of every complete blob not yet recorded (OpenVINO makes a blob read-only once it
        is written; one still being written by another process is left for its own start). Never raises: a
        blob left unrecorded is removed and compiled again at the next start. Returns how many were added."""
        try:
            with _locked(self.dir):
                recorded = _read_digests(self.dir / BLOB_DIGESTS)
                readable = 0o444 & os.stat(self.dir).st_mode  # as the folder: the model's readers, or its owner only
                added = 0
                for entry in os.scandir(self.dir):
                    if not entry.name.endswith(".blob") or entry.name in recorded:
                        continue
                    st = entry.stat(follow_symlinks=False)
                    if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o222:
                        continue
                    recorded[entry.name] = {"size": st.st_size, "sha256": sha256_file(Path(entry.path))}
                    try:
                        os.chmod(entry.path, readable)
                    except OSError:
                        pass  # another user's blob: its mode stays
                    added += 1
                if added:
                    write_json(self.dir / BLOB_DIGESTS, recorded)
                return added
        except OSError:
            return 0

    def blobs(self) -> list[str]:
        """The recorded blobs (what the next start may import)."""
        return sorted(_read_digests(self.dir / BLOB_DIGESTS))
