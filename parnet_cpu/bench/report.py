"""What a benchmark result looks like to a person: the table and the bar chart."""
from __future__ import annotations

from pathlib import Path


def format_table(result: dict) -> str:
    head = (f"{'engine':<14}{'prec':<6}{'batch':>5}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'img/s':>9}{'lat x':>7}"
            f"{'range':>12}{'thr x':>7}")
    rounds = result.get("settings", {}).get("rounds")
    lines = [f"CPU: {result['machine']['cpu']} ({result['machine']['isa_level']}), CPUs {result['cpus']}, "
             f"{result['threads']} threads; ratios are against ov-latency (single graph, same cores)"
             + (f", taken per round over {rounds} interleaved rounds (median, range)" if rounds else ""), head]
    if not result.get("machine_was_quiet", True):
        lines.insert(1, f"NOT QUIET: other work used these CPUs (up to {result['other_load']['max']:.2f} of a CPU; "
                        f"quiet is <= {result['other_load']['threshold']}): these numbers are marked "
                        "machine_was_quiet: false")
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"{r['engine']:<14}{r.get('precision', ''):<6}{r['batch']:>5}  error: {r['error'][:70]}")
            continue
        lines.append(f"{r['engine']:<14}{r['precision']:<6}{r['batch']:>5}{r['median_ms']:>9.2f}{r['p90_ms']:>9.2f}"
                     f"{r['p99_ms']:>9.2f}{r['throughput_ips']:>9.1f}"
                     f"{r.get('latency_ratio_vs_ov_latency', float('nan')):>7.2f}"
                     f"{_range(r.get('latency_ratio_range')):>12}"
                     f"{r.get('throughput_ratio_vs_ov_latency', float('nan')):>7.2f}")
    return "\n".join(lines)


def _range(lo_hi) -> str:
    return f"{lo_hi[0]:.2f}-{lo_hi[1]:.2f}" if lo_hi else ""


def _as_typed(value) -> str:
    """A flag's value as the user typed it: comma-separated values ("1,8") for lists and tuples."""
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def benchmark_app_report(results: list[dict], options: dict) -> dict:
    """benchmark_app's JSON report (`-report_type no_counters -json_stats -report_folder`: the sections
    cmd_options, configuration_setup and execution_results, its key names, its values as strings with two
    decimals), one entry per "<engine> batch <n>" (and cores per stream when sweeping). Latencies are the
    median over the interleaved rounds of each round's statistic, min and max over every call."""
    cmd = {f"--{k.replace('_', '-')}": "" if v is True else _as_typed(v) for k, v in options.items()
           if v is not None and v is not False}
    out = {}
    for res in results:
        for r in res["rows"]:
            if "error" in r:
                continue
            key = f"{r['engine']} batch {r['batch']}" + (f" {cores_per_stream_of(res):g}/stream" if len(results) > 1 else "")
            async_api = r["engine"] == "ov-throughput" or r["engine"] in ("multistream", "auto")
            setup = {"topology": Path(res["model"]).name, "target device": "CPU", "API": "async" if async_api else "sync",
                     "inference_only": "True", "precision": r["precision"].upper(), "batch size": str(r["batch"]),
                     "number of iterations": str(r["iters"]),
                     "number of parallel infer requests": str(r.get("infer_requests") or r.get("inflight") or 1),
                     "duration (ms)": f"{r['iters'] * r['mean_ms']:.2f}", "engine": r["engine"],
                     "cpus": res["cpus"], "threads": str(res["threads"]), "cpu": res["machine"]["cpu"]}
            if "streams" in r or r["engine"] == "ov-latency":
                setup["number of CPU streams"] = str(r.get("streams", 1))
            out[key] = {"cmd_options": cmd, "configuration_setup": setup, "execution_results": {
                "total execution time (ms)": f"{r['iters'] * r['mean_ms']:.2f}",
                "total number of iterations": str(r["iters"]),
                "latency (ms)": f"{r['median_ms']:.2f}", "avg latency": f"{r['mean_ms']:.2f}",
                "min latency": f"{r['min_ms']:.2f}", "max latency": f"{r['max_ms']:.2f}",
                "throughput": f"{r['throughput_ips']:.2f}",
                "machine_was_quiet": str(r.get("machine_was_quiet", res.get("machine_was_quiet")))}}
    return out


def cores_per_stream_of(result: dict) -> float:
    """Mean stream-group size of the multi-stream plan (all threads / 3 when there was none)."""
    plan = result.get("plan")
    if plan:
        from parnet_cpu.system.cpuinfo import parse_cpu_list

        sizes = [len(parse_cpu_list(w["cpus"])) for w in plan["workers"] if w["name"].startswith("stream")]
        return sum(sizes) / len(sizes)
    return result["threads"] / 3


def _bar_label(res: dict, row: dict, sweeping: bool) -> str:
    label = f"{row['engine']} {row['precision']}"
    if sweeping and row["engine"] in ("multistream", "auto"):
        label += f" ({cores_per_stream_of(res):g}/stream)"
    return label


def plot(results: list[dict], path: Path) -> None:
    """Bar chart a person can read at a glance: median latency and throughput of every engine, one
    group of bars per batch size, values printed on the bars, the CPU and model in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeping = len(results) > 1
    batches = results[0]["settings"]["batches"]
    labels: list[str] = []
    values: dict[tuple[str, int], tuple[float, float]] = {}
    for res in results:
        for r in res["rows"]:
            if "error" in r:
                continue
            label = _bar_label(res, r, sweeping)
            if label not in labels:
                labels.append(label)
            values[(label, r["batch"])] = (r["median_ms"], r["throughput_ips"])
    fig, axes = plt.subplots(1, 2, figsize=(max(9.0, 1.4 * len(labels) * len(batches)), 4.6))
    width = 0.8 / max(1, len(batches))
    for ax, idx, title, unit in ((axes[0], 0, "median latency (lower is better)", "ms"),
                                 (axes[1], 1, "throughput (higher is better)", "images/s")):
        for j, b in enumerate(batches):
            xs = [i + (j - (len(batches) - 1) / 2) * width for i in range(len(labels))]
            ys = [values.get((lab, b), (float("nan"), float("nan")))[idx] for lab in labels]
            bars = ax.bar(xs, ys, width, label=f"batch {b}")
            ax.bar_label(bars, labels=[f"{y:.3g}" if y == y else "" for y in ys], fontsize=7, padding=1)
        ax.set_xticks(range(len(labels)), labels, rotation=25, ha="right", fontsize=8)
        ax.set(title=title, ylabel=unit)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    first = results[0]
    fig.suptitle(f"{Path(first['model']).name} ({first['precision']}) on {first['machine']['cpu']} "
                 f"({first['machine']['isa_level']}), CPUs {first['cpus']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
