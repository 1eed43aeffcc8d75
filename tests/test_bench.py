"""`parnet-cpu bench` end to end on a narrow model: every engine row, ratios, JSON, plot, errors."""
from __future__ import annotations

import json
import os

import pytest

from parnet_cpu.cli import main

CPUS = sorted(os.sched_getaffinity(0))
GROUPS = f"{CPUS[0]}:{CPUS[-1]}:{CPUS[0]}"


@pytest.fixture(scope="module")
def model_dir(narrow_copy, tmp_path_factory):
    return narrow_copy(tmp_path_factory.mktemp("bench") / "narrow")


@pytest.mark.slow
def test_bench_all_engines_json_and_plot(model_dir, tmp_path, capsys):
    js, png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert main(["bench", "--model-dir", str(model_dir), "--cores", GROUPS, "--batches", "1,2", "--iters", "3",
                 "--warmup", "1", "--min-seconds", "0", "--json", str(js), "--plot", str(png)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "ratios are against ov-latency" in out
    assert "Expected bias" not in captured.err  # ONNX Runtime's quantizer's per-tensor warnings go to the row
    res = json.loads(js.read_text())
    rows = {(r["engine"], r["batch"]): r for r in res["rows"]}
    assert set(rows) == {(e, b) for e in ("multistream", "auto", "ov-latency", "ov-throughput", "torch-eager",
                                                      "ort-parallel", "ort-int8")
                         for b in (1, 2)}
    for (engine, batch), r in rows.items():
        assert "error" not in r, r
        assert 0 < r["median_ms"] <= r["p99_ms"] + 1e-9 and r["throughput_ips"] > 0
        if engine == "ov-latency":
            assert r["latency_ratio_vs_ov_latency"] == pytest.approx(1.0)
    assert rows[("torch-eager", 1)]["precision"] == "fp32" and rows[("ov-latency", 1)]["precision"] == "fp32"
    # ONNX Runtime's own static INT8, calibrated on the shipped photos
    assert rows[("ort-int8", 1)]["precision"] == "int8" and rows[("ort-int8", 1)]["calibration_images"] > 0
    assert set(rows[("ort-int8", 1)]["quantizer_warnings"]) == {"count", "first"}
    # interleaved rounds: every engine timed in each round, ratios taken per round with their range
    for r in rows.values():
        assert r["rounds"] == 5 and len(r["round_median_ms"]["values"]) == 5
        lo, hi = r["latency_ratio_range"]
        assert lo <= r["latency_ratio_vs_ov_latency"] <= hi
    assert res["plan"]["kind"] == "multistream" and res["machine"]["cpu"]
    assert set(rows[("multistream", 1)]["stage_median_ms"]) == {"stem", "stream1", "stream2", "stream3", "tail"}
    # auto measured both plans at load, kept one, and cached the decision in the model folder, unless other
    # work kept those CPUs busy while it measured (then it says so and caches nothing)
    assert rows[("auto", 1)]["plan"] in ("single", "multistream") and "auto" in rows[("auto", 1)]["plan_reason"]
    assert (model_dir / "plan_cache.json").is_file() or "not cached: CPUs busy" in rows[("auto", 1)]["plan_reason"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_errors(model_dir, capsys):
    assert main(["bench", "--model-dir", str(model_dir), "--cost-model"]) == 2  # retired in favour of plan
    assert "parnet-cpu plan" in capsys.readouterr().err
    assert main(["bench", "--model-dir", str(model_dir), "--engines", "ov-latency,warp-drive"]) == 2
    assert "unknown engines" in capsys.readouterr().err
    assert main(["bench", "--model-dir", str(model_dir), "--cores", "0-x"]) == 2
    assert "bad core spec" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--model-dir", str(model_dir), "--cores-per-stream", "0"])


@pytest.fixture
def busy_loop():
    """A real process spinning on the bench's CPUs (pinned to them), what another user's job looks like."""
    import subprocess
    import sys
    import time

    code = f"import os\nos.sched_setaffinity(0, {CPUS!r})\nwhile True:\n    pass\n"
    proc = subprocess.Popen([sys.executable, "-c", code])
    time.sleep(0.5)
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.slow
def test_busy_machine_is_marked_or_refused(model_dir, tmp_path, capsys, busy_loop):
    """A busy loop on the measured CPUs: the numbers come out marked with the load recorded, and
    --require-quiet refuses with exit status 3 before measuring anything."""
    js = tmp_path / "busy.json"
    common = ["bench", "--model-dir", str(model_dir), "--engines", "ov-latency", "--batches", "1", "--iters", "2",
              "--warmup", "0", "--min-seconds", "0", "--quiet-wait", "0.5"]
    assert main([*common, "--json", str(js)]) == 0
    out = capsys.readouterr().out
    res = json.loads(js.read_text())
    assert res["machine_was_quiet"] is False and res["other_load"]["max"] > res["other_load"]["threshold"]
    assert all(r["machine_was_quiet"] is False for r in res["rows"])
    assert "WARNING" in out and "NOT QUIET" in out
    assert main([*common, "--require-quiet", "--json", str(tmp_path / "refused.json")]) == 3
    assert "not quiet" in capsys.readouterr().err and not (tmp_path / "refused.json").exists()


@pytest.mark.parametrize("command", [["profile", "--batch", "1", "--iters", "1"], ["plan", "--cpus", "16"]])
def test_every_measuring_command_refuses_a_busy_machine(model_dir, capsys, busy_loop, command):
    """The same guard holds for profile and plan's profiling, not only bench."""
    assert main([command[0], "--model-dir", str(model_dir), *command[1:], "--require-quiet",
                 "--quiet-wait", "0.5"]) == 3
    assert "not quiet" in capsys.readouterr().err


@pytest.mark.slow
def test_report_folder_speaks_benchmark_apps_language(model_dir, tmp_path, capsys):
    """--report-folder writes benchmark_report.json whose sections and keys are those benchmark_app itself
    writes (checked against a real benchmark_app run on the same IR), one entry per engine and batch, next
    to the project's own JSON; -b/-t/-niter mean what they mean to benchmark_app."""
    import subprocess
    import sys

    from parnet_cpu.artifacts import ModelDir

    folder = tmp_path / "report"
    assert main(["bench", "--model-dir", str(model_dir), "--engines", "ov-latency,ov-throughput,ort-int8", "-b", "1,2",
                 "-t", "0", "-niter", "2", "--warmup", "0", "--rounds", "2", "--report-folder", str(folder)]) == 0
    ours = json.loads((folder / "benchmark_report.json").read_text())
    own = json.loads((folder / "parnet_bench.json").read_text())
    assert set(ours) == {f"{e} batch {b}" for e in ("ov-latency", "ov-throughput", "ort-int8") for b in (1, 2)}
    assert {r["batch"] for r in own["rows"]} == {1, 2} and own["settings"]["min_seconds"] == 0
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    launcher = ["benchmark_app"] if subprocess.run(["which", "benchmark_app"], capture_output=True).returncode == 0 \
        else [sys.executable, "-c", "import sys; from openvino.tools.benchmark.main import main; main()"]
    md = ModelDir.open(model_dir)
    shape = "[" + ",".join(map(str, (2, *md.input_shape()))) + "]"
    subprocess.run([*launcher, "-m", str(md.ir_path("fp32")), "-shape", shape, "-d", "CPU", "-t", "1",
                    "-hint", "latency", "-report_type", "no_counters", "-json_stats", "-report_folder", str(app_dir)],
                   check=True, capture_output=True, timeout=300)
    theirs = json.loads((app_dir / "benchmark_report.json").read_text())
    entry = ours["ov-latency batch 2"]
    assert set(theirs) == set(entry) == {"cmd_options", "configuration_setup", "execution_results"}
    load_phase = {"first inference time (ms)", "read model time (ms)", "reshape model time (ms)",
                  "compile model time (ms)"}  # loading, not measuring: bench does not time its builds
    assert set(theirs["execution_results"]) - load_phase <= set(entry["execution_results"])
    assert set(theirs["configuration_setup"]) <= set(entry["configuration_setup"])
    assert "error" not in theirs["execution_results"]
    assert entry["configuration_setup"]["batch size"] == "2" and float(entry["execution_results"]["throughput"]) > 0
    assert ours["ov-throughput batch 1"]["configuration_setup"]["API"] == "async"
    assert ours["ort-int8 batch 1"]["configuration_setup"]["precision"] == "INT8"


@pytest.mark.slow
def test_nthreads_runs_every_engine_on_the_first_n_cores(model_dir, tmp_path):
    """benchmark_app's -nthreads: every engine on the same first N free cores, N threads. (A subprocess: the
    flag narrows the affinity of the process that runs bench.)"""
    import subprocess
    import sys

    js = tmp_path / "nt.json"
    proc = subprocess.run([sys.executable, "-m", "parnet_cpu", "bench", "--model-dir", str(model_dir), "-nthreads", "1",
                           "--engines", "ov-latency,ort-parallel", "-b", "1", "--rounds", "1", "-niter", "2", "-t", "0",
                           "--warmup", "0", "--json", str(js)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(js.read_text())
    assert res["threads"] == 1 and res["cpus"] == str(CPUS[0])
    assert {r["engine"] for r in res["rows"] if "error" not in r} == {"ov-latency", "ort-parallel"}


def test_nthreads_beyond_the_free_cores_or_with_cores_is_refused_before_anything_runs(model_dir, capsys):
    assert main(["bench", "--model-dir", str(model_dir), "-nthreads", str(len(CPUS) + 1)]) == 2
    assert f"ask for at most {len(CPUS)}" in capsys.readouterr().err
    assert main(["bench", "--model-dir", str(model_dir), "-nthreads", "1", "--cores", GROUPS]) == 2
    assert "give one of them" in capsys.readouterr().err
    assert sorted(os.sched_getaffinity(0)) == CPUS  # a refused run narrowed nothing


def test_nthreads_narrows_every_thread_of_the_process_not_only_the_caller():
    """sched_setaffinity(0) changes only the calling thread: a thread started before -nthreads (an import's
    pool) kept every CPU. All of the process's threads end on the chosen CPUs, read from /proc."""
    import subprocess
    import sys

    code = ("import threading, time, os, glob\n"
            "stop = threading.Event(); t = threading.Thread(target=stop.wait); t.start()\n"
            "from parnet_cpu.cli.bench import restrict_to_threads\n"
            "chosen = restrict_to_threads(1, False)\n"
            "masks = {open(f).read().split('Cpus_allowed_list:')[1].split()[0] "
            "for f in glob.glob('/proc/self/task/*/status')}\n"
            "stop.set(); t.join(); print(chosen, sorted(masks))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"[{CPUS[0]}] ['{CPUS[0]}']"
