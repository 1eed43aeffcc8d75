"""Hostile pass on issue 21, outputs: every single-file output of every command goes through one function
(`outputs.check_output_file` / `output_file`, called by `cli.common.output_arg`), which refuses a path that
is, lies inside, or is (a hard link of) an input or another output of the command, and replaces an existing
file only when it is a report of the same kind this tool wrote, or with --overwrite; `--overwrite` of a model
folder deletes only what its digest-checked manifest lists; the output lock opens no link and no FIFO.

Real files, real FIFOs, hard links and symlinks, real `parnet-cpu` runs (in-process `main`, and one child
process under RLIMIT_FSIZE for a real EFBIG).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from parnet_cpu.artifacts import ModelDirError, foreign_model_dir_problem, read_manifest
from parnet_cpu.outputs import OutputPathError, check_output_dir, check_output_file, output_lock, report_stamp
from parnet_cpu.cli import build_parser, main
from parnet_cpu.cli.common import INPUT_FLAGS, OUTPUT_FLAGS

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO / "calibration" / "sample"


@pytest.fixture(scope="module")
def model(narrow_copy, tmp_path_factory) -> Path:
    return narrow_copy(tmp_path_factory.mktemp("out") / "M")


@pytest.fixture()
def data(tmp_path) -> Path:
    """Three photos under ImageNet validation names (labelled by the shipped table)."""
    d = tmp_path / "data"
    d.mkdir()
    for i in range(1, 4):
        shutil.copy(PHOTOS / "astronaut.jpg", d / f"ILSVRC2012_val_{i:08d}.JPEG")
    return d


def snapshot(*folders: Path) -> dict:
    return {p: p.read_bytes() for f in folders for p in sorted(Path(f).rglob("*")) if p.is_file()}


def refused(argv: list[str], capsys, *words: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for w in words:
        assert w in err, err
    return err


# --------------------------------------------------------------- inputs are never outputs (any flag, any name)

def test_eval_json_never_replaces_an_input(model, data, tmp_path, capsys):
    before = snapshot(model, data)
    image = next(data.iterdir())
    link = tmp_path / "innocent.json"
    os.link(image, link)  # the same file under another name
    sym = tmp_path / "sym.json"
    sym.symlink_to(model / "model_fp32.bin")
    run = ["eval", "--model-dir", str(model), "--data", str(data), "--quiet", "--json"]
    for target in (model / "parnet.json", image, sym, model / "new.json", data / "new.json"):
        refused([*run, str(target)], capsys, "--json", "an input of this command")
    refused([*run, str(link)], capsys, "exists", "--overwrite")
    assert snapshot(model, data) == before
    # with --overwrite the hard link's name is replaced (atomically, a new inode): the image keeps its bytes
    assert main([*run, str(link), "--overwrite"]) == 0
    assert json.loads(link.read_text())["report"] == "eval"
    assert snapshot(model, data) == before
    assert main(["verify", str(model)]) == 0


def test_every_report_flag_refuses_inputs_before_work(model, data, tmp_path, capsys):
    """plan, profile, bench (--json, --plot) and train (--out, --report, --export): refused at once."""
    image = next(data.iterdir())
    before = snapshot(model, data)
    m = str(model)
    refused(["plan", "--model-dir", m, "--cpus", "8", "--no-latency", "--json", str(model / "model_fp32.xml")],
            capsys, "--model-dir")
    refused(["profile", "--model-dir", m, "--json", str(model / "model_fp32.bin")], capsys, "--model-dir")
    refused(["bench", "--model-dir", m, "--json", str(model / "parnet.json")], capsys, "--model-dir")
    refused(["bench", "--model-dir", m, "--plot", str(image)], capsys, "--plot", "exists")  # not an input here
    refused(["bench", "--model-dir", m, "--calib", str(data), "--plot", str(image)], capsys, "--calib")
    train = ["train", "--data", str(data), "--model", "parnet_s", "--planes", "8,16,32,64", "--input-size", "32",
             "--num-classes", "2", "--epochs", "1", "--quiet"]
    refused([*train, "--out", str(tmp_path / "c.pt"), "--report", str(image)], capsys, "--report", "--data")
    refused([*train, "--out", str(tmp_path / "c.pt"), "--report", str(tmp_path / "c.pt")], capsys, "--out")
    refused([*train, "--out", str(tmp_path / "c.pt"), "--export", str(tmp_path / "c.pt")], capsys, "--out")
    refused([*train, "--out", str(data / "ckpt.pt")], capsys, "--out", "--data")
    classes = tmp_path / "classes.txt"
    classes.write_text("a\nb\n")
    refused([*train, "--classes", str(classes), "--out", str(classes)], capsys, "--classes")
    assert snapshot(model, data) == before and classes.read_text() == "a\nb\n"


def test_train_out_never_silently_replaces_a_file(data, tmp_path, capsys):
    thesis = tmp_path / "thesis.txt"
    thesis.write_text("my thesis")
    train = ["train", "--data", str(data), "--model", "parnet_s", "--planes", "8,16,32,64", "--input-size", "32",
             "--num-classes", "2", "--epochs", "1", "--quiet", "--out", str(thesis)]
    refused(train, capsys, "exists", "--overwrite")
    assert thesis.read_text() == "my thesis"
    refused([*train, "--resume", "--overwrite"], capsys, "pass one")


def test_reports_replace_their_own_kind_only(model, tmp_path, capsys):
    """A report of the same kind is replaced (rerunning a command); a user's file or another kind's report is
    not, unless --overwrite. Checked through the one function with every kind the commands use."""
    m = str(model)
    out = tmp_path / "plan.json"
    assert main(["plan", "--model-dir", m, "--cpus", "8", "--no-latency", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["report"] == "plan"
    assert main(["plan", "--model-dir", m, "--cpus", "4", "--no-latency", "--json", str(out)]) == 0  # replaced
    assert json.loads(out.read_text())["report"] == "plan"
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    refused(["plan", "--model-dir", m, "--cpus", "8", "--no-latency", "--json", str(notes)], capsys, "exists")
    assert notes.read_text() == '{"mine": 1}'
    for kind in ("eval", "bench", "profile", "train"):
        with pytest.raises(OutputPathError, match="plan report"):
            check_output_file(out, "--json", report=kind)
    assert check_output_file(out, "--json", report="plan") == out.resolve()
    assert check_output_file(notes, "--json", overwrite=True, report="plan") == notes.resolve()
    (tmp_path / "stamped.json").write_text(json.dumps(report_stamp("eval")))
    assert check_output_file(tmp_path / "stamped.json", "--json", report="eval")
    assert main(["plan", "--model-dir", m, "--cpus", "8", "--no-latency", "--json", str(notes), "--overwrite"]) == 0


@pytest.mark.slow
def test_plan_json_on_a_place_that_refuses_names_it_and_leaves_nothing(model, tmp_path):
    """/dev/full (ENOSPC, written directly) and a real file-size limit (EFBIG on the atomic temporary): exit 74,
    the path named, no 0-byte or partial file."""
    out = tmp_path / "plan.json"
    run = [sys.executable, "-c", "import sys; from parnet_cpu.cli import main; sys.exit(main())", "plan", "--model-dir", str(model), "--cpus", "8", "--no-latency"]
    r = subprocess.run([*run, "--json", "/dev/full"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 74 and "cannot write /dev/full" in r.stderr and "ENOSPC" in r.stderr, r.stderr

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))  # the probe (1 byte) fits, the plan (1.5 KB) not

    r = subprocess.run([*run, "--json", str(out)], capture_output=True, text=True, timeout=120, preexec_fn=small_files)
    assert r.returncode == 74 and f"cannot write {out}" in r.stderr and "EFBIG" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------- --overwrite of a model folder

def test_overwrite_never_deletes_what_the_manifest_does_not_list(model, tmp_path, capsys):
    q = tmp_path / "q"
    shutil.copytree(model, q)
    (q / "plan_cache.json").write_text("{}")
    (q / "compile_cache").mkdir()
    # only tool artifacts: ours to replace
    assert check_output_dir(q, overwrite=True, foreign=foreign_model_dir_problem) == q.resolve()
    mine = q / "my_classes.txt"
    mine.write_text("\n".join(f"c{i}" for i in range(1000)) + "\n")
    refused(["export", "--model", "parnet_s", "--planes", "16,32,64,128", "--classes", str(mine), "--out", str(q),
             "--overwrite"], capsys, "--classes")
    other = tmp_path / "classes.txt"
    shutil.copy(mine, other)
    refused(["export", "--model", "parnet_s", "--classes", str(other), "--out", str(q), "--overwrite"], capsys,
            "my_classes.txt", "does not list")
    assert mine.is_file()
    mine.unlink()
    (q / "notes").mkdir()  # a folder of the user's, not only files
    with pytest.raises(OutputPathError, match="notes"):
        check_output_dir(q, overwrite=True, foreign=foreign_model_dir_problem)
    (q / "notes").rmdir()
    m = json.loads((q / "parnet.json").read_text())
    m["created"] = "edited"
    (q / "parnet.json").write_text(json.dumps(m))  # an edited manifest: its digest no longer vouches for it
    with pytest.raises(OutputPathError, match="digest"):
        check_output_dir(q, overwrite=True, foreign=foreign_model_dir_problem)


def test_overwrite_trusts_tool_artifacts_by_content_not_by_name(model, tmp_path):
    """Second hostile pass: a user's own report.json (or files put in compile_cache/) were deleted by
    --overwrite because the names alone were trusted. Each artifact must show it is this tool's."""
    from parnet_cpu.outputs import report_stamp

    q = tmp_path / "q"
    shutil.copytree(model, q)
    (q / "report.json").write_text(json.dumps({**report_stamp("quantize"), "top1": 1.0}))
    (q / "plan_cache.json").write_text(json.dumps({"key": {"choice": "single"}}))
    (q / "compile_cache").mkdir()
    (q / "compile_cache" / "model-key").mkdir()
    assert check_output_dir(q, overwrite=True, foreign=foreign_model_dir_problem) == q.resolve()  # ours, by content
    for name, content in {"report.json": '{"my": "notes"}', "plan_cache.json": "my plans",
                          "compile_cache/thesis.pdf": "%PDF"}.items():
        saved = (q / name).read_bytes() if (q / name).is_file() else None
        (q / name).write_text(content)
        with pytest.raises(OutputPathError, match=name.split("/")[0]):
            check_output_dir(q, overwrite=True, foreign=foreign_model_dir_problem)
        assert (q / name).read_text() == content
        if saved is None:
            (q / name).unlink()
        else:
            (q / name).write_bytes(saved)
    assert check_output_dir(q, overwrite=True, foreign=foreign_model_dir_problem) == q.resolve()

