"""`parnet-cpu predict` against `parnet-cpu eval` on the same folder, same run (issue 23's acceptance).

    python benchmarks/predict_vs_eval.py --model-dir DIR [--data FOLDER | --fmnist-test N] [--rounds 3]

1. Throughput: the two commands, as a user types them, alternate (eval, predict, eval, predict, ...) on the
   same labelled folder (default: the 10,000 Fashion-MNIST test images written as PNGs); the wall time of each
   process (start-up included, as the user waits for it) and the ratio predict/eval per round.
2. Answers: every row of predict's output against `Runtime.classify` on the same files, in this process
   (top-k indices equal; largest probability difference).
3. Bounded memory: predict over a folder of real images mixed with corrupt files (empty, truncated, text named
   .jpg, random bytes) and a 40000x1 PNG: peak RSS of that process against the same folder without them, and
   every bad file's row marked skipped with its reason.

Writes benchmarks/results/predict_vs_eval.json (machine, load during the run, rounds, checks).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import OtherLoad, machine_summary, print_table, usable_cores, write_result

CLI = [sys.executable, "-m", "parnet_cpu"]


def timed(cmd: list[str]) -> float:
    """Wall seconds of one command run to its end."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return wall


def peak_rss(cmd: list[str]) -> tuple[int, str]:
    """Peak RSS (KiB) of one command, read with wait4 on its own pid."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode})")
    return usage.ru_maxrss, out


def write_bad_files(folder: Path, good: Path) -> dict[str, str]:
    """Corrupt and hostile files next to real ones; name -> what it is."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    real = good.read_bytes()
    bad = {
        "empty.png": b"",
        "truncated.png": real[: len(real) // 2],
        "text.jpg": b"this is not an image\n" * 10,
        "random.jpg": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "header_only.png": real[:33],
    }
    for name, data in bad.items():
        (folder / name).write_bytes(data)
    Image.new("L", (40000, 1)).save(folder / "thin_40000x1.png")
    out = {name: "corrupt" for name in bad}
    out["thin_40000x1.png"] = "40000x1 PNG (decode bound)"
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--data", help="labelled image folder (default: Fashion-MNIST test images written as PNGs)")
    ap.add_argument("--fmnist-test", type=int, default=10000, help="images of the Fashion-MNIST test split")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--memory-model-dir", help="model folder for the bounded-memory run (default: --model-dir); "
                    "a 224-pixel model refuses the 40000x1 PNG, a 32-pixel one decodes it within the bound")
    ap.add_argument("--out", default="predict_vs_eval")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="predict_vs_eval_"))
    try:
        data = Path(args.data) if args.data else work / "fmnist_test"
        if not args.data:
            subprocess.run(CLI + ["dataset", "export-idx", "--fmnist", "test", "--limit", str(args.fmnist_test),
                                  "--out", str(data), "--quiet"], check=True, stdout=subprocess.DEVNULL)
        images = sum(1 for p in data.rglob("*.png"))
        rounds = []
        with OtherLoad(exclude_children=True) as load:
            for r in range(args.rounds):
                row = {"round": r + 1}
                for name in ("eval", "predict"):
                    out = work / (f"e{r}.json" if name == "eval" else f"p{r}.jsonl")
                    cmd = CLI + (["eval", "--model-dir", args.model_dir, "--data", str(data), "--json", str(out)]
                                 if name == "eval" else
                                 ["predict", "--model-dir", args.model_dir, "--data", str(data), "--out", str(out)])
                    row[f"{name}_s"] = timed(cmd + ["--quiet"])
                    row[f"{name}_img_per_s"] = images / row[f"{name}_s"]
                row["predict/eval time"] = row["predict_s"] / row["eval_s"]
                rounds.append(row)
                print(f"round {r + 1}: eval {row['eval_s']:.2f} s, predict {row['predict_s']:.2f} s, "
                      f"ratio {row['predict/eval time']:.3f}", flush=True)
        ratios = [r["predict/eval time"] for r in rounds]

        # answers: predict's rows against Runtime.classify on the same files
        from parnet_cpu import Runtime

        rows = [json.loads(line) for line in (work / "p0.jsonl").read_text().splitlines()]
        with Runtime(args.model_dir) as rt:
            got = []
            for i in range(0, len(rows), 256):
                got += rt.classify([r["path"] for r in rows[i:i + 256]], top_k=len(rows[0]["indices"]))
        same = sum(list(r["indices"]) == list(g.indices) for r, g in zip(rows, got))
        prob_diff = max(float(np.max(np.abs(np.array(r["probabilities"]) - np.array(g.probabilities))))
                        for r, g in zip(rows, got))

        # bounded memory: a small clean folder, then the same with the bad files
        clean, dirty = work / "clean", work / "dirty"
        sample = sorted(data.rglob("*.png"))[:200]
        for folder in (clean, dirty):
            folder.mkdir()
            for i, p in enumerate(sample):
                shutil.copy(p, folder / f"{i:04d}.png")
        bad = write_bad_files(dirty / "bad", sample[0])
        rss, memory_model = {}, args.memory_model_dir or args.model_dir
        for name, folder in (("clean", clean), ("with_bad_files", dirty)):
            out = work / f"{name}.jsonl"
            rss[name], summary = peak_rss(CLI + ["predict", "--model-dir", memory_model, "--data", str(folder),
                                                 "--out", str(out), "--quiet"])
            rss[name + "_summary"] = summary.strip()
        dirty_rows = {Path(json.loads(x)["path"]).name: json.loads(x)
                      for x in (work / "with_bad_files.jsonl").read_text().splitlines()}
        skipped = {name: dirty_rows[name].get("skipped") for name in bad}

        result = {
            "machine": machine_summary(usable_cores()),
            "other_load": load.summary(),
            "model_dir": str(Path(args.model_dir).resolve()),
            "images": images,
            "rounds": rounds,
            "predict_over_eval_time": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
            "answers": {"rows": len(rows), "topk_indices_equal_runtime_classify": same,
                        "max_probability_difference": prob_diff},
            "bounded_memory": {"model_dir": str(Path(memory_model).resolve()), "peak_rss_kib": {k: v for k, v in rss.items() if not k.endswith("summary")},
                               "summaries": {k: v for k, v in rss.items() if k.endswith("summary")},
                               "bad_files": bad, "their_rows": skipped},
        }
        print_table(rounds, ["round", "eval_s", "predict_s", "eval_img_per_s", "predict_img_per_s",
                             "predict/eval time"])
        print(f"predict/eval time: median {result['predict_over_eval_time']['median']:.3f} "
              f"(range {min(ratios):.3f}-{max(ratios):.3f}); answers equal Runtime.classify: {same}/{len(rows)} "
              f"(max prob diff {prob_diff:.2e}); peak RSS clean {rss['clean']} KiB, with bad files "
              f"{rss['with_bad_files']} KiB")
        for name, why in skipped.items():
            print(f"  {name}: {why}")
        write_result(args.out, result)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
