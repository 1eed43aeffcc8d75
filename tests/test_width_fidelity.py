"""Issue 16 pieces on tiny configurations: the trainer's bf16 autocast option, the training step of
benchmarks/width_fidelity.py (a real `parnet-cpu train` subprocess), and the quantization study shared with
benchmarks/quant_quality.py (real OpenVINO + NNCF on a tiny ParNet and real Fashion-MNIST images)."""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from test_training import _require_fmnist, _small_training_set, _tiny_cfg, _train_cfg  # noqa: E402

pytestmark = pytest.mark.slow  # trains and quantizes


@pytest.fixture(scope="module")
def small_set():
    return _small_training_set()


# ------------------------------------------------------------------------------------ bf16 autocast


def _conv_dtypes(model) -> list:
    """Output dtypes of the first conv during training (records every call)."""
    import torch

    seen: list = []
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype) if _m.training else None)
    return seen


@pytest.mark.parametrize("bf16", [False, True])
def test_bf16_autocast_is_off_by_default_and_runs_the_convs_in_bf16_when_asked(tmp_path, small_set, bf16):
    import torch

    from parnet_cpu.models.checkpoint import read_checkpoint
    from parnet_cpu.models.parnet import build_model
    from parnet_cpu.training.trainer import TrainConfig, train

    assert TrainConfig().bf16 is False
    images, labels, k = small_set
    torch.manual_seed(0)
    model = build_model(_tiny_cfg(k))
    seen = _conv_dtypes(model)
    history = train(model, (images[:96], labels[:96]), None, _train_cfg(tmp_path, epochs=1, bf16=bf16), log=None)
    assert set(seen) == {torch.bfloat16 if bf16 else torch.float32}
    assert np.isfinite(history[0]["train_loss"])
    # weights, EMA and checkpoint stay fp32 either way; the setting is recorded for --resume
    obj = read_checkpoint(tmp_path / "run.pt")
    assert all(v.dtype == torch.float32 for v in obj["state_dict"].values() if v.dtype.is_floating_point)
    assert obj["train_state"]["train_config"]["bf16"] is bf16


def test_resume_refuses_a_precision_change_and_accepts_checkpoints_from_before_the_option(tmp_path, small_set):
    import torch

    from parnet_cpu.models.parnet import build_model
    from parnet_cpu.training.trainer import TrainingError, train

    images, labels, k = small_set
    data = (images[:64], labels[:64])
    train(build_model(_tiny_cfg(k)), data, None, _train_cfg(tmp_path, epochs=1), log=None)
    ckpt = tmp_path / "run.pt"
    with pytest.raises(TrainingError, match="bf16"):
        train(build_model(_tiny_cfg(k)), data, None, _train_cfg(tmp_path, epochs=1, bf16=True, resume=True), log=None)
    # a checkpoint written before the option existed has no "bf16" entry: it was an fp32 run
    obj = torch.load(ckpt, weights_only=True)
    del obj["train_state"]["train_config"]["bf16"]
    torch.save(obj, ckpt)
    messages: list[str] = []
    train(build_model(_tiny_cfg(k)), data, None, _train_cfg(tmp_path, epochs=1, resume=True), log=messages.append)
    assert any("nothing to do" in m for m in messages)
    with pytest.raises(TrainingError, match="bf16"):
        train(build_model(_tiny_cfg(k)), data, None, _train_cfg(tmp_path, epochs=1, bf16=True, resume=True), log=None)


# ------------------------------------------------------------------------ width_fidelity: training


def test_training_step_runs_the_real_cli_records_the_command_and_reuses_the_result(tmp_path, small_set):
    """`ensure_trained` runs `parnet-cpu train` (a real subprocess; a tiny model on a 32-image folder)."""
    from PIL import Image

    import width_fidelity as wf
    from parnet_cpu.outputs import sha256_file

    images, labels, _ = small_set
    data = tmp_path / "data"
    for i in range(32):
        (data / f"c{int(labels[i])}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i, 0]).save(data / f"c{int(labels[i])}" / f"{i:03d}.png")
    spec = wf.ModelSpec("tiny", train_args=("--data", str(data), "--model", "parnet_fmnist", "--planes", "8,16,16,32",
                                            "--blocks", "2,2,2,1", "--epochs", "1", "--batch-size", "16", "--bf16",
                                            "--seed", "3"))
    work = tmp_path / "work"
    cmd = wf.train_command(spec, work, threads=1, extra=["--max-steps", "2"])
    assert cmd[:2] == ["parnet-cpu", "train"] and "--resume" not in cmd and cmd[-2:] == ["--threads", "1"]
    assert wf.train_command(spec, work, resume=True)[-1] == "--resume"
    ckpt, report = wf.ensure_trained(spec, work, 1, ["--max-steps", "2"])
    assert ckpt == work / "tiny.pt" and ckpt.is_file()
    assert report["seed"] == 3 and report["train_config"]["bf16"] is True
    assert report["command"].startswith("parnet-cpu train --data") and "--bf16" in report["command"]
    summary = wf.training_summary(report, ckpt)
    assert summary["checkpoint_sha256"] == sha256_file(ckpt) and len(summary["history"]) == 1
    assert "partial" not in summary
    # a run in progress has no report yet: its per-epoch training checkpoint speaks for itself
    partial = wf.training_summary({}, work / "tiny_train.pt")
    assert partial["partial"] is True and partial["epochs_done"] == 1 and partial["train_config"]["seed"] == 3
    assert partial["history"] == report["history"]
    # done already: reused, not retrained (the file is untouched)
    mtime = ckpt.stat().st_mtime_ns
    assert wf.ensure_trained(spec, work, 1, ["--max-steps", "2"])[0] == ckpt and ckpt.stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="shipped"):
        wf.train_command(wf.MODELS["parnet_fmnist"], work)


