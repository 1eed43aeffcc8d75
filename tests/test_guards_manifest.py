"""Issue 21, classes 4 and 9 (file side): a manifest that covers itself, and outputs that fail cleanly.

Class 4: `parnet.json` carries a digest of its own canonical content (`manifest_sha256`), and every field is
checked against one schema when a folder is opened. Every value of a real stamped manifest is edited in turn
(walked programmatically, so fields nobody listed are covered), plus the listed attacks; each is refused by
`verify`, `Runtime` and `eval` (and `serve` for the listed ones), with a message and no traceback.

Class 9: real full disks (a 1-5 MiB tmpfs mounted in a private mount namespace with `unshare -m`, and
`/dev/full`), real concurrent runs and real locks.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import NARROW, randomize_bn
from parnet_cpu.cli import main

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO / "calibration" / "sample"
SEAL = "does not match its recorded manifest_sha256"


@pytest.fixture(scope="module")
def good(narrow_copy, tmp_path_factory) -> Path:
    return narrow_copy(tmp_path_factory.mktemp("manifest") / "good")


@pytest.fixture(scope="module")
def named(tmp_path_factory) -> Path:
    """A narrow model with four class names (for the swap)."""
    import torch

    from parnet_cpu.export import export_model_dir
    from parnet_cpu.models.parnet import create_model

    torch.manual_seed(0)
    model = create_model("parnet_s", **NARROW, num_classes=4, class_names=("cat", "dog", "bird", "fish"))
    randomize_bn(model)
    return export_model_dir(model, tmp_path_factory.mktemp("named") / "named")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Three photos under ImageNet validation file names: labelled by the shipped table."""
    d = tmp_path_factory.mktemp("val")
    for i in range(1, 4):
        shutil.copy(PHOTOS / "astronaut.jpg", d / f"ILSVRC2012_val_{i:08d}.JPEG")
    return d


def manifest(folder: Path) -> dict:
    return json.loads((folder / "parnet.json").read_text())


