"""`parnet-cpu predict`: the command as users run it (a subprocess, base-install imports only) on real
photos, corrupt files and an extreme-aspect PNG; its rows against Runtime.classify and serve's answers."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image

from test_embed import START_TIMEOUT, _free_port, _stop, _wait_ready, assert_same_answer

REPO = Path(__file__).resolve().parents[1]
PHOTOS = sorted((REPO / "calibration" / "sample").glob("*.jpg"))

pytestmark = pytest.mark.usefixtures("own_lease_namespace")

# the command in a subprocess; afterwards it says which heavy modules it imported
RUN = ("import sys; from parnet_cpu.cli import main; rc = main(sys.argv[1:]); "
       "print('HEAVY=' + ','.join(m for m in ('torch', 'nncf', 'torchvision') if m in sys.modules)); sys.exit(rc)")


def predict(model_dir: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUN, "predict", "--model-dir", str(model_dir), "--quiet", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.fixture(scope="module")
def model_dir(narrow_copy, tmp_path_factory) -> Path:
    return narrow_copy(tmp_path_factory.mktemp("predict") / "narrow")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The shipped photos in class folders, plus files that must be skipped with a reason."""
    root = tmp_path_factory.mktemp("photos")
    for i, p in enumerate(PHOTOS):
        d = root / ("class_a" if i % 2 else "class_b")
        d.mkdir(exist_ok=True)
        shutil.copy(p, d / p.name)
    bad = root / "class_b" / "broken"
    bad.mkdir()
    (bad / "truncated.jpg").write_bytes(PHOTOS[0].read_bytes()[:4000])
    (bad / "not_really.png").write_bytes(b"%!PS-Adobe-3.0 EPSF not a png")
    (bad / "empty.jpg").write_bytes(b"")
    Image.new("RGB", (40000, 1), "white").save(bad / "wide_40000x1.png")
    (root / "README.txt").write_text("not an image\n")
    (root / ".hidden.jpg").write_bytes(PHOTOS[0].read_bytes())
    return root


SKIPPED = {"truncated.jpg", "not_really.png", "empty.jpg", "wide_40000x1.png"}


