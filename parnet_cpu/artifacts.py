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

import errno
import fcntl
import functools
import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, Mapping, Sequence

MANIFEST = "parnet.json"
FORMAT = "parnet-cpu/1"
# Manifest schema: 2 added "schema" and "files" (sha256 and size of every model file); 3 adds
# "manifest_sha256", a digest of the manifest's own content (config, preprocessing, class names, files), so
# an edited manifest is refused like a replaced model file. Older (or digest-less) manifests are refused until
# the user records their current content on purpose with `parnet-cpu verify --stamp DIR`.
SCHEMA_VERSION = 3
IR_FILES = {"fp32": "model_fp32.xml", "int8": "model_int8.xml", "bf16": "model_bf16.xml"}
ONNX_FILE = "model.onnx"
TORCH_INT8_FILE = "model_int8_torch.pt2"  # PT2E INT8 program (torch.export.save), `--backend torch`
DEPLOY_WEIGHTS = "model_deploy.pt"  # deploy-form torch weights + config (eager baselines, ONNX export)
MODEL_FILES = (*(n for xml in IR_FILES.values() for n in (xml, xml[:-4] + ".bin")), ONNX_FILE, TORCH_INT8_FILE,
               DEPLOY_WEIGHTS)  # every file a manifest may record
# Named tensors inside every exported IR, where the multi-stream runtime cuts the graph.
STAGE_TENSORS = ("stem", "inits1", "stream1", "stream2", "stream3")
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
ACTIVATIONS = ("relu", "silu")  # the names models.parnet.ACTIVATIONS maps to modules (a test keeps them equal)
MAX_MANIFEST_BYTES = 16 << 20  # a manifest is a few KB (30 KB with 1000 class names); more is not one


class ModelDirError(ValueError):
    """A model folder is missing, incomplete or of an unknown format."""


class ManifestSealError(ModelDirError):
    """A valid manifest whose own content is not covered by its digest (edited, older schema, or no digests):
    nothing is loaded from it until `parnet-cpu verify --stamp` records its content on purpose."""


class OutputBusyError(ModelDirError):
    """Another run is writing the same output folder right now."""


class OutputWriteError(OSError):
    """An output could not be written for a reason of the place, not of the input (disk full, quota, read-only,
    permission, I/O error); what was half-written has been removed. The command line exits with 74."""


_KINDS = {stat.S_IFDIR: "folder", stat.S_IFLNK: "symbolic link", stat.S_IFIFO: "named pipe (FIFO)",
          stat.S_IFSOCK: "socket", stat.S_IFCHR: "character device", stat.S_IFBLK: "block device",
          stat.S_IFREG: "file"}


def file_kind(path: str | os.PathLike[str]) -> str:
    """What is at `path`, in words ("named pipe (FIFO)", "folder", ...; the link itself, not its target), for
    messages that must say what a thing is rather than that it is missing."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        try:
            mode = os.lstat(path).st_mode  # a dangling link
        except OSError:
            return "missing path"
    return _KINDS.get(stat.S_IFMT(mode), "special file")


def model_files(folder: Path) -> list[str]:
    """The model files (IR pairs, torch/ONNX artifacts) present in `folder`: what the manifest stamps."""
    return [n for n in MODEL_FILES if (folder / n).is_file()]


_digests: dict[tuple, str] = {}  # (path, inode, size, mtime_ns) -> sha256: each file state hashed once per process


def sha256_file(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, streamed (ParNet-S fp32 weights are 80 MB), memoised per file state: the project's one
    file digest (model files, checkpoints, compiled-model cache blobs)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _digests:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        _digests[key] = h.hexdigest()
    return _digests[key]


def manifest_digest(manifest: Mapping) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no spaces, ASCII), without its own digest field:
    what `manifest_sha256` records. Formatting changes keep it; any change of a value does not."""
    content = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ValueError(f"duplicate key(s) {dup}")
    return dict(pairs)