def copy_with(src: Path, dst: Path, change=None, text: str | bytes | None = None) -> Path:
    """A copy of the model folder `src` whose manifest was edited by `change` (or replaced by `text`), as a
    user with an editor would: the digest is left as it was."""
    # model files hard-linked (fast, read-only here), the manifest copied: editing it never touches `src`
    shutil.copytree(src, dst, copy_function=lambda a, b: shutil.copy2(a, b) if a.endswith("parnet.json")
                    else os.link(a, b))
    if text is not None:
        (dst / "parnet.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    elif change is not None:
        m = manifest(dst)
        change(m)
        (dst / "parnet.json").write_text(json.dumps(m, indent=2))
    return dst


def refused_everywhere(folder: Path, words: tuple[str, ...], data: Path, capsys, serve: bool = False) -> str:
    """verify, Runtime, eval (and serve) each refuse `folder` with a message holding one of `words`."""
    from parnet_cpu.artifacts import ModelDirError
    from parnet_cpu.runtime import Runtime

    assert main(["verify", str(folder)]) == 2
    out = capsys.readouterr()
    said = out.out + out.err
    assert any(w in said for w in words), (words, said)
    with pytest.raises(ModelDirError) as exc:
        Runtime(folder, plan="single")
    assert any(w in str(exc.value) for w in words), (words, str(exc.value))
    assert main(["eval", "--model-dir", str(folder), "--data", str(data), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert any(w in err for w in words) and "Traceback" not in err, (words, err)
    if serve:
        assert main(["serve", "--model-dir", str(folder), "--port", "0", "--plan", "single"]) == 2
        err = capsys.readouterr().err
        assert any(w in err for w in words), (words, err)
    return said


# ------------------------------------------------------------------------------------------------ class 4


def leaves(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaves(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from leaves(v, (*path, i))
    else:
        yield path, obj


def containers(obj, path=()):
    if isinstance(obj, dict):
        yield path, obj
        for k, v in obj.items():
            yield from containers(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from containers(v, (*path, i))


def dotted(path) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def changed(value):
    """A different value of the same JSON type (a hex digest stays a well-formed digest)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 if value else 0.5
    if isinstance(value, str):
        if re.fullmatch(r"[0-9a-f]{64}", value):
            return value[:-1] + ("1" if value[-1] == "0" else "0")
        return value + "x"
    return "x"  # null


def at(obj, path):
    for p in path:
        obj = obj[p]
    return obj


def all_edits(m: dict):
    """(what, edit) for every value of the manifest changed, every key deleted, an unknown key added to every
    object: made from the real file, so a field added later is covered without editing this test."""
    for path, value in leaves(m):
        def edit(d, path=path, value=value):
            at(d, path[:-1])[path[-1]] = changed(value)
        # a list element may be named by its list (stage_tensors is one fixed list)
        names = (dotted(path), dotted(path[:-1])) if isinstance(path[-1], int) else (dotted(path),)
        yield f"{dotted(path)}: {value!r} -> {changed(value)!r}", names, edit
    for path, obj in containers(m):
        for key in obj:
            def delete(d, path=path, key=key):
                del at(d, path)[key]
            yield f"delete {dotted((*path, key))}", (dotted((*path, key)),), delete

        def add(d, path=path):
            at(d, path)["zz_added"] = 1
        yield f"add {dotted((*path, 'zz_added'))}", (dotted((*path, "zz_added")),), add


def test_every_manifest_value_edited_deleted_or_added_is_refused_everywhere(good, data, tmp_path, capsys):
    from parnet_cpu.artifacts import manifest_problems

    m = manifest(good)
    assert m["schema"] == 3 and re.fullmatch(r"[0-9a-f]{64}", m["manifest_sha256"])
    edits = list(all_edits(m))
    assert len(edits) > 60  # config, preprocessing, files, provenance, the digest itself
    by_seal = 0
    for i, (what, names, edit) in enumerate(edits):
        folder = copy_with(good, tmp_path / f"e{i}", edit)
        valid = not manifest_problems(manifest(folder))  # which guard must catch it: the schema or the digest
        by_seal += valid
        said = refused_everywhere(folder, (*names, "manifest_sha256", "schema") if valid else names, data, capsys)
        assert ("cannot be trusted" in said) == valid, (what, said)
        shutil.rmtree(folder)
    assert by_seal > 20  # values the schema cannot judge (mean 0.45 -> 0.22, a count, a digest) are the seal's


def test_the_listed_attacks_are_refused_everywhere(good, named, data, tmp_path, capsys):
    def config(**kv):
        return lambda m: m["config"].update(kv)

    def downgrade(m):
        m["schema"] = 1
        del m["files"]

    cases = {
        "mean_0.9": (good, config(mean=[0.9, 0.9, 0.9]), (SEAL,)),
        "swap_class_names": (named, config(class_names=["dog", "cat", "bird", "fish"]), (SEAL,)),
        "crop_0": (good, config(crop_pct=0), ("config.crop_pct is 0",)),
        "interpolation": (good, config(interpolation="cubic"), ("config.interpolation is 'cubic'",)),
        "mean_string": (good, config(mean="0.5"), ("config.mean is '0.5', expected a list",)),
        "input_size_float": (good, config(input_size=64.0), ("config.input_size is 64.0, expected int",)),
        "in_chans_bool": (good, config(in_chans=True), ("config.in_chans is True, expected int",)),
        "std_zero": (good, config(std=[0, 0.2, 0.2]), ("config.std[0] is 0, expected > 0",)),
        "class_names_duplicate": (named, config(class_names=["cat", "cat", "bird", "fish"]),
                                  ("config.class_names lists 'cat' more than once",)),
        "schema_1_no_files": (good, downgrade, ("declares schema 1",)),
        "schema_2": (good, lambda m: m.update(schema=2), ("declares schema 2",)),
        "files_deleted": (good, lambda m: m.pop("files"), ("records no file digests",)),
        "digest_deleted": (good, lambda m: m.pop("manifest_sha256"), ("records no digest of its own content",)),
        "files_outside": (good, lambda m: m["files"].update({"../../etc/passwd": m["files"]["model_fp32.xml"]}),
                          ("files.../../etc/passwd is not a model file name",)),
        "not_an_object": (good, None, ("holds a JSON list, not an object",)),
    }
    for name, (src, change, words) in cases.items():
        text = "[1, 2]" if name == "not_an_object" else None
        folder = copy_with(src, tmp_path / name, change, text)
        refused_everywhere(folder, words, data, capsys, serve=name in ("mean_0.9", "crop_0", "schema_1_no_files"))
    # NaN and infinities as Python's json writes them (NaN, Infinity) and as an overflowing literal
    text = (good / "parnet.json").read_text()
    for name, old, new, words in (("nan", '"crop_pct": 0.875', '"crop_pct": NaN', "is nan"),
                                  ("inf", '"input_size": 64', '"input_size": Infinity', "is inf"),
                                  ("overflow", '"dropout": 0.0', '"dropout": 1e999', "is inf")):
        assert old in text
        folder = copy_with(good, tmp_path / name, text=text.replace(old, new))
        refused_everywhere(folder, (words,), data, capsys, serve=name == "nan")


def test_unreadable_manifests_are_clear_errors(good, data, tmp_path, capsys):
    """Binary, empty, truncated, duplicated keys, nested beyond the parser, too large, a folder: each a
    ModelDirError that says what it is, never a traceback."""
    text = (good / "parnet.json").read_text()
    cases = {
        "binary": (os.urandom(512), "is not UTF-8 text"),
        "utf16": (text.encode("utf-16"), "is not UTF-8 text"),
        "empty": (b"", "invalid JSON"),
        "truncated": (text[: len(text) // 2].encode(), "invalid JSON"),
        "duplicate_key": (text.replace('"config": {', '"config": {"mean": [0.1, 0.1, 0.1], ', 1).encode(),
                          "duplicate key(s) ['mean']"),
        "deep": (b"[" * 100_000 + b"]" * 100_000, "invalid JSON"),
        "huge": (b" " * (17 << 20) + text.encode(), "larger than 16 MiB"),
    }
    for name, (raw, words) in cases.items():
        folder = copy_with(good, tmp_path / name, text=raw)
        refused_everywhere(folder, (words,), data, capsys)
        shutil.rmtree(folder)
    folder = copy_with(good, tmp_path / "dir")
    (folder / "parnet.json").unlink()
    (folder / "parnet.json").mkdir()
    refused_everywhere(folder, ("no parnet.json",), data, capsys)


def test_formatting_is_not_an_edit_but_a_value_is(good, tmp_path):
    """The digest covers content, not layout: compact JSON with its keys in another order still loads; the
    same with one number changed (a crop of 0.875 -> 0.8751, valid by itself) does not."""
    from parnet_cpu.artifacts import ManifestSealError, ModelDir

    m = manifest(good)
    compact = json.dumps(dict(reversed(list(m.items()))), separators=(",", ":"))
    md = ModelDir.open(copy_with(good, tmp_path / "compact", text=compact))
    md.ir_path("fp32")
    assert md.manifest == m
    assert '"crop_pct":0.875' in compact
    with pytest.raises(ManifestSealError, match="manifest_sha256"):
        ModelDir.open(copy_with(good, tmp_path / "changed", text=compact.replace('"crop_pct":0.875',
                                                                                 '"crop_pct":0.8751')))


def test_a_deliberate_edit_is_accepted_only_through_verify_stamp(good, data, tmp_path, capsys):
    """The opt-in: `verify --stamp` records the edited content (the edit then takes effect everywhere); it
    never stamps an invalid manifest, nor one whose IR contradicts it, and leaves the file as it was."""
    from parnet_cpu.artifacts import ModelDir

    folder = copy_with(good, tmp_path / "edited", lambda m: m["config"].update(mean=[0.5, 0.5, 0.5]))
    refused_everywhere(folder, (SEAL,), data, capsys)
    assert main(["verify", "--stamp", str(folder)]) == 0
    assert "recorded as trusted" in capsys.readouterr().out
    assert ModelDir.open(folder).preprocess_config().mean == (0.5, 0.5, 0.5)
    assert main(["eval", "--model-dir", str(folder), "--data", str(data), "--quiet"]) == 0
    capsys.readouterr()
    for name, change, words in (
            ("nan", lambda m: m["config"].update(std=[math.nan, 0.2, 0.2]), "config.std[0] is nan"),
            ("ir", lambda m: m["config"].update(num_classes=10), "predicts 1000 classes")):
        folder = copy_with(good, tmp_path / name, change)
        before = (folder / "parnet.json").read_bytes()
        assert main(["verify", "--stamp", str(folder)]) == 2
        out = capsys.readouterr()
        assert words in out.out + out.err
        assert (folder / "parnet.json").read_bytes() == before


def test_schema_follows_the_config_and_the_loaders(good):
    """The schema names every ParNetConfig field and the activations the model knows (nothing drifts), and
    PreprocessConfig, which every loader builds, refuses what the schema refuses."""
    import dataclasses

    from parnet_cpu.artifacts import ACTIVATIONS, manifest_schema
    from parnet_cpu.data import PreprocessConfig
    from parnet_cpu.models.parnet import ACTIVATIONS as MODEL_ACTIVATIONS
    from parnet_cpu.models.parnet import ParNetConfig

    from parnet_cpu.artifacts import LEGACY_CROP_KEY  # crop_pct's older name, read from older folders

    assert set(manifest_schema().fields["config"].fields) - {LEGACY_CROP_KEY} == \
        {f.name for f in dataclasses.fields(ParNetConfig)}
    assert set(ACTIVATIONS) == set(MODEL_ACTIVATIONS)
    for bad in (dict(crop_pct=0), dict(crop_pct=math.nan), dict(input_size=math.inf),
                dict(crop_pct=None), dict(interpolation="cubic"), dict(mean=(math.nan, 0.4, 0.4)),
                dict(mean=(0.9, 0.9, 127.0)), dict(std=(math.inf, 0.2, 0.2)), dict(std=(0.2, -0.1, 0.2))):
        with pytest.raises(ValueError):
            PreprocessConfig(**bad)


# ------------------------------------------------------------------------------------------------ class 9


@pytest.fixture(scope="module")
def can_mount(tmp_path_factory) -> None:
    """Full disks are real tmpfs mounts in a private mount namespace (nothing to clean up: the namespace
    goes with its process); skipped only where mounting is impossible."""
    d = tmp_path_factory.mktemp("probe")
    r = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {d}"], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (unshare -m; mount): {r.stderr.decode()[:200]}")


def on_small_disk(disk: Path, size: str, script: str, timeout: float = 300) -> tuple[int, str, str, list[str]]:
    """Run `script` (sh) with a `size` tmpfs mounted at `disk`, in its own mount namespace; returns its exit
    status, stdout, stderr and what is left on the disk afterwards."""
    disk.mkdir(exist_ok=True)
    sh = (f"mount -t tmpfs -o size={size} tmpfs {disk} || exit 99\n{script}\nrc=$?\n"
          f"echo '--- left:' >&2; (cd {disk} && find . -mindepth 1 | sort) >&2; exit $rc")
    r = subprocess.run(["unshare", "-m", "sh", "-c", sh], capture_output=True, text=True, timeout=timeout,
                       cwd=REPO)
    assert r.returncode != 99, r.stderr
    err, _, left = r.stderr.rpartition("--- left:\n")
    return r.returncode, r.stdout, err, left.split()


PY = f"{sys.executable} -m parnet_cpu"
FILL = "cat /dev/zero > {disk}/filler 2>/dev/null; true"  # every byte that is left


@pytest.mark.slow
def test_export_and_quantize_on_a_full_disk_are_clear_errors_leaving_nothing(can_mount, tmp_path):
    disk = tmp_path / "disk"
    args = "--model parnet_s --planes 16,32,64,128 --input-size 64"
    rc, _, err, left = on_small_disk(disk, "1m", f"{PY} export {args} --out {disk}/m")
    assert rc == 74 and "Traceback" not in err, err
    assert f"cannot write --out {disk}/m: No space left on device (ENOSPC)" in err, err
    assert left == []  # no half-written folder, no temporary, no lock
    # quantize: the FP32 files fit, the INT8 ones do not
    rc, _, err, left = on_small_disk(
        disk, "5m", f"{PY} quantize {args} --calib {PHOTOS} --subset-size 4 --eval-limit 0 --quiet --out {disk}/q")
    assert rc == 74 and "Traceback" not in err, err
    assert "No space left on device (ENOSPC)" in err and f"--out {disk}/q" in err, err
    assert left == []


def test_verify_stamp_on_a_full_disk_keeps_the_manifest(can_mount, good, tmp_path):
    disk = tmp_path / "disk"
    script = (f"cp -r {good} {disk}/m && {FILL.format(disk=disk)}; {PY} verify --stamp {disk}/m; echo rc=$?; cmp {good}/parnet.json {disk}/m/parnet.json && "
              f"echo same; rm {disk}/filler")
    rc, out, err, left = on_small_disk(disk, "8m", script)
    assert "rc=74" in out and "same" in out, (out, err)
    assert "cannot write" in err and "No space left on device (ENOSPC)" in err and "Traceback" not in err, err
    assert sorted(left) == sorted(["./m", *(f"./m/{p.name}" for p in good.iterdir())])  # no temporary left


def test_eval_json_checks_its_folder_first_and_never_loses_the_figures(can_mount, good, data, tmp_path):
    # a full disk is said before the evaluation runs
    disk = tmp_path / "disk"
    rc, out, err, _ = on_small_disk(disk, "1m", f"{FILL.format(disk=disk)}; {PY} eval --model-dir {good} "
                                    f"--data {data} --quiet --json {disk}/r.json")
    assert rc == 2 and "cannot take the result (No space left on device)" in err and "top-1" not in out, (out, err)
    # a place that refuses the final write: the figures are printed, the exit status says it
    r = subprocess.run([sys.executable, "-m", "parnet_cpu", "eval", "--model-dir", str(good), "--data", str(data),
                        "--quiet", "--json", "/dev/full"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 74 and "Traceback" not in r.stderr, r.stderr
    assert "cannot write /dev/full: No space left on device (ENOSPC)" in r.stderr
    figures = json.loads(r.stdout[r.stdout.index("{"):])
    assert figures["report"] == "eval" and figures["labelled"] == 3 and "top1" in figures
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)  # written into, never replaced by a file


def test_atomic_write_turns_write_failures_into_output_write_errors(tmp_path):
    """The one file writer: /dev/full (a device, written directly, never replaced) and a writer that hides
    errno behind a RuntimeError on a healthy disk (a bug: it stays itself, nothing is left)."""
    from parnet_cpu.outputs import OutputWriteError, atomic_write, write_json

    with pytest.raises(OutputWriteError) as exc:
        write_json(Path("/dev/full"), {"a": 1})
    assert exc.value.filename == "/dev/full" and "No space left" in exc.value.strerror
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)
    with pytest.raises(RuntimeError, match="not the disk"):
        with atomic_write(tmp_path / "x.bin", "wb") as f:
            f.write(b"123")
            raise RuntimeError("not the disk")
    assert list(tmp_path.iterdir()) == []


def _lock_note(lock: Path) -> dict | None:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return None


@pytest.mark.slow
def test_second_run_to_the_same_out_is_refused_at_once_naming_the_first(good, tmp_path, capsys):
    out = tmp_path / "models" / "int8"
    lock = tmp_path / "models" / ".int8.parnet-cpu.lock"
    first = subprocess.Popen([sys.executable, "-m", "parnet_cpu", "quantize", "--model", "parnet_s", "--planes",
                              "16,32,64,128", "--input-size", "64", "--calib", str(PHOTOS), "--subset-size", "4",
                              "--eval-limit", "0", "--quiet", "--out", str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.monotonic()
        while (_lock_note(lock) or {}).get("pid") != first.pid:
            assert first.poll() is None, first.communicate()
            assert time.monotonic() - t0 < 120
            time.sleep(0.02)
        t0 = time.monotonic()
        for cmd in (["quantize", "--model", "parnet_s", "--calib", str(PHOTOS), "--out", str(out), "--overwrite"],
                    ["export", "--model", "parnet_s", "--out", str(out), "--overwrite"]):
            assert main(cmd) == 75
            err = capsys.readouterr().err
            assert f"being written by another parnet-cpu run (pid {first.pid}" in err and "quantize" in err, err
        assert time.monotonic() - t0 < 10  # at once: before any model is built or image read
        _, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err
    assert (out / "model_int8.xml").is_file() and not lock.exists()
    # a lock left by a killed run holds nothing: the next run takes it and removes it
    lock.write_text('{"pid": 1, "host": "gone", "command": "killed", "started": "then"}')
    assert main(["export", "--model", "parnet_s", "--planes", "16,32,64,128", "--input-size", "64",
                 "--out", str(out), "--overwrite"]) == 0
    assert not lock.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["int8"]


def test_output_lock_is_exclusive_between_processes_and_reentrant_within_one(tmp_path):
    from parnet_cpu.outputs import OutputBusyError, output_lock

    out = tmp_path / "m"
    code = ("import sys, time; from parnet_cpu.outputs import output_lock\n"
            f"with output_lock({str(out)!r}):\n    print('held', flush=True); sys.stdin.readline()")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputBusyError, match=f"pid {holder.pid}"):
            with output_lock(out):
                pass
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(timeout=30) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
    with output_lock(out) as lock:
        with output_lock(out):  # the same run (e.g. the CLI, then atomic_output_dir) re-enters it
            assert lock.is_file()
        assert lock.is_file()
    assert not lock.exists()


def test_a_changed_model_file_is_refused_at_load_not_only_by_verify(narrow_copy, tmp_path):
    """The load-time digest check in the inner loop: one flipped byte in the IR weights (size and name kept,
    the manifest untouched) is refused by every loader's path (`ModelDir.ir_path`, a `Runtime`), naming the
    file, whatever the byte; the untouched folder loads."""
    from parnet_cpu import Runtime
    from parnet_cpu.artifacts import ModelDir, ModelDirError

    ok = narrow_copy(tmp_path / "ok")
    assert ModelDir.open(ok).ir_path("fp32").name == "model_fp32.xml"
    size = (ok / "model_fp32.bin").stat().st_size
    for i, where in enumerate((0, size // 2, size - 1)):
        bad = narrow_copy(tmp_path / f"bad{i}")
        with open(bad / "model_fp32.bin", "r+b") as f:
            f.seek(where)
            byte = f.read(1)
            f.seek(where)
            f.write(bytes([byte[0] ^ 0x01]))
        with pytest.raises(ModelDirError, match="model_fp32.bin"):
            ModelDir.open(bad).ir_path("fp32")
    with pytest.raises(ModelDirError, match="model_fp32.bin"):
        Runtime(bad, precision="fp32", plan="single")
