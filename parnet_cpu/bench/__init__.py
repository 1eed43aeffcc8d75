"""Measuring and comparing: `parnet-cpu bench` and the scripts under benchmarks/.

- `base`     the settings (`BenchConfig`) and the throughput loop
- `engines`  the competing engines, each timed in a child pinned to the plan's CPUs
- `runner`   `run_bench`: the runtime (multistream, auto) and every engine on the same cores, ratios
- `rounds`   the one interleaved timing loop (A B C A B C ...), ratios per round with median and range
- `quiet`    quiet or refuse: other load on the measured CPUs before and during a run
- `report`   the table and the bar chart
- `fmnist`   Fashion-MNIST image folders for the accuracy comparisons

The pinned child-process harness they use is `parnet_cpu.perf.pinned` (the per-layer cost model of
`parnet-cpu plan` uses it too; predictions for other machines are `plan`'s, in `parnet_cpu.perf`); latency statistics come from `parnet_cpu.runtime.timing`. Nothing in
`runtime/` or `serve/` imports this package.
"""
from parnet_cpu.bench.base import BenchConfig
from parnet_cpu.bench.engines import DEFAULT_ENGINES, ENGINES, available_engines, export_onnx_for, run_pinned_engine
from parnet_cpu.bench.report import cores_per_stream_of, format_table, plot
from parnet_cpu.bench.runner import run_bench

__all__ = ["BenchConfig", "DEFAULT_ENGINES", "ENGINES", "available_engines", "cores_per_stream_of",
           "export_onnx_for", "format_table", "plot", "run_bench", "run_pinned_engine"]