@contextmanager
def serving(model_dir: Path, tmp_path: Path) -> Iterator[int]:
    """`parnet-cpu serve` on the folder, ready, on a free port (yielded); stopped after."""
    port = _free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as f:
        srv = subprocess.Popen([sys.executable, "-m", "parnet_cpu", "serve", "--model-dir", str(model_dir),
                                "--port", str(port)], cwd=REPO, stdout=f, stderr=f,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        _wait_ready(f"http://127.0.0.1:{port}/v2/health/ready", srv, log)
        yield port
    finally:
        _stop(srv)


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_predict_folder_rows_equal_runtime_classify_and_skip_bad_files(model_dir, folder, tmp_path):
    from parnet_cpu import Runtime

    out = tmp_path / "preds.jsonl"
    res = predict(model_dir, "--data", str(folder), "--out", str(out), "--top-k", "5", "--batch-size", "8")
    assert res.returncode == 0, res.stderr
    assert "HEAVY=\n" in res.stdout  # the base install is enough: no torch, no NNCF
    rows = rows_of(out)
    names = [Path(r["path"]).name for r in rows]
    assert sorted(names) == sorted([p.name for p in PHOTOS] + list(SKIPPED))  # one row per image, none twice
    assert [r["path"] for r in rows] == sorted((r["path"] for r in rows), key=lambda s: Path(s).relative_to(folder).as_posix())
    skipped = {Path(r["path"]).name: r["skipped"] for r in rows if "skipped" in r}
    assert set(skipped) == SKIPPED
    assert "truncated" in skipped["truncated.jpg"] and "empty" in skipped["empty.jpg"]
    assert "not a recognised image" in skipped["not_really.png"] and "40000x1" in skipped["wide_40000x1.png"]
    assert "24 classified, 4 skipped" in res.stdout and "img/s" in res.stdout and "README.txt" in res.stdout
    good = [r for r in rows if "skipped" not in r]
    with Runtime(model_dir, max_batch=8) as rt:  # the same batches as the command ran
        want = [t for i in range(0, len(good), 8) for t in rt.classify([r["path"] for r in good[i:i + 8]], top_k=5)]
    for r, w in zip(good, want):
        assert (r["indices"], r["labels"]) == (list(w.indices), list(w.labels))
        np.testing.assert_allclose(r["probabilities"], w.probabilities, rtol=1e-6)
    # and serve's /v1/classify for the same files
    with serving(model_dir, tmp_path) as port:
        for r in good:
            resp = httpx.post(f"http://127.0.0.1:{port}/v1/classify?top_k=5", content=Path(r["path"]).read_bytes(),
                              headers={"content-type": "image/jpeg"}, timeout=60)
            assert resp.status_code == 200, resp.text
            mine = [{"index": i, "label": lab, "probability": p}
                    for i, lab, p in zip(r["indices"], r["labels"], r["probabilities"])]
            assert_same_answer(mine, resp.json()["predictions"])


@pytest.mark.slow
def test_csv_files_given_one_by_one_and_resume_adds_only_the_rest(model_dir, folder, tmp_path):
    out = tmp_path / "preds.csv"
    first = sorted(folder.glob("class_a/*.jpg"))[:3]
    res = predict(model_dir, "--data", *map(str, first), "--out", str(out), "--top-k", "2")
    assert res.returncode == 0, res.stderr
    before = out.read_text()
    again = predict(model_dir, "--data", str(folder), "--out", str(out), "--top-k", "2")
    assert again.returncode == 2 and "--resume" in again.stderr and out.read_text() == before  # nothing lost
    wrong_k = predict(model_dir, "--data", str(folder), "--out", str(out), "--top-k", "3", "--resume")
    assert wrong_k.returncode == 2 and "--top-k" in wrong_k.stderr and out.read_text() == before
    res = predict(model_dir, "--data", str(folder), "--out", str(out), "--top-k", "2", "--resume")
    assert res.returncode == 0, res.stderr
    assert out.read_text().startswith(before)  # the earlier rows, as they were
    table = list(csv.DictReader(out.open()))
    assert len(table) == len(PHOTOS) + len(SKIPPED) and len({r["path"] for r in table}) == len(table)
    assert "3 kept from the earlier run" in res.stdout
    assert list(table[0]) == ["path", "label_1", "index_1", "probability_1", "label_2", "index_2", "probability_2",
                              "skipped"]
    assert sum(bool(r["skipped"]) for r in table) == len(SKIPPED)


@pytest.mark.slow
def test_parquet_rows_equal_the_jsonl_rows_and_resume_adds_only_the_rest(model_dir, folder, tmp_path):
    """--out x.parquet (pyarrow: the test extra installs it): the same rows as .jsonl, one table with typed
    list columns, and --resume keeps the earlier rows and adds only the rest."""
    import pyarrow.parquet as pq

    jl, pqf = tmp_path / "p.jsonl", tmp_path / "p.parquet"
    assert predict(model_dir, "--data", str(folder), "--out", str(jl), "--top-k", "3").returncode == 0
    first = sorted(folder.glob("class_a/*.jpg"))[:2]
    res = predict(model_dir, "--data", *map(str, first), "--out", str(pqf), "--top-k", "3")
    assert res.returncode == 0, res.stderr
    assert [r["path"] for r in pq.read_table(pqf).to_pylist()] == [str(p) for p in first]
    res = predict(model_dir, "--data", *map(str, first), str(folder), "--out", str(pqf), "--top-k", "3", "--resume")
    assert res.returncode == 0, res.stderr
    assert "2 kept from the earlier run" in res.stdout
    table = pq.read_table(pqf)
    assert table.schema.field("probabilities").type.value_type.bit_width == 64
    rows = {r["path"]: r for r in table.to_pylist()}
    want = {r["path"]: r for r in rows_of(jl)}
    assert len(table) == len(rows) == len(want)  # each image once, the two resumed ones included
    assert set(rows) == set(want) and {str(p) for p in first} <= set(want)
    for path, w in want.items():
        r = rows[path]
        if "skipped" in w:
            assert r["skipped"] == w["skipped"] and r["labels"] is None
        else:
            assert (r["labels"], r["indices"], r["skipped"]) == (w["labels"], w["indices"], None)
            np.testing.assert_allclose(r["probabilities"], w["probabilities"], rtol=1e-6)


@pytest.mark.slow
def test_interrupted_run_keeps_its_rows_and_resume_finishes_without_repeats(model_dir, tmp_path):
    data = tmp_path / "many"
    data.mkdir()
    for i in range(1500):  # enough work that the run is still going when it is stopped
        (data / f"{i:05d}.jpg").symlink_to(PHOTOS[i % len(PHOTOS)])
    out = tmp_path / "preds.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "parnet_cpu", "predict", "--model-dir", str(model_dir), "--data",
                             str(data), "--out", str(out), "--batch-size", "1"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    seen = ""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:  # wait for the bar to count some images
        seen += os.read(proc.stderr.fileno(), 4096).decode(errors="replace")
        if "/1500 [" in seen and any(f" {n}/1500" in seen for n in range(20, 1400)):
            break
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stdout + stderr
    assert "--resume" in stderr
    kept = rows_of(out)
    assert 0 < len(kept) < 1500 and not any(tmp_path.glob(".preds.jsonl.*"))  # whole rows, no temp file left
    res = predict(model_dir, "--data", str(data), "--out", str(out), "--resume")
    assert res.returncode == 0, res.stderr
    rows = rows_of(out)
    assert rows[:len(kept)] == kept and len(rows) == 1500 and len({r["path"] for r in rows}) == 1500


@pytest.mark.slow
def test_bad_requests_are_clear_errors(model_dir, folder, tmp_path):
    cases = [
        (["--data", str(folder), "--out", str(tmp_path / "x.txt")], "name a .jsonl, .csv or .parquet"),
        (["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "x.jsonl")], "no such file or folder"),
        (["--data", str(folder), "--out", str(tmp_path / "nope" / "x.jsonl")], "is missing"),
        (["--data", str(folder), "--out", str(tmp_path)], "name a .jsonl"),
        (["--data", str(tmp_path), "--out", str(tmp_path / "x.jsonl"), "--top-k", "1001"], "--top-k must be"),
        (["--data", str(folder), "--out", str(tmp_path / "x.jsonl"), "--resume", "--overwrite"], "pass one"),
        (["--data", str(folder), "--out", str(tmp_path / "x.jsonl"), "--top-k", "0"], "must be >= 1"),
    ]
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("x")
    cases.append((["--data", str(empty), "--out", str(tmp_path / "x.jsonl")], "no image files"))
    for args, message in cases:
        res = predict(model_dir, *args)
        assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)
    assert not (tmp_path / "x.jsonl").exists()
    # Parquet where pyarrow is not installed (here: made absent in the child) says what to install
    no_pyarrow = subprocess.run([sys.executable, "-c", "import sys; sys.modules['pyarrow'] = None; " + RUN, "predict",
                                 "--model-dir", str(model_dir), "--quiet", "--data", str(folder), "--out",
                                 str(tmp_path / "x.parquet")], capture_output=True, text=True, cwd=REPO, timeout=300,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
    assert no_pyarrow.returncode == 2 and "pip install pyarrow" in no_pyarrow.stderr, no_pyarrow.stderr
    assert not (tmp_path / "x.parquet").exists()


@pytest.mark.slow
def test_a_model_with_fewer_than_five_classes_works_without_a_top_k(tmp_path):
    """The default top-k is 5, or every class of a model with fewer: `predict`, `Runtime.classify` and serve's
    /v1/classify answer a 2-class model without being told (predict refused it: 'top_k must be in 1..2, got
    5'); an explicit top-k beyond the classes is still refused, naming the flag the user typed."""
    import torch

    from conftest import NARROW
    from parnet_cpu import Runtime
    from parnet_cpu.export import export_model_dir
    from parnet_cpu.models.parnet import create_model

    torch.manual_seed(0)
    model_dir = export_model_dir(create_model("parnet_s", **{**NARROW, "num_classes": 2}), tmp_path / "two")
    out = tmp_path / "p.jsonl"
    res = predict(model_dir, "--data", *map(str, PHOTOS[:3]), "--out", str(out))
    assert res.returncode == 0, res.stderr
    rows = rows_of(out)
    assert [sorted(r["indices"]) for r in rows] == [[0, 1]] * 3
    bad = predict(model_dir, "--data", str(PHOTOS[0]), "--out", str(tmp_path / "q.jsonl"), "--top-k", "3")
    assert bad.returncode == 2 and "--top-k must be an integer in 1..2" in bad.stderr
    with Runtime(model_dir) as rt:
        got = rt.classify([str(p) for p in PHOTOS[:3]])
        assert [list(t.indices) for t in got] == [r["indices"] for r in rows]
        with pytest.raises(ValueError, match="top_k must be an integer in 1..2"):
            rt.classify(str(PHOTOS[0]), top_k=3)
    with serving(model_dir, tmp_path) as port:
        resp = httpx.post(f"http://127.0.0.1:{port}/v1/classify", content=PHOTOS[0].read_bytes(),
                          headers={"content-type": "image/jpeg"}, timeout=60)
        assert resp.status_code == 200, resp.text
        assert [p["index"] for p in resp.json()["predictions"]] == rows[0]["indices"]
        assert httpx.post(f"http://127.0.0.1:{port}/v1/classify?top_k=3", content=PHOTOS[0].read_bytes(),
                          headers={"content-type": "image/jpeg"}, timeout=60).status_code == 400
