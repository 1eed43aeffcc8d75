"""Issue 26 item 3: NNCF's unit for max_drop (a fraction, 0.01 = 1 top-1 point) in the Python API, the unit
in the flag's name on the command line (a bare `--max-drop N` is refused, naming both spellings), and both
units in report.json."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from parnet_cpu.cli import build_parser, main
from parnet_cpu.cli.quantize import max_drop_fraction

REPO = Path(__file__).resolve().parents[1]
PHOTOS = sorted((REPO / "calibration" / "sample").glob("*.jpg"))
NARROW_ARGS = ["--model", "parnet_s", "--planes", "16,32,64,128", "--input-size", "64"]


@pytest.mark.parametrize("value", ["1", "0.01", "0.5", "1pt", "nan"])
def test_a_bare_max_drop_is_refused_naming_both_units(value):
    """Through the installed entry point: exit 2, no traceback, both spellings named, before any work."""
    r = subprocess.run([sys.executable, "-m", "parnet_cpu", "quantize", "--calib", "nowhere", "--max-drop", value],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--max-drop-points" in r.stderr and "--max-drop-fraction" in r.stderr and "0.01 = 1 point" in r.stderr
    assert "--calib nowhere" not in r.stderr  # refused as usage, before the data is looked at


def test_both_spellings_mean_the_same_fraction_and_points_never_pass_as_a_fraction(capsys):
    parser = build_parser()
    base = ["quantize", "--calib", "c"]
    assert max_drop_fraction(parser.parse_args([*base, "--max-drop-points", "1"])) == 0.01
    assert max_drop_fraction(parser.parse_args([*base, "--max-drop-fraction", "0.01"])) == 0.01
    assert max_drop_fraction(parser.parse_args([*base, "--max-drop-points", "0.5"])) == 0.005
    assert max_drop_fraction(parser.parse_args(base)) is None
    for argv in (["--max-drop-fraction", "1"], ["--max-drop-fraction", "0.5"],  # points given as a fraction
                 ["--max-drop-points", "1", "--max-drop-fraction", "0.01"], ["--max-drop-points", "25"]):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args([*base, *argv])
        assert exit_.value.code == 2, argv
    assert "0.01 = 1 point" in capsys.readouterr().err


def test_the_python_api_takes_nncfs_fraction(tmp_path):
    """`parnet_cpu.quantize(max_drop=1.0)` meant 1 point before; as NNCF's fraction it would be 100 points, so it
    is refused with the unit, before anything is built."""
    import parnet_cpu

    for points_by_mistake in (1.0, 0.5, 2):
        with pytest.raises(ValueError, match=r"max_drop: expected .*0\.01 = 1 point"):
            parnet_cpu.quantize("parnet_s", tmp_path / "calib", tmp_path / "out", max_drop=points_by_mistake)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_report_records_both_units_through_the_cli(tmp_path):
    """A real accuracy-controlled quantize (NNCF, labelled class folders): report.json's options and the
    --json on stdout both say max_drop_fraction 0.01 and max_drop_points 1."""
    data = tmp_path / "data"
    for k, photo in enumerate(PHOTOS):
        folder = data / ("a" if k % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(photo, folder / photo.name)
    (tmp_path / "classes.txt").write_text("a\nb\n")
    out = tmp_path / "q"
    r = subprocess.run([sys.executable, "-m", "parnet_cpu", "quantize", *NARROW_ARGS, "--classes",
                        str(tmp_path / "classes.txt"), "--calib", str(data), "--out", str(out), "--subset-size", "8",
                        "--eval-limit", "8", "--max-drop-points", "1", "--quiet", "--json"],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    printed = json.loads(r.stdout)  # stdout is the report alone; the summary went to stderr
    written = json.loads((out / "report.json").read_text())
    for report in (printed, written):
        opts = report["options"]
        assert (opts["max_drop"], opts["max_drop_fraction"], opts["max_drop_points"]) == (0.01, 0.01, 1.0)
    assert "calibration:" in r.stderr


def test_main_refuses_a_bare_max_drop_in_process(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--calib", "c", "--max-drop", "2"])
    assert "--max-drop-points 2 (top-1 points) or --max-drop-fraction 0.02" in capsys.readouterr().err


def test_create_model_takes_timms_checkpoint_path(tmp_path):
    """`create_model(name, checkpoint_path=FILE)` as timm spells it loads the weights (the old `checkpoint=`
    is the same argument); two different files for the one argument are refused, not one silently used."""
    import torch

    from conftest import NARROW
    from parnet_cpu import create_model
    from parnet_cpu.models.checkpoint import save_checkpoint

    torch.manual_seed(3)
    saved = create_model("parnet_s", **NARROW)
    path = tmp_path / "w.pt"
    save_checkpoint(saved, path)
    loaded = create_model("parnet_s", checkpoint_path=str(path), **NARROW)
    for (name, a), b in zip(saved.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(next(create_model("parnet_s", **NARROW).parameters()), next(saved.parameters()))
    with pytest.raises(ValueError, match="name one argument"):
        create_model("parnet_s", checkpoint=str(path), checkpoint_path=str(tmp_path / "other.pt"), **NARROW)


def test_crop_pct_is_the_one_name_and_older_folders_still_open(narrow_copy, tmp_path, capsys):
    """The manifest, the config dataclasses and the CLI say crop_pct (timm's name); a folder or checkpoint
    config written with the older crop_fraction opens with the same preprocessing, and one naming both is
    refused rather than guessed."""
    from parnet_cpu.artifacts import ModelDir, ModelDirError, manifest_digest
    from parnet_cpu.models.parnet import ParNetConfig

    new = narrow_copy(tmp_path / "new")
    m = json.loads((new / "parnet.json").read_text())
    assert "crop_pct" in m["config"] and "crop_fraction" not in m["config"]
    want = ModelDir.open(new).preprocess_config()

    def with_config(name: str, edit) -> Path:
        folder = narrow_copy(tmp_path / name)
        m = json.loads((folder / "parnet.json").read_text())
        edit(m["config"])
        m.pop("manifest_sha256")
        m["manifest_sha256"] = manifest_digest(m)  # sealed as that version of the tool wrote it
        (folder / "parnet.json").write_text(json.dumps(m, indent=2))
        return folder

    old = with_config("old", lambda c: c.__setitem__("crop_fraction", c.pop("crop_pct")))
    md = ModelDir.open(old)
    assert md.preprocess_config() == want and md.config["crop_pct"] == m["config"]["crop_pct"]
    assert "crop_fraction" in json.loads((old / "parnet.json").read_text())["config"]  # read, never rewritten
    assert main(["verify", str(old)]) == 0
    both = with_config("both", lambda c: c.__setitem__("crop_fraction", 0.9))
    with pytest.raises(ModelDirError, match="exactly one"):
        ModelDir.open(both)
    neither = with_config("neither", lambda c: c.pop("crop_pct"))
    with pytest.raises(ModelDirError, match="exactly one"):
        ModelDir.open(neither)
    # checkpoint configs (the shipped parnet_fmnist.json predates the rename)
    cfg = ParNetConfig().to_dict()
    cfg["crop_fraction"] = cfg.pop("crop_pct")
    assert ParNetConfig.from_dict(cfg) == ParNetConfig()
    with pytest.raises(ValueError, match="give one"):
        ParNetConfig.from_dict({**ParNetConfig().to_dict(), "crop_fraction": 0.5})