def test_quantize_out_refuses_its_classes_and_labels(model, data, tmp_path, capsys):
    q = tmp_path / "q"
    shutil.copytree(model, q)
    (q / "labels.txt").write_text("x\n")
    refused(["quantize", "--model", "parnet_s", "--calib", str(data), "--labels", str(q / "labels.txt"),
             "--out", str(q), "--overwrite"], capsys, "--labels")
    assert (q / "labels.txt").read_text() == "x\n"


# --------------------------------------------------------------- the output lock

@pytest.mark.parametrize("plant", ["symlink", "hardlink", "fifo", "folder"])
def test_output_lock_opens_no_planted_file(tmp_path, plant):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious data")
    lock = tmp_path / ".q_out.parnet-cpu.lock"
    {"symlink": lambda: lock.symlink_to(victim), "hardlink": lambda: os.link(victim, lock),
     "fifo": lambda: os.mkfifo(lock), "folder": lambda: lock.mkdir()}[plant]()
    with pytest.raises(OutputPathError, match="output lock"):
        with output_lock(tmp_path / "q_out"):
            pass
    assert victim.read_text() == "precious data" and os.path.lexists(lock)


# --------------------------------------------------------------- wording: say what a thing is

def test_a_fifo_is_called_a_fifo(tmp_path):
    from parnet_cpu.predict import PredictError, collect_images

    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    with pytest.raises(PredictError, match=r"named pipe \(FIFO\)"):
        collect_images([fifo])
    (tmp_path / "m").mkdir()
    os.mkfifo(tmp_path / "m" / "parnet.json")
    with pytest.raises(ModelDirError, match=r"is a named pipe \(FIFO\), not a file"):
        read_manifest(tmp_path / "m")


