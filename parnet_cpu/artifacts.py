"""The model folder: what `export` and `quantize` write and what the runtime, `eval` and `bench` read.

Torch-free on purpose (the runtime and server read it). Layout::

    OUT/parnet.json       manifest: architecture config, preprocessing, files, provenance
    OUT/model_fp32.xml/.bin   deploy-form FP32 OpenVINO IR (weights kept in fp32)
    OUT/model_int8.xml/.bin   INT8 IR (after `quantize`)
    OUT/model_deploy.pt   deploy-form torch weights (safe format) for eager baselines
    OUT/model_int8_torch.pt2  PT2E INT8 program (after `quantize --backend torch`)
    OUT/model.onnx        optional ONNX export of the deploy form
    OUT/report.json       quantization report (after `quantize`)
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, Mapping

MANIFEST = "parnet.json"
FORMAT = "parnet-cpu/1"
# Manifest schema: 2 adds "schema" and "files" (sha256 and size of every model file). Schema-1 folders
# (no digests) still load, with a warning that says how to stamp them (`parnet-cpu verify --stamp DIR`).
SCHEMA_VERSION = 2
IR_FILES = {"fp32": "model_fp32.xml", "int8": "model_int8.xml", "bf16": "model_bf16.xml"}
ONNX_FILE = "model.onnx"
TORCH_INT8_FILE = "model_int8_torch.pt2"  # PT2E INT8 program (torch.export.save), `--backend torch`
DEPLOY_WEIGHTS = "model_deploy.pt"  # deploy-form torch weights + config (eager baselines, ONNX export)
# Named tensors inside every exported IR, where the multi-stream runtime cuts the graph.
STAGE_TENSORS = ("stem", "inits1", "stream1", "stream2", "stream3")
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


class ModelDirError(ValueError):
    """A model folder is missing, incomplete or of an unknown format."""


class ModelDirWarning(UserWarning):
    """A model folder loads, but without the integrity checks a stamped one gets."""


def model_files(folder: Path) -> list[str]:
    """The model files (IR pairs, torch/ONNX artifacts) present in `folder`: what the manifest stamps."""
    names = [n for xml in IR_FILES.values() for n in (xml, xml[:-4] + ".bin")]
    return [n for n in (*names, ONNX_FILE, TORCH_INT8_FILE, DEPLOY_WEIGHTS) if (folder / n).is_file()]


_digests: dict[tuple, str] = {}  # (path, inode, size, mtime_ns) -> sha256: each file state hashed once per process


def sha256_file(path: Path) -> str:
    """sha256 of a file, streamed (ParNet-S fp32 weights are 80 MB), memoised per file state."""
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _digests:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        _digests[key] = h.hexdigest()
    return _digests[key]


def stamp_manifest(folder: Path) -> dict:
    """Record the schema version and the sha256 and size of every model file in `folder`'s manifest;
    called by `export` and `quantize` after the last model file is written (and by `verify --stamp`)."""
    mf = folder / MANIFEST
    manifest = json.loads(mf.read_text())
    manifest["schema"] = SCHEMA_VERSION
    manifest["files"] = {n: {"sha256": sha256_file(folder / n), "size": (folder / n).stat().st_size}
                         for n in model_files(folder)}
    write_json(mf, manifest)
    return manifest


# Manifest fields the loaders read, with their type (bool is excluded from int on purpose).
_CONFIG_FIELDS = {"in_chans": int, "input_size": int, "num_classes": int, "crop_fraction": (int, float),
                  "interpolation": str, "mean": list, "std": list}


def manifest_problems(manifest: dict) -> list[str]:
    """One readable line per missing or mistyped manifest field (instead of a KeyError later)."""
    cfg = manifest.get("config")
    if not isinstance(cfg, dict):
        return ["'config' is missing or not an object"]
    problems = []
    for key, kind in _CONFIG_FIELDS.items():
        if key not in cfg:
            problems.append(f"config.{key} is missing")
        elif isinstance(cfg[key], bool) or not isinstance(cfg[key], kind):
            problems.append(f"config.{key} is {cfg[key]!r}, expected {getattr(kind, '__name__', 'a number')}")
    if not problems:
        if cfg["in_chans"] < 1 or cfg["input_size"] < 1 or cfg["num_classes"] < 1:
            problems.append("config.in_chans, input_size and num_classes must be positive")
        for key in ("mean", "std"):
            if len(cfg[key]) != cfg["in_chans"] or not all(isinstance(v, (int, float)) for v in cfg[key]):
                problems.append(f"config.{key} must hold {cfg['in_chans']} numbers (one per input channel), "
                                f"got {cfg[key]!r}")
        if any(isinstance(v, (int, float)) and v == 0 for v in cfg["std"]):
            problems.append("config.std contains 0")
        names = cfg.get("class_names")
        if names is not None and (not isinstance(names, list) or len(names) != cfg["num_classes"]):
            problems.append(f"config.class_names has {len(names) if isinstance(names, list) else type(names).__name__}"
                            f" entries but config.num_classes is {cfg['num_classes']}")
    files = manifest.get("files")
    if files is not None and not (isinstance(files, dict) and all(
            isinstance(r, dict) and isinstance(r.get("sha256"), str) and isinstance(r.get("size"), int)
            for r in files.values())):
        problems.append("'files' must map each file name to {sha256, size}")
    return problems


def ir_problems(ir_path: Path, precision: str, cfg: dict) -> list[str]:
    """The IR against the manifest: input shape, class count, and precision (an int8 IR must contain
    quantized operations, an fp32/bf16 one must not)."""
    from parnet_cpu.system.openvino_core import core

    try:
        model = core().read_model(str(ir_path))
    except Exception as exc:  # OpenVINO raises its own RuntimeError subclasses for unreadable IRs
        return [f"{ir_path.name} cannot be read by OpenVINO: {str(exc).strip().splitlines()[0][:200]}"]
    problems = []
    want = [cfg["in_chans"], cfg["input_size"], cfg["input_size"]]
    ins = model.inputs
    dims = list(ins[0].get_partial_shape()) if len(ins) == 1 else []
    got = [d.get_length() if d.is_static else None for d in dims[1:]]
    if len(ins) != 1 or got != want:
        problems.append(f"{ir_path.name} takes input {ins[0].get_partial_shape() if ins else 'none'}, but parnet.json "
                        f"says (N, {', '.join(map(str, want))})")
    outs = model.outputs
    last = list(outs[0].get_partial_shape())[-1] if len(outs) == 1 else None
    classes = last.get_length() if last is not None and last.is_static else None
    if classes != cfg["num_classes"]:
        problems.append(f"{ir_path.name} predicts {classes} classes, but parnet.json says config.num_classes = "
                        f"{cfg['num_classes']}")
    quantized = any(op.get_type_name() in ("FakeQuantize", "FakeConvert") or
                    (op.get_type_name() == "Constant" and op.get_output_element_type(0).get_type_name() in ("i8", "u8"))
                    for op in model.get_ops())
    if precision == "int8" and not quantized:
        problems.append(f"{ir_path.name} contains no quantized operation (FakeQuantize or int8 weights): it is not "
                        "an INT8 model (an FP32 IR copied over it?)")
    if precision != "int8" and quantized:
        problems.append(f"{ir_path.name} contains quantized operations: it is not a {precision} model "
                        "(an INT8 IR copied over it?)")
    return problems


_verified: set[tuple] = set()  # (folder, precision, file states) that passed `ModelDir.verify` in this process


@dataclass(frozen=True)
class ModelDir:
    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | Path) -> "ModelDir":
        path = Path(path)
        mf = path / MANIFEST
        if not mf.is_file():
            raise ModelDirError(f"{path} is not a parnet-cpu model folder (no {MANIFEST}); "
                                "create one with `parnet-cpu export` or `parnet-cpu quantize`")
        try:
            manifest = json.loads(mf.read_text())
        except json.JSONDecodeError as exc:
            raise ModelDirError(f"{mf}: invalid JSON ({exc})") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ModelDirError(f"{mf}: unknown format "
                                f"{manifest.get('format') if isinstance(manifest, dict) else manifest!r}, "
                                f"expected {FORMAT!r}")
        if not isinstance(manifest.get("schema", 1), int) or manifest.get("schema", 1) > SCHEMA_VERSION:
            raise ModelDirError(f"{mf}: manifest schema {manifest.get('schema')!r} is newer than this parnet-cpu "
                                f"understands ({SCHEMA_VERSION}); upgrade parnet-cpu")
        problems = manifest_problems(manifest)
        if problems:
            raise ModelDirError(f"{mf} is invalid:\n" + "\n".join(f"  - {p}" for p in problems))
        return cls(path, manifest)

    @property
    def stamped(self) -> bool:
        """Whether the manifest records digests of the model files (schema 2)."""
        return self.manifest.get("schema", 1) >= 2 and isinstance(self.manifest.get("files"), dict)

    def file_sha256(self, name: str) -> str:
        """The digest of one model file (what the plan cache keys on), hashed once per file state."""
        return sha256_file(self.path / name)

    def file_problems(self, names: list[str]) -> list[str]:
        """Each named file against its recorded size and sha256 (size first: a truncated file costs no hash)."""
        files, problems = self.manifest.get("files") or {}, []
        for name in names:
            path, rec = self.path / name, files.get(name)
            if rec is None:
                if path.is_file():
                    problems.append(f"{name} is not recorded in {MANIFEST} (added or replaced after export/quantize)")
                continue
            if not path.is_file():
                problems.append(f"{name} is recorded in {MANIFEST} but missing")
            elif path.stat().st_size != rec["size"]:
                problems.append(f"{name} is {path.stat().st_size} bytes, {MANIFEST} records {rec['size']} "
                                "(truncated or replaced)")
            elif sha256_file(path) != rec["sha256"]:
                problems.append(f"{name} does not match its recorded sha256 (corrupted or replaced: even one "
                                "flipped bit changes the answers)")
        return problems

    def check(self, precision: str) -> list[str]:
        """Every problem that makes the `precision` model untrustworthy: its files against their digests
        (stamped folders) and its IR against the manifest. Empty: it may be loaded."""
        xml = IR_FILES[precision]
        names = [xml, xml[:-4] + ".bin"]
        problems = self.file_problems(names) if self.stamped else []
        if not problems:
            problems = ir_problems(self.path / xml, precision, self.config)
        return problems

    def verify(self, precision: str) -> None:
        """Refuse (ModelDirError, one line per problem) a model whose files or IR contradict the manifest.
        Runs at every load; the result is kept per file state, so the same files are checked once per process."""
        xml = self.path / IR_FILES[precision]
        state = tuple((p.name, p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns)
                      for p in (self.path / MANIFEST, xml, xml.with_suffix(".bin")) if p.is_file())
        key = (str(self.path.resolve()), precision, state)
        if key in _verified:
            return
        problems = self.check(precision)
        if problems:
            raise ModelDirError(f"{self.path}: the {precision} model does not match {MANIFEST}:\n"
                                + "\n".join(f"  - {p}" for p in problems)
                                + "\n(`parnet-cpu verify` lists every check; re-export or re-quantize the folder)")
        if not self.stamped:
            warnings.warn(f"{self.path}: {MANIFEST} records no file digests (made by an older parnet-cpu), so "
                          "corrupted or swapped model files cannot be detected; stamp it once with "
                          f"`parnet-cpu verify --stamp {self.path}`", ModelDirWarning, stacklevel=3)
        _verified.add(key)

    @property
    def config(self) -> dict:
        return self.manifest["config"]

    @property
    def precisions(self) -> list[str]:
        return [p for p, f in IR_FILES.items() if (self.path / f).is_file()]

    @property
    def default_precision(self) -> str:
        """The precision a loader uses when none is asked for: int8 where the folder has it, else fp32
        (the one rule for Runtime, serve, eval, bench, profile and plan)."""
        return "int8" if (self.path / IR_FILES["int8"]).is_file() else "fp32"

    def ir_path(self, precision: str | None = None) -> Path:
        """IR of the given precision (default: `default_precision`)."""
        if precision is None:
            precision = self.default_precision
        if precision not in IR_FILES:
            raise ModelDirError(f"unknown precision {precision!r}; choose from {', '.join(IR_FILES)}")
        p = self.path / IR_FILES[precision]
        if not p.is_file():
            raise ModelDirError(f"{self.path}: no {precision} model ({p.name}); present: {', '.join(self.precisions) or 'none'}")
        self.verify(precision)  # every loader (Runtime, serve, eval, bench) comes through here
        return p

    def preprocess_config(self, **overrides):
        """The evaluation preprocessing the model was built for (its config), with optional overrides."""
        from parnet_cpu.data import PreprocessConfig

        c = self.config
        params = dict(input_size=c["input_size"], crop_fraction=c["crop_fraction"], interpolation=c["interpolation"],
                      mean=tuple(c["mean"]), std=tuple(c["std"]), channels=c["in_chans"])
        params.update({k: v for k, v in overrides.items() if v is not None})
        return PreprocessConfig(**params)

    @property
    def class_names(self) -> tuple[str, ...] | None:
        names = self.config.get("class_names")
        if names:
            return tuple(names)
        if self.config.get("num_classes") == 1000:
            from parnet_cpu.data import imagenet_class_names

            return imagenet_class_names()
        return None

    def input_shape(self) -> tuple[int, int, int]:
        c = self.config
        return (c["in_chans"], c["input_size"], c["input_size"])


@contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w", encoding: str | None = None) -> Iterator[IO]:
    """Write `path` atomically: yields a file object on a uniquely named temporary file in the same folder,
    which replaces `path` (os.replace) only when the block ends without an error, so readers (and concurrent
    writers) only ever see a whole file; on an error or interruption the temporary file is removed.
    The one way this project writes a file that others may read meanwhile (JSON, checkpoints)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # as a plain write would leave it (mkstemp makes 0600)
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_json(path: Path, obj: dict) -> None:
    """Atomic (see `atomic_write`): readers only ever see a whole file."""
    with atomic_write(path) as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