def read_manifest(folder: Path) -> dict:
    """The manifest of `folder` as a JSON object, or a ModelDirError that says why not (missing, unreadable,
    not UTF-8 text, invalid or duplicated-key JSON, too deep, too large, not an object)."""
    mf = folder / MANIFEST
    if os.path.lexists(mf) and not mf.is_file():
        raise ModelDirError(f"{folder} has no {MANIFEST} file ({mf} is a {file_kind(mf)}, not a file)")
    if not mf.is_file():
        raise ModelDirError(f"{folder} is not a parnet-cpu model folder (no {MANIFEST}); "
                            "create one with `parnet-cpu export` or `parnet-cpu quantize`")
    try:
        with open(mf, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise ModelDirError(f"{mf}: cannot read it ({exc.strerror or exc})") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ModelDirError(f"{mf} is larger than {MAX_MANIFEST_BYTES >> 20} MiB: not a manifest")
    try:
        manifest = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError:
        raise ModelDirError(f"{mf} is not UTF-8 text (a binary or damaged file, not a manifest)") from None
    except (ValueError, RecursionError) as exc:
        raise ModelDirError(f"{mf}: invalid JSON ({str(exc)[:200] or type(exc).__name__})") from None
    if not isinstance(manifest, dict):
        raise ModelDirError(f"{mf} holds a JSON {type(manifest).__name__}, not an object: not a manifest")
    return manifest


def stamp_manifest(folder: Path) -> dict:
    """Record the schema version, the sha256 and size of every model file in `folder`, and the digest of the
    manifest's own content; called by `export` and `quantize` after the last model file is written (and by
    `verify --stamp`). An invalid manifest is never stamped."""
    mf = folder / MANIFEST
    manifest = read_manifest(folder)
    manifest["schema"] = SCHEMA_VERSION
    manifest["files"] = {n: {"sha256": sha256_file(folder / n), "size": (folder / n).stat().st_size}
                         for n in model_files(folder)}
    manifest.pop("manifest_sha256", None)
    problems = manifest_problems(manifest)
    if problems:
        raise ModelDirError(f"refusing to stamp {mf}, it is invalid:\n" + "\n".join(f"  - {p}" for p in problems))
    manifest["manifest_sha256"] = manifest_digest(manifest)
    write_json(mf, manifest)
    return manifest


@dataclass(frozen=True)
class Spec:
    """The rule for one manifest value: its JSON kind and, optionally, a range, the allowed values, a length
    (a number, or the name of an int field of the same object), its elements' rule, or an object's fields.
    Kinds: int, number, str, list, object (exactly `fields`), map (any keys, or `keys`; values `values`, or any
    finite JSON when None)."""

    kind: str
    optional: bool = False
    nullable: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple | None = None
    pattern: tuple[str, str] | None = None  # (regex matched in full, what it means)
    length: int | str | None = None
    unique: bool = False
    items: "Spec | None" = None
    fields: Mapping[str, "Spec"] | None = None
    keys: tuple[str, ...] | None = None
    values: "Spec | None" = None


_SHA256 = (r"[0-9a-f]{64}", "64 lowercase hex digits (a sha256)")
_KIND_NAMES = {"int": "int", "number": "a number", "str": "a string", "list": "a list", "object": "an object",
               "map": "an object"}
_KIND_TYPES = {"int": int, "number": (int, float), "str": str, "list": list, "object": dict, "map": dict}


@functools.cache
def manifest_schema() -> Spec:
    """The schema-3 manifest: every field, its kind and range (built once; INTERPOLATIONS comes from data)."""
    from parnet_cpu.data.preprocess import INTERPOLATIONS

    return Spec("object", fields={
        "format": Spec("str", choices=(FORMAT,)),
        "schema": Spec("int", optional=True, low=1, high=SCHEMA_VERSION),
        "manifest_sha256": Spec("str", optional=True, pattern=_SHA256),
        "files": Spec("map", optional=True, keys=MODEL_FILES, values=Spec("object", fields={
            "sha256": Spec("str", pattern=_SHA256), "size": Spec("int", low=0)})),
        "config": Spec("object", fields={
            "planes": Spec("list", length=4, items=Spec("int", low=1, high=1 << 16)),
            "num_blocks": Spec("list", length=4, items=Spec("int", low=1, high=1 << 10)),
            "num_classes": Spec("int", low=1, high=1 << 20),
            "in_chans": Spec("int", choices=(1, 3)),
            "input_size": Spec("int", low=1, high=1 << 14),
            "activation": Spec("str", choices=ACTIVATIONS),
            "stem_stride": Spec("int", choices=(1, 2)),
            "dropout": Spec("number", low=0, high=1),
            "crop_fraction": Spec("number", low=0.1, high=1),  # options.SPECS["crop_fraction"]
            "interpolation": Spec("str", choices=tuple(INTERPOLATIONS)),
            # mean and std of pixel values on the 0-1 scale: a mean lies in [0, 1], a std is positive
            "mean": Spec("list", length="in_chans", items=Spec("number", low=0, high=1)),
            "std": Spec("list", length="in_chans", items=Spec("number", low=0, low_open=True)),
            "class_names": Spec("list", nullable=True, length="num_classes", unique=True,
                                items=Spec("str", pattern=(r"\S(.*\S)?", "a non-empty name without outer spaces"))),
        }),
        "input": Spec("str", choices=(INPUT_NAME,)),
        "output": Spec("str", choices=(OUTPUT_NAME,)),
        "stage_tensors": Spec("list", choices=(list(STAGE_TENSORS),)),
        "source": Spec("map"),
        "created": Spec("str"),
        "exported_with": Spec("map", values=Spec("str")),
    })


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _json_problems(value: object, path: str, depth: int = 0) -> list[str]:
    """Free-form JSON (e.g. `source`): only finiteness and a sane depth are required."""
    if depth > 64:
        return [f"{path} is nested more than 64 levels deep"]
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{path} is {value}, expected a finite number"]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _json_problems(v, f"{path}.{k}", depth + 1)]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _json_problems(v, f"{path}[{i}]", depth + 1)]
    return []


def _check(value: object, spec: Spec, path: str, parent: Mapping | None, problems: list[str]) -> None:
    """Append to `problems` one line per way `value` breaks `spec` (the one validator: the schema drives it)."""
    if value is None and spec.nullable:
        return
    if isinstance(value, bool) or not isinstance(value, _KIND_TYPES[spec.kind]):
        problems.append(f"{path} is {_shown(value)}, expected {_KIND_NAMES[spec.kind]}")
        return
    if isinstance(value, float) and not math.isfinite(value):
        problems.append(f"{path} is {value}, expected a finite number")
        return
    if spec.choices is not None and value not in spec.choices:
        allowed = ", ".join(map(repr, spec.choices))
        problems.append(f"{path} is {_shown(value)}, expected {'one of ' if len(spec.choices) > 1 else ''}{allowed}")
        return
    if spec.low is not None and (value <= spec.low if spec.low_open else value < spec.low):
        problems.append(f"{path} is {value}, expected {'>' if spec.low_open else '>='} {spec.low}"
                        + (f" and <= {spec.high}" if spec.high is not None else ""))
    elif spec.high is not None and value > spec.high:
        problems.append(f"{path} is {value}, expected <= {spec.high}")
    if spec.pattern is not None and not re.fullmatch(spec.pattern[0], value, re.DOTALL):
        problems.append(f"{path} is {_shown(value)}, expected {spec.pattern[1]}")
    if spec.kind == "list":
        want = parent.get(spec.length) if isinstance(spec.length, str) and parent is not None else spec.length
        if isinstance(want, int) and not isinstance(want, bool) and len(value) != want:
            ref = f" but {path.rsplit('.', 1)[0]}.{spec.length} is {want}" if isinstance(spec.length, str) else \
                f", expected {want}"
            problems.append(f"{path} has {len(value)} entries{ref}")
        for i, item in enumerate(value):
            if spec.items is not None:
                _check(item, spec.items, f"{path}[{i}]", None, problems)
        if spec.unique:
            seen: set = set()
            dup = [v for v in value if isinstance(v, str) and (v in seen or seen.add(v))]
            if dup:
                problems.append(f"{path} lists {_shown(dup[0])} more than once")
    elif spec.kind == "object":
        for key, sub in (spec.fields or {}).items():
            if key in value:
                _check(value[key], sub, f"{path}.{key}" if path else key, value, problems)
            elif not sub.optional:
                problems.append(f"{path + '.' if path else ''}{key} is missing")
        for key in value:
            if key not in (spec.fields or {}):
                problems.append(f"{path + '.' if path else ''}{key} is not a field of a schema-{SCHEMA_VERSION} "
                                f"{MANIFEST}")
    elif spec.kind == "map":
        for key, sub in value.items():
            where = f"{path}.{key}"
            if spec.keys is not None and key not in spec.keys:
                problems.append(f"{where} is not a model file name ({', '.join(spec.keys)})")
            elif spec.values is not None:
                _check(sub, spec.values, where, value, problems)
            else:
                problems += _json_problems(sub, where)


def manifest_problems(manifest: dict) -> list[str]:
    """One readable line per missing, unknown, mistyped or out-of-range manifest field, checked against the
    schema (every field, not only those the loaders read), instead of a KeyError or a wrong answer later."""
    problems: list[str] = []
    _check(manifest, manifest_schema(), "", None, problems)
    return problems


def seal_problems(manifest: dict) -> list[str]:
    """Why the manifest's own content is not covered by its digest (empty: it is): an older schema, no file
    digests, no content digest, or content changed since it was stamped."""
    schema = manifest.get("schema", 1)
    if schema != SCHEMA_VERSION:
        return [f"it declares schema {schema}, whose manifests do not cover their own content (this parnet-cpu "
                f"writes schema {SCHEMA_VERSION})"]
    if not isinstance(manifest.get("files"), dict):
        return ["it records no file digests ('files' is missing)"]
    if "manifest_sha256" not in manifest:
        return ["it records no digest of its own content ('manifest_sha256' is missing)"]
    if manifest_digest(manifest) != manifest["manifest_sha256"]:
        return ["its content (config, preprocessing, class names, files) does not match its recorded "
                "manifest_sha256: it was edited after export/quantize"]
    return []


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
    def open(cls, path: str | Path, require_seal: bool = True) -> "ModelDir":
        """Read and validate a model folder's manifest; every loader comes through here. A manifest whose own
        content is not covered by its digest is refused (ManifestSealError); `require_seal=False` (only for
        `verify`, which inspects and stamps) opens it anyway, and such a ModelDir loads no model."""
        path = Path(path)
        manifest = read_manifest(path)
        mf = path / MANIFEST
        if manifest.get("format") != FORMAT:
            raise ModelDirError(f"{mf}: unknown format {_shown(manifest.get('format'))}, expected {FORMAT!r}")
        schema = manifest.get("schema", 1)
        if isinstance(schema, int) and not isinstance(schema, bool) and schema > SCHEMA_VERSION:
            raise ModelDirError(f"{mf}: manifest schema {schema} is newer than this parnet-cpu understands "
                                f"({SCHEMA_VERSION}); upgrade parnet-cpu")
        problems = manifest_problems(manifest)
        if problems:
            raise ModelDirError(f"{mf} is invalid:\n" + "\n".join(f"  - {p}" for p in problems))
        md = cls(path, manifest)
        if require_seal:
            md.check_seal()
        return md

    def seal_error(self) -> ManifestSealError | None:
        """Why the manifest's content is not covered by its digest, as the error a loader raises (and how to
        accept it on purpose); None when it is covered."""
        problems = seal_problems(self.manifest)
        if not problems:
            return None
        return ManifestSealError(
            f"{self.path / MANIFEST} cannot be trusted: {problems[0]}; nothing is loaded from it. If the folder "
            "is yours and the change deliberate (or it was made by an older parnet-cpu), record its current "
            f"content with `parnet-cpu verify --stamp {self.path}` (it checks the IR against it first); "
            "otherwise re-export or re-quantize it")

    def check_seal(self) -> None:
        """Refuse (ManifestSealError) a manifest whose content its digest does not cover."""
        err = self.seal_error()
        if err is not None:
            raise err

    @property
    def stamped(self) -> bool:
        """Whether the manifest's digests cover the model files and its own content (schema 3, sealed)."""
        return not seal_problems(self.manifest)

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
        and its IR against the manifest. Empty: it may be loaded."""
        xml = IR_FILES[precision]
        problems = self.file_problems([xml, xml[:-4] + ".bin"])
        if not problems:
            problems = ir_problems(self.path / xml, precision, self.config)
        return problems

    def verify(self, precision: str) -> None:
        """Refuse (ModelDirError, one line per problem) a model whose files or IR contradict the manifest.
        Runs at every load; the result is kept per file state, so the same files are checked once per process."""
        self.check_seal()  # a ModelDir opened without its seal (by `verify`) loads nothing
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


# errno values that say "this place cannot take the output" (not a bug, not bad input)
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
                          errno.EFBIG})


def write_probe(folder: Path, size: int = 1 << 16) -> OSError | None:
    """The OSError `folder` gives when `size` more bytes are written into it (and synced), or None when it
    takes them (they are removed either way). Writers that hide errno (OpenVINO's save_model, torch.save: a
    RuntimeError) are judged by it."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".parnet-cpu-probe-", dir=folder)
    except OSError as exc:
        return exc
    try:
        block = bytes(1 << 20)
        while size > 0:  # a nearly full disk takes part of a write, then refuses the rest
            size -= os.write(fd, block[: min(size, len(block))])
        os.fsync(fd)
    except OSError as exc:
        return exc
    finally:
        os.close(fd)
        os.unlink(probe)
    return None


def output_write_error(exc: BaseException, folder: Path, shown: str) -> OutputWriteError | None:
    """The OutputWriteError that explains `exc`, raised while writing `shown` into `folder`, or None when the
    place is not the cause (a bug, bad input or an interruption: `exc` goes on as it is)."""
    if isinstance(exc, OutputWriteError):
        return exc
    if isinstance(exc, OSError):
        cause, note = (exc if exc.errno in WRITE_ERRNOS else None), ""
    elif isinstance(exc, RuntimeError):
        cause = write_probe(folder)
        note = f" (the writer said: {str(exc).strip()[:160]})" if cause is not None and cause.errno in WRITE_ERRNOS else ""
    else:
        return None
    if cause is None or cause.errno not in WRITE_ERRNOS:
        return None
    return OutputWriteError(cause.errno, f"{os.strerror(cause.errno)} ({errno.errorcode[cause.errno]}){note}", shown)


@contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w", encoding: str | None = None) -> Iterator[IO]:
    """Write `path` atomically: yields a file object on a uniquely named temporary file in the same folder,
    which is synced and replaces `path` (os.replace) only when the block ends without an error, so readers (and
    concurrent writers) only ever see a whole file; on an error or interruption the temporary file is removed,
    and a full disk, a quota, a read-only or unwritable place becomes an OutputWriteError naming `path`.
    A device or a pipe (`/dev/stdout`) is written directly: there is nothing to replace.
    The one way this project writes a file that others may read meanwhile (JSON, checkpoints)."""
    path = Path(path)
    if os.path.exists(path) and not path.is_file() and not path.is_dir():
        try:
            with open(path, mode, encoding=encoding) as f:
                yield f
        except BaseException as exc:
            err = output_write_error(exc, path.parent, str(path))
            if err is None or err is exc:
                raise
            raise err from exc
        return
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, mode, encoding=encoding) as f:
            os.fchmod(fd, 0o644)  # as a plain write would leave it (mkstemp makes 0600)
            yield f
            f.flush()
            os.fsync(f.fileno())  # a disk that accepted the bytes but cannot keep them says so now, not later
        os.replace(tmp, path)
    except BaseException as exc:
        err = output_write_error(exc, path.parent, str(path))  # probed while the temporary still holds its space
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        if err is None or err is exc:
            raise
        raise err from exc


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