# --------------------------------------------------------------- no output flag is missed

PATHY = {"FILE", "DIR", "PNG", "JSON", "CKPT", "DIR|FILE"}


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_path_flag_is_classified_as_input_or_output():
    """Walk every sub-command's options: a flag that takes a path (a path-like metavar, or a name like json,
    out, report, plot, data, file, dir) must be in INPUT_FLAGS or OUTPUT_FLAGS, so `command_paths` sees it;
    a new flag nobody classified fails here."""
    unclassified = []
    for name, p in _subcommands().items():
        for a in p._actions:
            if not a.option_strings or a.nargs == 0 or a.dest in ("help", "model_flag_refused"):
                continue
            words = a.dest.lower()
            pathy = (a.metavar in PATHY or any(w in words for w in ("json", "out", "report", "plot", "data", "file",
                                                                    "dir", "calib", "label", "class", "checkpoint",
                                                                    "export", "fit", "machine", "images", "val")))
            if pathy and a.dest not in INPUT_FLAGS and a.dest not in OUTPUT_FLAGS and a.type in (None, str):
                unclassified.append(f"{name} {a.option_strings[0]}")
    assert not unclassified, f"path flags in neither INPUT_FLAGS nor OUTPUT_FLAGS: {unclassified}"


def test_every_single_file_output_flag_refuses_the_model_folder(model, capsys):
    """For every sub-command with a value-taking output flag among --json/--report/--plot/--export, pointing
    it at the model manifest (or, without a model folder, at the --data file) is refused with exit 2 and
    the manifest is intact (flags discovered from the parser, not listed)."""
    before = (model / "parnet.json").read_bytes()
    tried = []
    for name, p in _subcommands().items():
        flags = {a.dest: a for a in p._actions if a.option_strings and a.nargs != 0}
        outs = [d for d in ("json", "report", "plot", "export") if d in flags]
        if not outs or "model" not in flags:
            continue
        for dest in outs:
            argv = [name]
            if flags["model"].option_strings[0] == "--model-dir":
                argv += ["--model-dir", str(model)]
            else:
                argv += ["--model", "parnet_s", "--checkpoint", str(model / "model_deploy.pt")]
            if "data" in flags:
                argv += ["--data", str(model)]
            if name == "plan":
                argv += ["--cpus", "8", "--no-latency"]
            if name == "train":
                argv += ["--out", str(model.parent / "t.pt")]
            for a in p._actions:  # other required flags (export/quantize --out, quantize --calib): never reached
                if a.required and a.option_strings and a.option_strings[0] not in argv:
                    argv += [a.option_strings[0], str(model.parent / f"unused-{a.dest}")]
            target = model / ("parnet.json" if "--model-dir" in argv else "model_deploy.pt")  # an input of each
            argv += [flags[dest].option_strings[0], str(target)]
            assert main(argv) == 2, argv
            assert "an input of this command" in capsys.readouterr().err, argv
            tried.append(f"{name} --{dest}")
    assert (model / "parnet.json").read_bytes() == before
    assert {"eval --json", "plan --json", "profile --json", "bench --json", "bench --plot", "train --report",
            "train --export", "train --json", "export --json", "quantize --json", "predict --json",
            "serve --json"} <= set(tried), tried


def test_export_with_a_planted_lock_link_is_a_clear_refusal(tmp_path, capsys):
    """Row 31 through the command line: exit 2 naming the link, the victim intact, no traceback."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious data")
    (tmp_path / ".q_out.parnet-cpu.lock").symlink_to(victim)
    refused(["export", "--model", "parnet_s", "--planes", "16,32,64,128", "--input-size", "64",
             "--out", str(tmp_path / "q_out")], capsys, "symbolic link")
    assert victim.read_text() == "precious data" and not (tmp_path / "q_out").exists()


def test_empty_and_stdout_outputs_are_said_plainly():
    """Second hostile pass: `--json ''` was called a folder and `--json /dev/stdout` (a pipe under a runner)
    a /proc folder that cannot take the result."""
    with pytest.raises(OutputPathError, match="--json is empty"):
        check_output_file("", "--json")
    read, write = os.pipe()
    try:
        os.dup2(write, 99)
        assert check_output_file("/dev/fd/99", "--json") == Path("/dev/fd/99")  # written directly
    finally:
        for fd in (read, write, 99):
            os.close(fd)