# Temporary folders of this tool: `.parnet-cpu-tmp-<pid>-<host tag>-<random>`, so a later run can tell its
# own leftovers (a kill -9, a crash) from anything else and remove only those.
TEMP_PREFIX = ".parnet-cpu-tmp-"
_TEMP_RE = re.compile(r"^\.parnet-cpu-tmp-(\d+)-([0-9a-f]{8})-")


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def temp_dir_prefix(pid: int | None = None) -> str:
    """Name prefix of the temporary folders process `pid` (default: this one) creates on this host."""
    return f"{TEMP_PREFIX}{os.getpid() if pid is None else pid}-{_host_tag()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, owned by someone else
        return True
    return True


def remove_stale_temp_dirs(parent: Path) -> list[Path]:
    """Remove what earlier runs of this tool left in `parent` when they were killed: only folders with our
    name pattern, made on this host, whose process is gone (a shared folder may hold other hosts' runs)."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for e in entries:
        m = _TEMP_RE.match(e.name)
        if not m or m.group(2) != _host_tag() or not e.is_dir(follow_symlinks=False):
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(e.path, ignore_errors=True)
            removed.append(Path(e.path))
    return removed


def is_own_model_dir(folder: Path) -> bool:
    """True when `folder` holds the manifest this tool writes (the marker that makes --overwrite safe); only
    the marker is read, so a damaged model folder of ours can still be replaced."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def _nearest_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def check_output_dir(out: str | Path, overwrite: bool = False, inputs: Mapping[str, str | Path | None] | None = None
                     ) -> Path:
    """Refuse, before any work, an output folder this tool must not write or replace; return its real path.

    Refused: the current directory or a parent of it; a path that equals, contains or lies inside one of
    `inputs` (flag -> path, e.g. {"--calib": DIR}); an existing file; a non-empty folder without
    `overwrite`, and with it any folder this tool did not write (no manifest of ours); a place that
    cannot be written (probed by creating a temporary folder there)."""
    shown = str(out)
    target = Path(os.path.realpath(Path(out).expanduser()))
    cwd = Path(os.path.realpath(os.getcwd()))
    if target == cwd or target in cwd.parents:
        raise ModelDirError(f"--out {shown} is the current directory or one of its parents; name a new folder "
                            "for the model")
    for flag, src in (inputs or {}).items():
        if src is None:
            continue
        real = Path(os.path.realpath(Path(src).expanduser()))
        how = "is" if target == real else "contains" if target in real.parents else \
            "is inside" if real in target.parents else None
        if how:
            raise ModelDirError(f"--out {shown} {how} {flag} {src}: the model folder must be separate from the "
                                "data it is made from")
    if os.path.lexists(target) and not target.is_dir():
        raise ModelDirError(f"--out {shown} is a file, not a folder; refusing to replace it")
    if target.is_dir():
        try:
            entries = os.listdir(target)
        except OSError as exc:
            raise ModelDirError(f"cannot read --out {shown}: {exc.strerror}") from None
        if entries and not overwrite:
            raise ModelDirError(f"output folder {shown} exists and is not empty (use --overwrite to replace a "
                                "model folder written by parnet-cpu)")
        if entries and not is_own_model_dir(target):
            raise ModelDirError(f"--out {shown} is not a parnet-cpu model folder (no {MANIFEST} written by "
                                f"parnet-cpu) and holds {len(entries)} entries; --overwrite only replaces folders "
                                "this tool wrote")
    base = _nearest_existing(target.parent)
    try:
        if not base.is_dir():
            raise NotADirectoryError(20, "not a folder", str(base))
        probe = tempfile.mkdtemp(prefix=temp_dir_prefix(), dir=base)
        try:
            pass
        finally:
            os.rmdir(probe)
    except OSError as exc:
        raise ModelDirError(f"cannot write --out {shown}: {exc.strerror or exc} ({base})") from None
    return target


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C / SIGTERM for the few renames that swap the model folder in, so an interruption cannot
    fall between "old model moved away" and "new model moved in"; the signal acts right after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    sigs = (signal.SIGINT, signal.SIGTERM)
    old = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in sigs}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for s in caught[:1]:
            if callable(old[s]):
                old[s](s, None)
            elif old[s] == signal.SIG_DFL:
                signal.raise_signal(s)


@contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False,
                      inputs: Mapping[str, str | Path | None] | None = None) -> Iterator[Path]:
    """Yield a temporary folder next to `out`; on success it replaces `out`, on failure or interruption it
    is removed, so a run never leaves a half-written model folder behind. `out` is checked first (see
    `check_output_dir`), and stale temporaries of killed runs next to it are removed."""
    target = check_output_dir(out, overwrite, inputs)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=temp_dir_prefix(), dir=target.parent))
    try:
        yield tmp
        check_output_dir(out, overwrite, inputs)  # nothing foreign moved in meanwhile
        with _signals_deferred():
            if target.exists():
                old = tmp.with_name(tmp.name + "-old")
                target.rename(old)
                tmp.rename(target)
                shutil.rmtree(old, ignore_errors=True)  # if this fails, the next run removes it (dead pid)
            else:
                tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


REPORT_SCHEMA = 1  # version of the JSON reports (quantize's report.json, eval --json, bench --json)


def report_stamp(kind: str) -> dict:
    """What every JSON report starts with: what it is, its schema version, the tool version and a
    time-zone-aware UTC timestamp, so a report read months later says what wrote it and when."""
    from datetime import datetime, timezone

    from parnet_cpu import __version__

    return {"report": kind, "schema": REPORT_SCHEMA, "parnet_cpu": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