# What this tool may leave in a model folder besides the manifest and the model files it records: the
# quantization report, the runtime's plan and compiled-model caches, and atomic_write's temporaries of those.
OWN_EXTRAS = frozenset({"report.json", "plan_cache.json", "compile_cache"})
_OWN_TEMP_RE = re.compile(r"^\.(parnet\.json|report\.json|plan_cache\.json)\..+\.tmp$")


def foreign_model_dir_problem(folder: Path) -> str | None:
    """Why `folder` is not wholly a model folder this tool wrote (None: it is), so `--overwrite` may delete it:
    its manifest must be ours and match its own digest (content not edited since it was stamped), and every
    entry must be the manifest, a file it records, or a known artifact of this tool (OWN_EXTRAS). Anything else
    (a user's class list, notes, images put there) is not ours to delete. File contents are not hashed: a
    damaged model folder of ours can still be replaced."""
    try:
        manifest = read_manifest(folder)
    except ModelDirError as exc:
        return str(exc)
    if manifest.get("format") != FORMAT:
        return f"its {MANIFEST} is not one parnet-cpu writes (format {_shown(manifest.get('format'))})"
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        return (f"its {MANIFEST} does not match its recorded digest (edited, or from an older parnet-cpu: "
                f"`parnet-cpu verify --stamp {folder}` records it)")
    files = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
    try:
        names = os.listdir(folder)
    except OSError as exc:
        return f"it cannot be listed ({exc.strerror or exc})"
    foreign = sorted(n for n in names if n != MANIFEST and n not in files
                     and not (n in OWN_EXTRAS and _is_own_extra(folder / n)) and not _OWN_TEMP_RE.match(n))
    if foreign:
        return (f"it holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} its {MANIFEST} does not list "
                f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''})")
    return None


