"""The project as a user types it: builder defaults, --version, closed pipes, impossible requests refused early."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from parnet_cpu.models.parnet import AUTHORS_CHECKPOINTS, create_model, shipped_weights


def test_create_model_is_random_unless_asked_and_pretrained_never_silently_random():
    torch.manual_seed(0)
    a = create_model("parnet_fmnist")  # as in timm: pretrained=False by default
    shipped = create_model("parnet_fmnist", pretrained=True)
    ref = torch.load(shipped_weights("parnet_fmnist"), weights_only=True)
    ref = ref.get("state_dict", ref)
    key = next(k for k in shipped.state_dict() if k.endswith("weight"))
    assert torch.equal(shipped.state_dict()[key], ref[key])
    assert not torch.equal(a.state_dict()[key], ref[key])
    for name, fname in AUTHORS_CHECKPOINTS.items():
        with pytest.raises(ValueError, match=fname.replace(".", r"\.")):
            create_model(name, pretrained=True)
    for override in (dict(num_classes=3), dict(activation="relu")):
        with pytest.raises(ValueError, match="fix the architecture"):
            create_model("parnet_fmnist", pretrained=True, **override)


def test_version_flag():
    from parnet_cpu import __version__

    out = subprocess.run([sys.executable, "-m", "parnet_cpu", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"parnet-cpu {__version__}"


def test_closed_pipe_is_not_a_traceback():
    # `parnet-cpu info --json | head -1`: the reader goes away early
    proc = subprocess.Popen(f"{sys.executable} -m parnet_cpu info --json | true",
                            shell=True, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err, err


@pytest.fixture(scope="module")
def workdir_with_model(narrow_copy, tmp_path_factory):
    """An otherwise empty working directory holding one model folder written by this tool."""
    cwd = tmp_path_factory.mktemp("usage")
    narrow_copy(cwd / "parnet_s-int8")
    return cwd


def _cli(args, cwd, timeout=120):
    return subprocess.run([sys.executable, "-m", "parnet_cpu", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": os.getcwd()})


def test_bench_cores_per_stream_8_is_refused_before_any_work(workdir_with_model):
    import time

    usable = len(os.sched_getaffinity(0))
    cps = 8 if usable < 24 else usable  # the usage line's request, or one that is impossible here too
    t0 = time.monotonic()
    out = _cli(["bench", "--cores-per-stream", str(cps)], workdir_with_model)
    assert out.returncode == 2, out.stderr
    assert time.monotonic() - t0 < 60
    assert f"--cores-per-stream {cps}" in out.stderr and "usable physical cores" in out.stderr
    assert "using parnet_s-int8" in out.stdout  # found the model folder by itself
    assert "ov-latency" not in out.stdout  # no engine ran


def test_bench_without_model_folder_says_what_to_run(tmp_path):
    out = _cli(["bench"], tmp_path)
    assert out.returncode == 2 and "parnet-cpu quantize" in out.stderr, out.stderr


@pytest.mark.slow
def test_bench_exits_nonzero_when_every_engine_failed(workdir_with_model):
    # no torch INT8 program in the folder: the only requested engine fails
    out = _cli(["bench", "--engines", "torch-int8", "--batches", "1", "--iters", "1", "--warmup", "0",
                "--min-seconds", "0"], workdir_with_model)
    assert out.returncode == 1 and "every engine failed" in out.stderr, (out.stdout, out.stderr)


@pytest.mark.slow
def test_python_api_quantize_then_runtime_on_a_folder_of_images(tmp_path):
    import json

    import numpy as np

    import parnet_cpu
    from conftest import NARROW, randomize_bn

    assert {"create_model", "export", "quantize", "load_images", "Runtime", "reparameterize"} <= set(dir(parnet_cpu))
    torch.manual_seed(0)
    model = create_model("parnet_s", **NARROW)
    randomize_bn(model)
    from parnet_cpu.data import bundled_calibration_dir

    calib = bundled_calibration_dir()
    with pytest.raises(TypeError, match="subset_size"):
        parnet_cpu.quantize(model, calib, tmp_path / "bad", subset_sise=10)
    report = parnet_cpu.quantize(model, calib, tmp_path / "int8", subset_size=16, eval_limit=8)
    written = json.loads((tmp_path / "int8" / "report.json").read_text())
    assert set(report) == set(written) and report["calibration"]["images"] == written["calibration"]["images"] == 16
    assert (tmp_path / "int8" / "model_int8.xml").is_file()

    images, paths = parnet_cpu.load_images(calib, tmp_path / "int8")
    assert images.shape == (len(paths), 3, 64, 64) and len(paths) == 24 and paths == sorted(paths)
    single, _ = parnet_cpu.load_images(paths[3], tmp_path / "int8")
    np.testing.assert_array_equal(single[0], images[3])
    with parnet_cpu.Runtime(tmp_path / "int8", plan="single", max_batch=8) as rt:
        logits = np.concatenate([rt.infer(images[i:i + 8]) for i in range(0, len(images), 8)])
        # one image from a path == the same image from the folder (batch 1 and batch 8 compile to
        # different kernels, so the folder batch agrees in its prediction, not to the last bit)
        np.testing.assert_array_equal(rt.infer(single), rt.infer(images[3:4]))
        assert rt.infer(single).argmax() == logits[3].argmax()
    assert logits.shape == (24, 1000) and np.isfinite(logits).all()
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        parnet_cpu.load_images([tmp_path / "nope.jpg"], tmp_path / "int8")


@pytest.mark.slow
def test_the_usage_line_as_typed_in_an_empty_folder(tmp_path):
    """`parnet-cpu quantize --calib imagenet_val` then `parnet-cpu bench --cores-per-stream 8`, nothing else."""
    import json
    import shutil
    import time

    from parnet_cpu.data import bundled_calibration_dir

    shutil.copytree(bundled_calibration_dir(), tmp_path / "imagenet_val")
    out = _cli(["quantize", "--calib", "imagenet_val"], tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "parnet_s-int8" in out.stdout and "RANDOM weights" in out.stderr
    assert "INFO:nncf" not in out.stdout + out.stderr  # a short progress view, not one line per layer
    report = json.loads((tmp_path / "parnet_s-int8" / "report.json").read_text())
    assert report["model"] == "parnet_s" and report["random_weights"]
    assert any("random weights" in w and "--checkpoint" in w for w in report["warnings"])
    assert report["report"] == "quantize" and report["schema"] == 1 and report["created"].endswith("+00:00")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imagenet_val", "parnet_s-int8"]  # nothing else left

    usable = len(os.sched_getaffinity(0))
    if usable >= 24:
        return  # the usage line's bench is possible here and would run in full: the refusal is not the answer
    t0 = time.monotonic()
    out = _cli(["bench", "--cores-per-stream", "8"], tmp_path)
    assert out.returncode == 2 and time.monotonic() - t0 < 60, out.stderr
    assert "using parnet_s-int8" in out.stdout and "--cores-per-stream 8" in out.stderr


def test_a_missing_calibration_folder_is_said_first(tmp_path):
    (tmp_path / "parnet_s-int8").mkdir()  # an existing default output must not hide the real problem
    (tmp_path / "parnet_s-int8" / "x").write_text("x")
    out = _cli(["quantize", "--calib", "imagenet_val"], tmp_path)
    assert out.returncode == 2 and "--calib imagenet_val: folder not found" in out.stderr, out.stderr
    assert (tmp_path / "parnet_s-int8" / "x").read_text() == "x"


def _commands_with(option: str):
    """Every sub-command of the real `parnet-cpu` parser that declares `option`, with its parser."""
    import argparse

    from parnet_cpu.cli import build_parser

    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if any(option in a.option_strings for a in sub._actions):
                    yield name, sub


def test_model_means_a_variant_everywhere_and_folder_commands_name_model_dir(tmp_path, capsys):
    """One meaning per flag name: --model NAME is a variant; on every command that reads a model folder
    (found by walking the parser, not listed) --model / --model=DIR / a bare --model is a usage error (exit
    2) naming --model-dir, never taken as an abbreviation of it."""
    folder_commands = dict(_commands_with("--model-dir"))
    assert {"eval", "bench", "serve", "plan", "profile", "predict"} <= set(folder_commands)
    for name, sub in folder_commands.items():
        for argv in (["--model", str(tmp_path)], [f"--model={tmp_path}"], ["--model"]):
            with pytest.raises(SystemExit) as exc:
                sub.parse_args(argv)
            assert exc.value.code == 2, (name, argv)
            err = capsys.readouterr().err
            assert "--model-dir" in err and "variant" in err, (name, argv, err)
    variant_commands = {n for n, s in _commands_with("--model") if n not in folder_commands}
    assert {"export", "quantize", "train"} <= variant_commands
    for name, sub in _commands_with("--model"):
        if name in variant_commands:  # a plain option storing the variant name
            flag = next(a for a in sub._actions if "--model" in a.option_strings)
            assert flag.dest == "model" and flag.default and "variant" in flag.help, name
