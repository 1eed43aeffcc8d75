"""parnet_cpu.ray on a real local Ray cluster (127.0.0.1, 2 CPUs) started here: Ray Serve replicas speaking
`parnet-cpu serve`'s API on disjoint leased cores, surviving a killed replica; Ray Data predict giving the
local predict's rows. Runs in the Ray environment (`bash scripts/ray_env.sh`, which CI runs); elsewhere
tests/conftest.py does not collect this folder."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import export_narrow
from test_embed import _free_port, assert_same_answer

REPO = Path(__file__).resolve().parents[2]
PHOTOS = sorted((REPO / "calibration" / "sample").glob("*.jpg"))
APP = "parnet-ray-test"  # the Serve application (and process titles ray::ServeReplica:<app>:<app>)
TIMEOUT = 240.0  # 2 cores shared with other work: starting replicas can take a while


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return export_narrow(tmp_path_factory.mktemp("ray") / "narrow")


@pytest.fixture(scope="module")
def reference(model_dir):
    """Runtime's own answers, computed before the cluster leases the cores (then closed)."""
    from parnet_cpu.runtime import Runtime

    with Runtime(model_dir) as rt:
        images = [rt.preprocess(p.read_bytes()) for p in PHOTOS[:6]]
        batch = np.stack(images)
        return {"batch": batch, "logits": rt.infer(batch),
                "top": {p.name: t.predictions() for p, t in zip(PHOTOS, rt.classify([str(p) for p in PHOTOS], 5))}}


@pytest.fixture(scope="module")
def cluster(reference):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def served(cluster, model_dir):
    from ray import serve

    from parnet_cpu.ray import deployment

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(deployment(model_dir, replicas=2, name=APP, max_restarts=0), name=APP, route_prefix="/")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT) as client:
        yield client
    serve.shutdown()


# ---------------------------------------------------------------------------------------------- /proc

def replica_pids() -> list[int]:
    """Processes titled ray::ServeReplica:<APP>:... (Ray's own process title), read from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if cmd.startswith(f"ray::ServeReplica:{APP}:"):
                pids.append(int(entry))
    return sorted(pids)


def tree_cpus(pid: int) -> set[int]:
    """Every CPU any thread of `pid` or of its descendants (the runtime's workers) may run on."""
    from parnet_cpu.system.cpuinfo import parse_cpu_list

    cpus, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for tid in os.listdir(f"/proc/{p}/task"):
            try:
                status = Path(f"/proc/{p}/task/{tid}/status").read_text()
                todo += [int(c) for c in Path(f"/proc/{p}/task/{tid}/children").read_text().split()]
            except OSError:  # the thread ended meanwhile
                continue
            line = next(x for x in status.splitlines() if x.startswith("Cpus_allowed_list:"))
            cpus |= set(parse_cpu_list(line.split(":", 1)[1].strip()))
    return cpus


def two_replicas(without: int | None = None) -> list[int] | None:
    pids = replica_pids()
    return pids if len(pids) == 2 and without not in pids else None


def wait_for(cond, what: str, timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def classify(client: httpx.Client, photo: Path, k: int = 5) -> httpx.Response:
    return client.post(f"/v1/classify?top_k={k}", content=photo.read_bytes(), headers={"content-type": "image/jpeg"})


# ---------------------------------------------------------------------------------------------- tests

def test_the_base_install_and_the_cli_never_import_ray():
    code = ("import sys, contextlib, io\n"
            "import parnet_cpu, parnet_cpu.api, parnet_cpu.predict, parnet_cpu.serve.app, parnet_cpu.runtime\n"
            "from parnet_cpu.cli import main\n"
            "for cmd in (['serve', '--help'], ['predict', '--help'], ['info', '--help']):\n"
            "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
            "        main(cmd)\n"
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith(('ray.', 'parnet_cpu.ray'))))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


@pytest.mark.parametrize("cmd", [["predict", "--data", str(PHOTOS[0]), "--out", "{tmp}/x.jsonl"],
                                 ["serve", "--replicas", "2"]])
@pytest.mark.parametrize("address", ["127.0.0.1:1", "no-port"])
def test_a_ray_address_nothing_answers_is_a_clear_error_at_once(model_dir, tmp_path, cmd, address):
    args = [c.format(tmp=tmp_path) for c in cmd]
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "parnet_cpu", args[0], "--model-dir", str(model_dir), *args[1:], "--ray",
                          address], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and ("no Ray cluster answers" in out.stderr or "HOST:PORT" in out.stderr)
    assert time.monotonic() - t0 < 120  # not ray.init's minutes of retries
    assert not (tmp_path / "x.jsonl").exists()


