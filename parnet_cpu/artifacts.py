"""The model folder: what `export` and `quantize` write and what the runtime, `eval` and `bench` read.

Torch-free on purpose (the runtime and server read it); it is written through `outputs` (atomic, checked,
locked), which knows nothing of model folders. Layout::

    OUT/parnet.json       manifest: architecture config, preprocessing, files, provenance
    OUT/model_fp32.xml/.bin   deploy-form FP32 OpenVINO IR (weights kept in fp32)
    OUT/model_int8.xml/.bin   INT8 IR (after `quantize`)
    OUT/model_deploy.pt   deploy-form torch weights (safe format) for eager baselines
    OUT/model_int8_torch.pt2  PT2E INT8 program (after `quantize --backend torch`)
    OUT/model.onnx        optional ONNX export of the deploy form
    OUT/report.json       quantization report (after `quantize`)

`parnet-cpu slim` (`slim_model_dir`) makes a serving-only folder: the IR of the precisions a Runtime serves,
the manifest (re-recording only those files, with a `serving_only` field saying what was removed) and the
runtime's caches; the README's "The model folder" section says which file each reader needs.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from parnet_cpu.outputs import file_kind, output_lock, sha256_file, write_json

MANIFEST = "parnet.json"
LEGACY_CROP_KEY = "crop_fraction"  # the manifest's name for crop_pct before 0.1.0 followed timm
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


def model_files(folder: Path) -> list[str]:
    """The model files (IR pairs, torch/ONNX artifacts) present in `folder`: what the manifest stamps."""
    return [n for n in MODEL_FILES if (folder / n).is_file()]


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
            # timm's name; folders written before 0.1.0's rename say crop_fraction (read, never both)
            "crop_pct": Spec("number", optional=True, low=0.1, high=1),  # options.SPECS["crop_pct"]
            LEGACY_CROP_KEY: Spec("number", optional=True, low=0.1, high=1),
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
        # written by `parnet-cpu slim`: the precisions kept for serving and the model files removed
        "serving_only": Spec("object", optional=True, fields={
            "precisions": Spec("list", items=Spec("str", choices=tuple(IR_FILES)), unique=True),
            "removed": Spec("list", items=Spec("str", choices=MODEL_FILES), unique=True)}),
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
    cfg = manifest.get("config")
    if not problems and isinstance(cfg, dict) and ("crop_pct" in cfg) == (LEGACY_CROP_KEY in cfg):
        problems.append(f"config.crop_pct and its older name config.{LEGACY_CROP_KEY} are both given: exactly one"
                        if "crop_pct" in cfg else f"config.crop_pct is missing (a folder from before the rename "
                        f"says config.{LEGACY_CROP_KEY}): exactly one of them is needed")
    slim, files = manifest.get("serving_only"), manifest.get("files")
    if not problems and slim is not None and isinstance(files, dict):  # the field agrees with the files recorded
        problems += [f"serving_only.removed lists {n}, which files records" for n in slim["removed"] if n in files]
        problems += [f"serving_only.precisions lists {p}, but files does not record {n}"
                     for p in slim["precisions"] for n in ir_pair(p) if n not in files]
    return problems


def ir_pair(precision: str) -> tuple[str, str]:
    """The two files of a precision's IR (.xml, .bin)."""
    xml = IR_FILES[precision]
    return xml, xml[:-4] + ".bin"


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

    def file_problems(self, names: list[str]) -> list[str]:
        """Each named file against its recorded size and sha256 (size first: a truncated file costs no hash)."""
        files, problems = self.manifest.get("files") or {}, []
        for name in names:
            path, rec = self.path / name, files.get(name)
            if rec is None:
                if path.is_file() and name in (self.manifest.get("serving_only") or {}).get("removed", ()):
                    problems.append(f"{name} is left over from an interrupted `parnet-cpu slim` (the manifest says "
                                    "slim removed it): run `parnet-cpu slim` on the folder again")
                elif path.is_file():
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
        """The manifest's model config, in today's names (an older folder's crop_fraction read as crop_pct)."""
        c = self.manifest["config"]
        return c if LEGACY_CROP_KEY not in c else {("crop_pct" if k == LEGACY_CROP_KEY else k): v for k, v in c.items()}

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
            slim = self.manifest.get("serving_only")
            why = f" (a serving-only folder: `parnet-cpu slim` removed {p.name})" if slim and p.name in slim["removed"] else ""
            raise ModelDirError(f"{self.path}: no {precision} model ({p.name}){why}; present: "
                                f"{', '.join(self.precisions) or 'none'}")
        self.verify(precision)  # every loader (Runtime, serve, eval, bench) comes through here
        return p

    def preprocess_config(self, **overrides):
        """The evaluation preprocessing the model was built for (its config), with optional overrides."""
        from parnet_cpu.data import PreprocessConfig

        c = self.config
        params = dict(input_size=c["input_size"], crop_pct=c["crop_pct"], interpolation=c["interpolation"],
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


def slim_model_dir(folder: str | Path, precisions: list[str] | None = None) -> dict:
    """Make `folder` serving-only: keep the IR of `precisions` (default: the one a loader picks), the manifest,
    report.json and the runtime's caches; remove every other model file this tool recorded (the FP32 IR when
    INT8 is kept, model_deploy.pt, model.onnx, the torch INT8 program). The kept files are checked against
    their recorded digests first, and their records are kept, not re-hashed, so slimming never blesses a
    changed file. The manifest is rewritten (sealed) before anything is removed: if the removal is
    interrupted, running slim again removes the rest. Files the manifest never recorded are not touched.
    Returns {"kept", "removed", "bytes_freed"}."""
    folder = Path(folder)
    with output_lock(folder):  # not while an export or quantize writes this folder
        md = ModelDir.open(folder)
        keep = list(dict.fromkeys(precisions or [md.default_precision]))
        absent = [p for p in keep if p not in md.precisions]
        if absent:
            raise ModelDirError(f"{folder}: no {', '.join(absent)} model to keep; present: "
                                f"{', '.join(md.precisions) or 'none'}")
        for p in keep:
            problems = md.check(p)
            if problems:
                raise ModelDirError(f"{folder}: the {p} model does not match {MANIFEST}, refusing to slim it:\n"
                                    + "\n".join(f"  - {x}" for x in problems))
        kept = [n for p in keep for n in ir_pair(p)]
        recorded = md.manifest["files"]
        before = (md.manifest.get("serving_only") or {}).get("removed", [])
        removed = sorted(set(before) | {n for n in recorded if n not in kept})
        # only files as this tool wrote them are deleted: one changed since it was recorded may be someone's work
        # (a file under a name an earlier slim removed is deleted unchecked: it finishes an interrupted slim)
        changed = [n for n in removed if n in recorded and (folder / n).is_file()
                   and sha256_file(folder / n) != recorded[n]["sha256"]]
        if changed:
            raise ModelDirError(f"{folder}: {', '.join(changed)} changed since this tool recorded it (sha256 differs); "
                                "slim deletes only files as export/quantize wrote them: move it out of the folder "
                                "first (nothing was removed)")
        manifest = {**md.manifest, "files": {n: recorded[n] for n in kept},
                    "serving_only": {"precisions": sorted(keep), "removed": removed}}
        manifest.pop("manifest_sha256")
        manifest["manifest_sha256"] = manifest_digest(manifest)
        problems = manifest_problems(manifest)
        if problems:  # e.g. a kept file the old manifest did not record
            raise ModelDirError(f"{folder}: cannot slim it:\n" + "\n".join(f"  - {x}" for x in problems))
        write_json(folder / MANIFEST, manifest)
        freed = 0
        for name in removed:
            path = folder / name
            if path.is_file() and not path.is_symlink():
                freed += path.stat().st_size
                path.unlink()
        return {"kept": kept, "removed": removed, "bytes_freed": freed}


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