# --------------------------------------------------------------------------- the quantization study


def test_settings_grid_varies_one_factor_at_a_time_including_stem_and_float_leftovers():
    from quant_quality import combination_settings, settings_grid

    from parnet_cpu.quantization.ptq import QuantizeOptions
    from parnet_cpu.runtime.engine import float_leftovers

    default = QuantizeOptions(progress=False)
    grid = settings_grid(default, extended=False)
    names = [s.name for s in grid]
    assert len(names) == len(set(names)) and names[0] == "default"
    assert not any("smooth" in n or "transformer" in n for n in names)
    by_name = {s.name: s for s in grid}
    assert by_name["ignore=se"].opts.ignored_scope == ("se",)  # the stem quantized, SE gates in float
    assert all(s.opts == default for s in grid if s.varies == "leftovers")
    other = {"f32": "bf16", "bf16": "f32"}[float_leftovers("int8")]
    assert by_name[f"leftovers={other}"].describe()["float_leftovers"] == other
    assert all(s.opts != default or s.varies == "leftovers" for s in grid[1:])
    # combinations carry the leftovers choice too
    rows = [{"logit_sqnr_db": 20.0 + (1.0 if s.name in ("ignore=se", f"leftovers={other}") else 0.0)} for s in grid]
    (combo,) = combination_settings(rows, grid, default)
    assert combo.opts.ignored_scope == ("se",) and combo.leftovers == other
    # width_fidelity --rows: a subset, default first, unknown names refused
    import width_fidelity as wf

    assert [s.name for s in wf.select_rows(grid, "ignore=se")] == ["default", "ignore=se"]
    with pytest.raises(SystemExit, match="unknown"):
        wf.select_rows(grid, "ignore=everything")


def test_best_row_and_settings_across_models():
    import width_fidelity as wf

    rows = [{"name": "default", "prediction_flips": 5, "logit_sqnr_db": 20.0},
            {"name": "a", "prediction_flips": 3, "logit_sqnr_db": 19.0},
            {"name": "b", "prediction_flips": 3, "logit_sqnr_db": 21.0}]
    assert wf.best_row(rows)["name"] == "b"

    def entry(model, agree):
        return {"model": model, "test_images": 100, "study": {"grid": [
            {"name": n, "prediction_flips": 0, "top1_agreement": a, "logit_sqnr_db": 20.0, "top1_drop": 0.0}
            for n, a in agree.items()]}}

    ranked = wf.compare_settings([entry("narrow", {"default": 99.5, "x": 99.9, "only_here": 100.0}),
                                  entry("wide", {"default": 99.4, "x": 98.0})])
    assert [r["setting"] for r in ranked] == ["default", "x"]  # x is worse on the wide model
    assert ranked[0]["worst_agreement"] == 99.4


def test_quantization_study_and_entry_on_a_tiny_model(tmp_path):
    """The whole study (weight ranges, grid, per-block SQNR) on a tiny trained-form ParNet and 48 real test images."""
    import torch
    import width_fidelity as wf
    from quant_quality import Setting, fmnist_samples, quantization_study

    from parnet_cpu.models.parnet import build_model
    from parnet_cpu.quantization.ptq import QuantizeOptions

    _require_fmnist()
    torch.manual_seed(0)
    model = build_model(replace(_tiny_cfg(10), class_names=tuple(f"c{i}" for i in range(10)))).eval()
    calib, test = fmnist_samples(tmp_path / "data", 16, 48)
    default = QuantizeOptions(subset_size=16, progress=False)
    grid = [Setting("default", default), Setting("leftovers=f32", default, varies="leftovers", leftovers="f32")]
    study = quantization_study(model, {"path": "tiny"}, calib, test, 1, default, sqnr_images=8, latency=False,
                               grid=grid)
    assert study["test_images"] == 48 and study["params"]["deployed"] < study["params"]["training_form"]
    assert [r["name"] for r in study["grid"]] == ["default", "leftovers=f32"]
    assert study["grid"][1]["settings"]["float_leftovers"] == "f32"
    assert study["grid"][0]["int8_latency_ms_p50"] is None  # no timing in accuracy-only runs
    blocks = [r["block"] for r in study["per_block_sqnr"]["rows"]]
    assert blocks[-1] == "logits" and "combine.3" in blocks and len(study["weight_ranges"]["blocks"]) == len(blocks) - 1
    training = {"training_wall_seconds": 1.0}
    e = wf.model_entry("tiny", study, training, model.cfg.to_dict(), {"cpu": "x"}, default, None)
    for key in ("params", "fp32_top1", "int8_top1", "agreement", "logit_sqnr_db", "per_block_sqnr",
                "training_seconds", "machine", "chosen_defaults", "best_setting"):
        assert key in e, key
    assert e["int8_top1"] == study["grid"][0]["int8_top1"] and e["chosen_defaults"]["subset_size"] == 16
    json.dumps(e, default=str)  # JSON-ready