def test_serve_replicas_speak_the_servers_api_with_runtimes_answers(served, reference):
    assert served.get("/v2/health/live").status_code == 200
    assert served.get("/v2/health/ready").status_code == 200
    meta = served.get(f"/v2/models/{APP}").json()
    assert meta["inputs"][0]["shape"] == [-1, 3, 64, 64] and meta["name"] == APP
    # v2 JSON: the logits Runtime gives for the same tensors
    batch = reference["batch"]
    body = {"id": "r1", "inputs": [{"name": "input", "datatype": "FP32", "shape": list(batch.shape),
                                    "data": batch.ravel().tolist()}]}
    r = served.post(f"/v2/models/{APP}/versions/1/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["id"] == "r1" and out["outputs"][0]["shape"] == list(reference["logits"].shape)
    np.testing.assert_allclose(np.asarray(out["outputs"][0]["data"]).reshape(reference["logits"].shape),
                               reference["logits"], rtol=1e-4, atol=1e-4)
    # v2 with the binary tensor extension both ways (no one listed it; the same app answers it)
    head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(batch.shape),
                                   "parameters": {"binary_data_size": batch.nbytes}}],
                       "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
    r = served.post(f"/v2/models/{APP}/infer", content=head + batch.astype("<f4").tobytes(),
                    headers={"Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    logits = np.frombuffer(r.content[n:], "<f4").reshape(reference["logits"].shape)
    np.testing.assert_allclose(logits, reference["logits"], rtol=1e-4, atol=1e-4)
    # /v1/classify: Runtime.classify's ranking, for every shipped photo
    for photo in PHOTOS:
        r = classify(served, photo)
        assert r.status_code == 200, r.text
        assert_same_answer(r.json()["predictions"], reference["top"][photo.name], tol=1e-5)
    # the server's errors, status and body
    for resp, status, words in [
            (served.get("/v2/models/other"), 404, "unknown model"),
            (classify(served, PHOTOS[0], k=0), 400, "top_k"),
            (served.post("/v1/classify", content=b"x", headers={"content-type": "text/plain"}), 415, "multipart"),
            (served.post("/v1/classify", content=b"GIF89a not really", headers={"content-type": "image/gif"}),
             400, "cannot decode"),
            (served.post(f"/v2/models/{APP}/infer", content=b"{", headers={"content-type": "application/json"}),
             400, "not valid JSON"),
            (served.post(f"/v2/models/{APP}/infer", json={"inputs": [{"name": "input", "datatype": "FP32",
                                                                        "shape": [1, 3, 64, 65], "data": [0]}]}),
             400, "shape")]:
        assert resp.status_code == status, (resp.status_code, resp.text)
        assert words in resp.json()["error"], resp.text


def test_replicas_run_on_disjoint_leased_cores(served):
    pids = wait_for(two_replicas, "two replica processes")
    sets = [tree_cpus(pid) for pid in pids]
    assert all(sets) and not sets[0] & sets[1], sets
    assert all(s < os.sched_getaffinity(0) for s in sets), sets  # each replica on a part, not on every CPU


def test_a_killed_replica_fails_only_its_own_requests_and_comes_back(served):
    before = wait_for(two_replicas, "two replica processes")
    victim, survivor = before
    results: list[tuple[str, int, dict | str]] = []

    def client(photo: Path) -> None:
        with httpx.Client(base_url=str(served.base_url), timeout=TIMEOUT) as c:
            for _ in range(6):
                try:
                    r = classify(c, photo)
                    results.append((photo.name, r.status_code, r.json() if r.status_code == 200 else r.text))
                except httpx.HTTPError as exc:  # a connection cut is an error too, never an answer
                    results.append((photo.name, -1, str(exc)))

    threads = [threading.Thread(target=client, args=(p,)) for p in PHOTOS[:6]]
    for t in threads:
        t.start()
    time.sleep(0.3)
    os.kill(victim, signal.SIGKILL)
    for t in threads:
        t.join(TIMEOUT)
    answered = [(name, body) for name, status, body in results if status == 200]
    assert answered, results
    failed = [(status, body) for _, status, body in results if status != 200]
    print("requests failed by the kill:", failed)
    assert all(status == -1 or status >= 500 for status, _ in failed), failed  # errors, never a client's fault
    with httpx.Client(base_url=str(served.base_url), timeout=TIMEOUT) as c:
        truth = {p.name: classify(c, p).json()["predictions"] for p in PHOTOS[:6]}
    for name, body in answered:  # every answer is its own image's answer
        assert_same_answer(body["predictions"], truth[name], tol=1e-5)
    # the survivor keeps answering; Ray starts a new replica, on the cores the dead one left
    for _ in range(4):
        assert classify(served, PHOTOS[0]).status_code == 200
    after = wait_for(lambda: two_replicas(without=victim), "a new replica")
    assert survivor in after
    newcomer = next(p for p in after if p != survivor)
    wait_for(lambda: tree_cpus(newcomer) < os.sched_getaffinity(0), "the new replica to pin itself")
    assert not tree_cpus(newcomer) & tree_cpus(survivor)


# ---------------------------------------------------------------------------------------------- Ray Data

@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """The shipped photos, 2,000 Fashion-MNIST test images (Debian's dataset-fashion-mnist), and files that
    must be skipped with the local loader's reasons."""
    from parnet_cpu.data.fmnist import load_fashion_mnist, write_image_folder

    root = tmp_path_factory.mktemp("ray-data")
    photos = root / "photos"
    photos.mkdir()
    for p in PHOTOS:
        (photos / p.name).write_bytes(p.read_bytes())
    (photos / "truncated.jpg").write_bytes(PHOTOS[0].read_bytes()[:3000])
    (photos / "empty.png").write_bytes(b"")
    try:
        fmnist = load_fashion_mnist()["test_images"][:2000]
    except FileNotFoundError as exc:
        pytest.skip(f"Fashion-MNIST is not installed: {exc}")
    write_image_folder(fmnist, None, root / "fmnist", [])
    return root


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def as_answer(row: dict) -> list[dict]:
    return [{"index": i, "label": lab, "probability": p}
            for i, lab, p in zip(row["indices"], row["labels"], row["probabilities"])]


def test_ray_data_predict_gives_the_local_predict_rows(cluster, model_dir, images, tmp_path):
    from ray import serve

    from parnet_cpu.predict import collect_images
    from parnet_cpu.ray import predict

    serve.shutdown()  # the replicas' leases hold every core; the actors need them
    wait_for(lambda: not replica_pids(), "the replicas to stop")
    # a pool that would leave no Ray CPU for decoding is refused at the call, not left to hang
    with pytest.raises(ValueError, match="no CPU for decoding"):
        predict(model_dir, PHOTOS, actors=2, num_cpus=1.0)
    run = [sys.executable, "-m", "parnet_cpu", "predict", "--model-dir", str(model_dir), "--data", str(images),
           "--quiet", "--top-k", "3", "--batch-size", "16"]
    local = subprocess.run([*run, "--out", str(tmp_path / "local.jsonl")], capture_output=True, text=True,
                           cwd=REPO, timeout=900)
    assert local.returncode == 0, local.stderr[-3000:]
    expected = rows_of(tmp_path / "local.jsonl")
    paths, _ = collect_images([images])
    assert len(expected) == len(paths) >= 2000 + len(PHOTOS)
    # the CLI's --ray path, a second driver on this cluster: the same file, row by row
    address = cluster.get_runtime_context().gcs_address
    remote = subprocess.run([*run, "--out", str(tmp_path / "ray.jsonl"), "--ray", address, "--actors", "2"],
                            capture_output=True, text=True, cwd=REPO, timeout=900)
    assert remote.returncode == 0, remote.stderr[-3000:]
    got = rows_of(tmp_path / "ray.jsonl")
    # and the Python API in this driver
    api = list(predict(model_dir, paths, top_k=3, batch_size=16, actors=2, progress=False))
    for rows in (got, api):
        assert [r["path"] for r in rows] == [r["path"] for r in expected]
        for mine, theirs in zip(rows, expected):
            assert set(mine) == set(theirs)
            if "skipped" in theirs:
                assert mine == theirs
            else:
                assert_same_answer(as_answer(mine), as_answer(theirs), tol=1e-5)
    skipped = {Path(r["path"]).name for r in expected if "skipped" in r}
    assert skipped == {"truncated.jpg", "empty.png"}


def test_serve_cli_on_a_ray_cluster_answers_and_stops_on_sigterm(cluster, model_dir, reference, tmp_path):
    """`parnet-cpu serve --ray ADDRESS --replicas 1`, a second driver on this cluster, as users run it."""
    from ray import serve

    serve.shutdown()
    wait_for(lambda: not replica_pids(), "earlier replicas to stop")
    port = _free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "parnet_cpu", "serve", "--model-dir", str(model_dir), "--name", APP,
                                 "--port", str(port), "--ray", cluster.get_runtime_context().gcs_address,
                                 "--replicas", "1", "--no-access-log"], cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                return httpx.get(url + "/v2/health/ready", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, "serve --ray to answer")
        with httpx.Client(base_url=url, timeout=TIMEOUT) as c:
            r = classify(c, PHOTOS[1])
            assert r.status_code == 200, r.text
            assert_same_answer(r.json()["predictions"], reference["top"][PHOTOS[1].name], tol=1e-5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0, log.read_text()[-3000:]
        wait_for(lambda: not replica_pids(), "the application's replicas to stop")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
