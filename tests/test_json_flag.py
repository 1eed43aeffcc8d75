"""Issue 26 item 4: one `--json [FILE]` on every command (FILE: a checked, stamped report; no FILE or `-`:
stdout, with everything else the command prints moved to stderr), and outputs inside an output folder
(bench --report-folder) refused only where they are a file the command writes there itself."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from parnet_cpu.cli import build_parser, main
from parnet_cpu.cli.common import JSON_HELP, STDOUT

REPO = Path(__file__).resolve().parents[1]
PARNET = [sys.executable, "-m", "parnet_cpu"]


def leaf_commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command words, parser) of every runnable command, nested ones (dataset export-idx) included."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs and path:
        yield path, parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from leaf_commands(sub, path + (name,))


def json_flag_problems(parser: argparse.ArgumentParser) -> list[str]:
    """Commands whose --json is missing or not the one form (`common.add_json_arg`)."""
    problems = []
    head, tail = JSON_HELP.split("{what}")
    for path, p in leaf_commands(parser):
        flag = next((a for a in p._actions if "--json" in a.option_strings), None)
        if flag is None:
            problems.append(f"{' '.join(path)}: no --json")
        elif (flag.nargs, flag.const, flag.metavar, flag.option_strings) != ("?", STDOUT, "FILE", ["--json"]) or \
                not (flag.help.startswith(head) and flag.help.endswith(tail)):
            problems.append(f"{' '.join(path)}: --json is not add_json_arg's")
    return problems


@pytest.fixture(scope="module")
def model(narrow_copy, tmp_path_factory) -> Path:
    return narrow_copy(tmp_path_factory.mktemp("json") / "narrow")


def test_every_command_has_the_one_json_flag():
    """Every command, `models` and `dataset export-idx` included (each has something to report: the variants,
    what was written), has the same --json; a command added without it fails here."""
    parser = build_parser()
    names = {" ".join(path) for path, _ in leaf_commands(parser)}
    assert {"serve", "quantize", "export", "predict", "train", "demo", "dataset export-idx", "info"} <= names
    assert json_flag_problems(parser) == []


def test_the_walk_finds_a_command_without_json_or_with_another_form():
    from parnet_cpu.cli.common import add_json_arg

    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    add_json_arg(sub.add_parser("good"), "a result")
    sub.add_parser("new")  # forgot --json
    sub.add_parser("flag").add_argument("--json", action="store_true")  # the old `info --json` form
    nested = sub.add_parser("group").add_subparsers()
    nested.add_parser("leaf").add_argument("--json", metavar="FILE")  # the old `eval --json FILE` form
    assert json_flag_problems(p) == ["new: no --json", "flag: --json is not add_json_arg's",
                                     "group leaf: --json is not add_json_arg's"]


@pytest.mark.parametrize("spelling", [["--json"], ["--json", "-"]], ids=["bare", "dash"])
def test_json_to_stdout_is_the_json_alone(model, spelling):
    """plan prints a table; with --json to stdout the table goes to stderr and stdout parses as one JSON
    document (a pipe into jq works). Through the installed entry point, in a real process."""
    r = subprocess.run([*PARNET, "plan", "--model-dir", str(model), "--cpus", "8", "--no-latency", *spelling],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["machine"]["physical_cores"] == 8 and report["groups"]
    assert "groups sized by MACs" in r.stderr and "groups sized" not in r.stdout


@pytest.mark.slow
def test_json_file_is_a_stamped_report_and_the_text_stays_on_stdout(model, tmp_path):
    """The same flag with FILE: the report is written there (stamped, so a rerun may replace it, a user's
    file is refused), and the command's own text is on stdout as without --json. verify took --json as a
    boolean flag before: now FILE or stdout, like every other command."""
    out = tmp_path / "checks.json"
    r = subprocess.run([*PARNET, "verify", str(model), "--json", str(out)], capture_output=True, text=True,
                       timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "result        ok" in r.stdout
    written = json.loads(out.read_text())
    assert written["report"] == "verify" and written["ok"] is True and written["model"] == str(model)
    again = subprocess.run([*PARNET, "verify", str(model), "--json", str(out)], capture_output=True, text=True,
                           timeout=300, cwd=REPO)
    assert again.returncode == 0, again.stderr  # its own report: replaced
    notes = tmp_path / "notes.json"
    notes.write_text("mine")
    refused = subprocess.run([*PARNET, "verify", str(model), "--json", str(notes)], capture_output=True, text=True,
                             timeout=300, cwd=REPO)
    assert refused.returncode == 2 and "refusing to replace it" in refused.stderr and "Traceback" not in refused.stderr
    assert notes.read_text() == "mine"
    bare = subprocess.run([*PARNET, "verify", str(model), "--json"], capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert bare.returncode == 0 and json.loads(bare.stdout)["ok"] is True  # `verify DIR --json` as before


def test_info_json_to_a_file_in_process(tmp_path, capsys):
    """`main` itself (what scripts call): info's --json FILE on the live machine (its default --root "/" once
    made every FILE "inside an input"), and inside a captured tree given as --root, refused."""
    assert main(["info", "--json", str(tmp_path / "info.json")]) == 0
    assert capsys.readouterr().out.startswith("Model")  # the human report, as without --json
    assert json.loads((tmp_path / "info.json").read_text())["report"] == "info"
    captured = REPO / "tests" / "data" / "machines" / "xeon-spr-2s"
    assert main(["info", "--root", str(captured), "--json", str(captured / "info.json")]) == 2
    assert "an input of this command" in capsys.readouterr().err and not (captured / "info.json").exists()


@pytest.mark.slow
def test_bench_json_inside_its_report_folder(model, tmp_path, capsys):
    """The defect: `--report-folder peers --json peers/parnet_bench.json` was refused as "an input of this
    command". The report folder is an output: a --json (or --plot) elsewhere in it is written; the one file
    bench writes there itself is refused, saying so, before any measuring."""
    peers = tmp_path / "peers"
    common = ["bench", "--model-dir", str(model), "--engines", "ov-latency", "-b", "1", "-t", "0", "-niter", "1",
              "--warmup", "0", "--rounds", "1", "--report-folder", str(peers)]
    for own in ("parnet_bench.json", "benchmark_report.json"):
        assert main([*common, "--json", str(peers / own)]) == 2
        err = capsys.readouterr().err
        assert f"is {own} in --report-folder {peers}, a file bench writes there itself" in err, err
        assert not peers.exists()  # refused before the measuring
    assert main([*common, "--json", str(peers / "mine.json")]) == 0
    capsys.readouterr()
    mine = json.loads((peers / "mine.json").read_text())
    theirs = json.loads((peers / "parnet_bench.json").read_text())
    assert mine["report"] == theirs["report"] == "bench" and mine["rows"] == theirs["rows"]
    assert (peers / "benchmark_report.json").is_file()


def test_an_output_inside_a_folder_written_whole_is_refused(tmp_path, capsys):
    """export --out is replaced whole: a --json inside it, or equal to it, is refused at once (exit 2) with a
    message about outputs, not inputs; nothing is written."""
    out = tmp_path / "m"
    base = ["export", "--model", "parnet_s", "--planes", "16,32,64,128", "--input-size", "64", "--out", str(out)]
    assert main([*base, "--json", str(out / "summary.json")]) == 2
    assert "lies inside --out" in capsys.readouterr().err
    assert main([*base, "--json", str(out)]) == 2
    assert "two outputs of export cannot be one file" in capsys.readouterr().err
    assert not out.exists()


def test_serve_json_is_the_start_up_plan_once_ready(model, tmp_path):
    """`serve --port 0 --json FILE`: FILE appears once the server answers ready, and says where it listens
    (the real port) and what the runtime runs on which cores, so a supervisor needs no log scraping."""
    plan = tmp_path / "serve.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([*PARNET, "serve", "--model-dir", str(model), "--port", "0", "--plan", "single",
                             "--precision", "fp32", "--json", str(plan)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while not plan.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no start-up plan"
            time.sleep(0.2)
        written = json.loads(plan.read_text())
        assert written["report"] == "serve" and written["port"] > 0 and written["model"] == str(model)
        assert written["runtime"]["plan"]["kind"] == "single" and written["runtime"]["plan"]["workers"][0]["cpus"]
        assert httpx.get(f"{written['url']}/v2/health/ready", timeout=10).status_code == 200  # ready when written
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def test_serve_json_refused_before_the_port_and_cores(model, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    assert main(["serve", "--model-dir", str(model), "--port", "0", "--json", str(notes)]) == 2
    assert "refusing to replace it" in capsys.readouterr().err and notes.read_text() == "mine"


def test_json_before_a_positional_says_why_the_positional_is_missing(tmp_path, capsys):
    """`--json [FILE]` takes the next word as FILE, so `verify --json DIR` leaves DIR missing: the error says
    that and the fix, for every command with a positional (verify, slim), and nothing is written."""
    from parnet_cpu.cli import main

    for command in ("verify", "slim"):
        with pytest.raises(SystemExit) as exc:
            main([command, "--json", str(tmp_path)])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "required: DIR" in err and f"took '{tmp_path}' as its FILE" in err and "--json=FILE" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (a device that refuses every write)")
def test_a_json_file_refused_after_the_work_goes_to_stdout_for_every_command(model, tmp_path, capsys, monkeypatch):
    """`--json FILE` on a place that refuses the write only once the command's work is done (/dev/full): the
    report is printed on stdout and the error (exit 74) says so, in the one writer every command uses. `slim`
    had already removed files when its report was lost (hostile pass); `info` is any other command."""
    folder = tmp_path / "m"
    shutil.copytree(model, folder)
    assert main(["slim", str(folder), "--json", "/dev/full"]) == 74
    out, err = capsys.readouterr()
    report = json.loads(out[out.index("{"):])  # stamped as the file would have been
    assert report["report"] == "slim" and "model_deploy.pt" in json.dumps(report) and not (folder / "model_deploy.pt").exists()
    assert "the slim report is printed above (JSON), because --json /dev/full could not be written" in err
    assert "cannot write /dev/full" in err and "Traceback" not in err
    assert main(["info", "--json", "/dev/full"]) == 74
    out, err = capsys.readouterr()
    assert json.loads(out[out.index("{"):])["report"] == "info" and "the info report is printed above" in err
    monkeypatch.setattr(sys, "stdout", None)  # started with stdout closed (`>&-`): nothing is said to be above
    assert main(["info", "--json", "/dev/full"]) == 74
    assert "the info report is lost: stdout is closed too" in capsys.readouterr().err