def _is_own_extra(path: Path) -> bool:
    """An OWN_EXTRAS name proves it is ours by content, not by name alone (a user's own report.json in a model
    folder is not ours to delete): report.json carries this tool's report stamp, plan_cache.json is the plan
    cache's object of choices, compile_cache is a real folder (not a link) holding only folders (one per
    model, precision and ISA, which the compile cache writes)."""
    try:
        if path.is_symlink():
            return False
        if path.name == "compile_cache":
            return path.is_dir() and all(e.is_dir() and not e.is_symlink() for e in path.iterdir())
        if not path.is_file() or path.stat().st_size > MAX_MANIFEST_BYTES:
            return False
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if path.name == "report.json":
        return isinstance(obj, dict) and isinstance(obj.get("report"), str) and "parnet_cpu" in obj
    return isinstance(obj, dict) and all(isinstance(v, dict) and "choice" in v for v in obj.values())


def is_own_model_dir(folder: Path) -> bool:
    """True when everything in `folder` is this tool's (see `foreign_model_dir_problem`): what makes
    --overwrite safe."""
    return foreign_model_dir_problem(folder) is None


InputPaths = Mapping[str, "str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None"]


def _input_paths(inputs: InputPaths | None) -> Iterator[tuple[str, str, Path]]:
    """(flag, path as given, real path) of every input path (a flag may name several, or none)."""
    for flag, value in (inputs or {}).items():
        values = [value] if isinstance(value, (str, os.PathLike)) else list(value or ())
        for src in values:
            if src is not None:
                yield flag, str(src), Path(os.path.realpath(Path(src).expanduser()))


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
    for flag, src, real in _input_paths(inputs):
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
        problem = foreign_model_dir_problem(target) if entries else None
        if problem:
            raise ModelDirError(f"--out {shown} is not wholly a model folder parnet-cpu wrote: {problem}; "
                                "--overwrite only replaces what this tool wrote (move those entries out, or name "
                                "another --out)")
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


