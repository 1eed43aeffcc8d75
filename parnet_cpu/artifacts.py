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

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

MANIFEST = "parnet.json"
FORMAT = "parnet-cpu/1"
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
        if manifest.get("format") != FORMAT:
            raise ModelDirError(f"{mf}: unknown format {manifest.get('format')!r}, expected {FORMAT!r}")
        return cls(path, manifest)

    @property
    def config(self) -> dict:
        return self.manifest["config"]

    @property
    def precisions(self) -> list[str]:
        return [p for p, f in IR_FILES.items() if (self.path / f).is_file()]

    def ir_path(self, precision: str | None = None) -> Path:
        """IR of the given precision; default: the most optimized one present (int8 > bf16 > fp32)."""
        if precision is None:
            for candidate in ("int8", "bf16", "fp32"):
                if (self.path / IR_FILES[candidate]).is_file():
                    return self.path / IR_FILES[candidate]
            raise ModelDirError(f"{self.path}: no OpenVINO IR found")
        if precision not in IR_FILES:
            raise ModelDirError(f"unknown precision {precision!r}; choose from {', '.join(IR_FILES)}")
        p = self.path / IR_FILES[precision]
        if not p.is_file():
            raise ModelDirError(f"{self.path}: no {precision} model ({p.name}); present: {', '.join(self.precisions) or 'none'}")
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


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


@contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `out`; on success it replaces `out`, on failure it is removed,
    so a failed run never leaves a half-written model folder behind."""
    out = Path(out)
    if out.exists() and not overwrite and any(out.iterdir()):
        raise ModelDirError(f"output folder {out} exists and is not empty (use --overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old.{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
