"""Where the time goes and what more cores would give (torch-free; nothing a `Runtime` runs imports it).

- `profile`    per-node time, kernel, ISA and precision from OpenVINO's PERF_COUNT (`parnet-cpu profile`)
- `costmodel`  the per-layer cost model fitted on one thread, and its predictions for bigger machines
               (`parnet-cpu plan`, benchmarks/scale_check.py): the project's one prediction model
- `pinned`     the one pinned child-process harness (`run_pinned`), used by the cost model and `bench`

Sits above `runtime/` (it compiles and cuts IRs with it) and below `bench/` and `cli/`.
"""