class OutputPathError(ModelDirError):
    """A single-file output (--json, --report, --out FILE, --plot) this command must not write there: an input
    of the command, a folder, a file this tool did not write, or a place that cannot take it."""


MAX_REPORT_BYTES = 64 << 20  # a JSON report is KBs (a profile of every layer: a few MB)


def own_report_kind(path: Path) -> str | None:
    """The kind of JSON report this tool wrote at `path` (its `report_stamp`: "report" and "parnet_cpu"
    fields), or None when the file is anything else (read through a non-blocking, link-refusing open)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        raw = f.read(MAX_REPORT_BYTES + 1)
    try:
        obj = json.loads(raw.decode("utf-8")) if len(raw) <= MAX_REPORT_BYTES else None
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if isinstance(obj, dict) and isinstance(obj.get("report"), str) and "parnet_cpu" in obj:
        return obj["report"]
    return None


def check_output_file(out: str | os.PathLike[str], flag: str, inputs: InputPaths | None = None, *,
                      overwrite: bool = False, report: str | None = None) -> Path:
    """Refuse, before any work, a single-file output this command must not write; return the path to write
    (links resolved: what is replaced is the file the path names).

    Refused (OutputPathError): a folder; a path that is, or lies inside, one of `inputs` (flag -> path or
    paths: the model folder, data folders and files, checkpoint, label and class files, and the command's
    other outputs), or the same file as one of them under another name (a hard link); an existing file unless
    `overwrite` or it is a JSON report of kind `report` this tool wrote (`own_report_kind`: rerunning a command
    replaces its previous report, as expected, never a user's JPEG or notes); a missing folder, or one that
    cannot be written or cannot take a write (full, quota, read-only: probed). A device or a pipe
    (/dev/stdout) is accepted as it is: written directly, nothing is replaced."""
    shown = str(out)
    if not str(out).strip():
        raise OutputPathError(f"{flag} is empty; name a file")
    path = Path(out).expanduser()
    target = Path(os.path.realpath(path))
    if os.path.exists(path) and not os.path.isdir(path) and not os.path.isfile(path):
        target = path  # a device or pipe such as /dev/stdout (its realpath may be an unopenable pipe:[...] name)
    for other, src, real in _input_paths(inputs):
        how = "is" if target == real else "is inside" if real in target.parents else None
        if how is None and os.path.exists(target) and os.path.exists(real):
            a, b = os.stat(target), os.stat(real)
            how = "is the same file as" if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) else None
        if how:
            raise OutputPathError(f"{flag} {shown} {how} {other} {src}, an input of this command; writing it "
                                  f"would destroy that input: name another file for {flag}")
    if target.is_dir():
        raise OutputPathError(f"{flag} {shown} is a folder; name a file")
    if os.path.exists(target) and not target.is_file():
        return target  # a device or a pipe (/dev/stdout): written directly, nothing to replace or probe
    if target.is_file() and not overwrite:
        kind = own_report_kind(target) if report else None
        if report is None or kind != report:
            what = f"a parnet-cpu {kind} report, not {report} one" if kind else "not written by this parnet-cpu " \
                f"command{' (no ' + report + ' report stamp)' if report else ''}"
            raise OutputPathError(f"{flag} {shown} exists and is {what}; refusing to replace it: pass --overwrite "
                                  "to replace it, or name another file")
    folder = target.parent
    if not folder.is_dir():
        raise OutputPathError(f"{flag} {shown}: folder {folder} is missing (create it first)")
    problem = write_probe(folder, size=1)  # a full disk, a quota, a read-only mount: said before the work
    if problem is not None:
        raise OutputPathError(f"{flag} {shown}: folder {folder} cannot take the result "
                              f"({problem.strerror or problem})")
    return target


@contextmanager
def output_file(out: str | os.PathLike[str], flag: str, inputs: InputPaths | None = None, *,
                overwrite: bool = False, report: str | None = None, mode: str = "w",
                encoding: str | None = "utf-8") -> Iterator[IO]:
    """The one way a command writes a single-file output: checked (`check_output_file`, again: nothing may
    have become an input or a foreign file since the check before the work), written atomically
    (`atomic_write`: a whole file or none), and any OSError of the place becomes an OutputWriteError naming
    the path (exit 74)."""
    target = check_output_file(out, flag, inputs, overwrite=overwrite, report=report)
    shown = str(out)
    try:
        with atomic_write(target, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
    except OutputWriteError as exc:
        raise OutputWriteError(exc.errno, exc.strerror, shown) from exc
    except OSError as exc:
        raise OutputWriteError(exc.errno or errno.EIO, f"{exc.strerror or exc}"
                               f" ({errno.errorcode.get(exc.errno or errno.EIO, '?')})", shown) from exc


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


LOCK_SUFFIX = ".parnet-cpu.lock"
_LOCK_RE = re.compile(r"^\..+" + re.escape(LOCK_SUFFIX) + "$")
_held_locks: dict[tuple[str, int], int] = {}  # (lock file, thread) -> nesting depth: a run may re-enter its own lock


def output_lock_path(out: str | Path) -> Path:
    """`.<name>.parnet-cpu.lock` next to the output folder `out`."""
    target = Path(os.path.realpath(Path(out).expanduser()))
    return target.parent / f".{target.name}{LOCK_SUFFIX}"


def _open_lock_file(path: Path) -> int:
    """Open (create) an output lock file without following a link or blocking on a FIFO, and refuse anything
    but a plain file with one link: a symlink, FIFO, folder or hard link planted under the lock's name is an
    OutputPathError naming it, never truncated or written (what `runtime.leases` does for core lease files;
    that one raises its own LeaseDirError and sits above this module, so it cannot be shared)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise
        kind = "symbolic link" if exc.errno == errno.ELOOP else file_kind(path)
        raise OutputPathError(f"the output lock {path} is a {kind}, not a lock file this tool made; remove it "
                              "and run again") from None
    st = os.fstat(fd)
    problem = (f"is a {_KINDS.get(stat.S_IFMT(st.st_mode), 'special file')}" if not stat.S_ISREG(st.st_mode) else
               f"has {st.st_nlink} hard links (it may be another file)" if st.st_nlink != 1 else None)
    if problem:
        os.close(fd)
        raise OutputPathError(f"the output lock {path} {problem}, not a lock file this tool made; remove it and "
                              "run again")
    return fd


def _lock_file(path: Path, tries: int = 1) -> int | None:
    """An fd holding an exclusive flock on the file now at `path` (created if needed), or None while another
    process holds it (asked `tries` times, 50 ms apart). A holder removes the file as it releases it, so after
    locking, the file must still be the one at `path` (else try again): two runs never hold different files."""
    while True:
        fd = _open_lock_file(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            tries -= 1
            if tries <= 0:
                return None
            time.sleep(0.05)
            continue
        except BaseException:
            os.close(fd)
            raise
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _lock_holder(path: Path) -> str:
    try:
        note = json.loads(path.read_text(encoding="utf-8"))
        host = "" if note["host"] == socket.gethostname() else f" on {note['host']}"
        return f"pid {note['pid']}{host}, since {note['started']}: {note['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "it has not said who it is yet"


@contextmanager
def output_lock(out: str | Path) -> Iterator[Path]:
    """Hold the output folder `out` for this run (an flock on `.<name>.parnet-cpu.lock` next to it, which says
    who holds it and is removed at the end): a second run writing the same `out` meanwhile is refused at once
    (OutputBusyError naming this run's pid) instead of both finishing and one result silently replacing the
    other. The kernel releases the lock of a killed run; re-entering it in the same thread is free."""
    path = output_lock_path(out)
    key = (str(path), threading.get_ident())
    if key in _held_locks:
        _held_locks[key] += 1
        try:
            yield path
        finally:
            _held_locks[key] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _lock_file(path, tries=5)  # a moment's patience: another run's `remove_stale_locks` may hold it briefly
    if fd is None:
        raise OutputBusyError(f"--out {out} is being written by another parnet-cpu run ({_lock_holder(path)}); "
                              "wait for it to finish or choose another --out")
    try:
        note = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            os.ftruncate(fd, 0)  # the note of a killed run that held it before
            os.write(fd, json.dumps(note).encode())
        except OSError:  # a full disk: the lock holds without its note
            pass
        _held_locks[key] = 1
        yield path
    finally:
        _held_locks.pop(key, None)
        try:
            os.unlink(path)  # while still holding it: a run that opened it meanwhile sees it is gone and retries
        except OSError:
            pass
        os.close(fd)


def remove_stale_locks(parent: Path) -> None:
    """Remove output locks in `parent` that no process holds (their run was killed)."""
    try:
        names = [e.name for e in os.scandir(parent) if _LOCK_RE.match(e.name) and e.is_file(follow_symlinks=False)]
    except OSError:
        return
    for name in names:
        try:
            fd = _lock_file(parent / name)
        except (OSError, ModelDirError):  # a planted file under a lock's name: left alone, the run says so
            continue
        if fd is not None:
            try:
                os.unlink(parent / name)
            except OSError:
                pass
            os.close(fd)


@contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False,
                      inputs: Mapping[str, str | Path | None] | None = None) -> Iterator[Path]:
    """Yield a temporary folder next to `out`; on success it replaces `out`, on failure or interruption it
    is removed, so a run never leaves a half-written model folder behind. `out` is checked first (see
    `check_output_dir`) and held for the run (`output_lock`); stale temporaries and locks of killed runs next
    to it are removed. A full disk (or quota, read-only, permission, I/O error) is an OutputWriteError."""
    target = check_output_dir(out, overwrite, inputs)
    with output_lock(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_dirs(target.parent)
        remove_stale_locks(target.parent)
        tmp = None
        try:
            tmp = Path(tempfile.mkdtemp(prefix=temp_dir_prefix(), dir=target.parent))
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
        except BaseException as exc:
            err = output_write_error(exc, tmp or target.parent, f"--out {out}")  # before the space is freed
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if err is None or err is exc:
                raise
            raise err from exc


REPORT_SCHEMA = 1  # version of the JSON reports (quantize's report.json, eval --json, bench --json)


def report_stamp(kind: str) -> dict:
    """What every JSON report starts with: what it is, its schema version, the tool version and a
    time-zone-aware UTC timestamp, so a report read months later says what wrote it and when."""
    from datetime import datetime, timezone

    from parnet_cpu import __version__

    return {"report": kind, "schema": REPORT_SCHEMA, "parnet_cpu": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
