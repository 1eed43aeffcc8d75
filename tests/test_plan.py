"""Planner: exact MACs per stage from the IR (checked against an independent count from the torch model's
layer shapes), stream groups sized by cost, and `parnet-cpu plan` on simulated and captured machines."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import NARROW, randomize_bn, slow_param
from parnet_cpu.artifacts import stamp_manifest
from parnet_cpu.export import export_model_dir
from parnet_cpu.models.parnet import create_model
from parnet_cpu.reparam.fuse import reparameterize
from parnet_cpu.runtime.partition import RECOMPUTE_STAGES, SHARE_STAGES
from parnet_cpu.runtime.plan import stage_macs, stream_costs, stream_group_sizes

MACHINES = Path(__file__).resolve().parent / "data" / "machines"


def torch_stage_macs(model, input_size: int) -> dict[str, float]:
    """MACs per image of each stage, counted from nn.Conv2d / nn.Linear shapes during a real forward pass
    (independent of OpenVINO): C_out*H*W * C_in/groups*kH*kW per conv, in*out per linear layer."""
    deploy = reparameterize(model).eval()
    total = [0.0]

    def hook(mod, inp, out):
        if isinstance(mod, nn.Conv2d):
            kh, kw = mod.kernel_size
            total[0] += out[0].numel() * (mod.in_channels // mod.groups) * kh * kw
        elif isinstance(mod, nn.Linear):
            total[0] += mod.in_features * mod.out_features

    handles = [m.register_forward_hook(hook) for m in deploy.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    out: dict[str, float] = {}

    def run(name, fn, *args):
        total[0] = 0.0
        with torch.no_grad():
            y = fn(*args)
        out[name] = total[0]
        return y

    x = torch.zeros(1, deploy.cfg.in_chans, input_size, input_size)
    s = run("stem", deploy.forward_stem, x)
    x2 = run("inits1", deploy.forward_inits1, s)
    y1 = run("stream1", deploy.forward_stream1, s)
    y2 = run("stream2_only", deploy.forward_stream2, x2)
    y3 = run("stream3_only", deploy.forward_stream3, x2)
    run("tail", deploy.forward_tail, y1, y2, y3)
    for h in handles:
        h.remove()
    return out


@pytest.fixture(scope="module")
def variant_irs(tmp_path_factory):
    """ParNet-S and -M exported at 32x32 (the smallest legal size: the layer structure, which is what the
    count must get right, is the same as at 224; L and XL differ from them only in width and are checked
    through the torch count below, exporting them costs a minute here)."""
    root = tmp_path_factory.mktemp("variants")
    out = {}
    for name in ("parnet_s", "parnet_m"):
        model = create_model(name, input_size=32)
        out[name] = (model, export_model_dir(model, root / name) / "model_fp32.xml")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["parnet_s", "parnet_m"])
def test_stage_macs_match_torch_layer_shapes(variant_irs, name):
    model, ir = variant_irs[name]
    ref = torch_stage_macs(model, 32)
    got = stage_macs(ir, SHARE_STAGES)
    assert got["stem"] == ref["stem"] and got["inits1"] == ref["inits1"] and got["tail"] == ref["tail"]
    assert got["stream1"] == ref["stream1"]
    assert got["stream2"] == ref["stream2_only"]
    assert got["stream3"] == ref["stream3_only"]
    recompute = stage_macs(ir, [s for s in RECOMPUTE_STAGES if s.name in ("stream2", "stream3")])
    assert recompute["stream2"] == ref["inits1"] + ref["stream2_only"]
    assert recompute["stream3"] == ref["inits1"] + ref["stream3_only"]
    # the stream groups' work, as the planner sees it: stream 1 clearly cheaper than streams 2 and 3
    costs = stream_costs(got)
    assert costs[0] < 0.9 * costs[1] and costs[0] < 0.9 * costs[2]


@pytest.mark.parametrize("name,gmacs", [("parnet_s", 4.73), slow_param("parnet_m", 8.58), slow_param("parnet_l", 13.32),
                                         slow_param("parnet_xl", 20.72)])
def test_deploy_gmacs_at_224_match_the_paper(name, gmacs):
    """The paper's deployed GMACs at 224x224, from the torch count that the IR count is checked against."""
    assert sum(torch_stage_macs(create_model(name), 224).values()) / 1e9 == pytest.approx(gmacs, abs=0.01)


@pytest.mark.slow
def test_most_cores_go_to_the_most_expensive_stream(variant_irs):
    """ParNet-S (the demo model) on 12 cores: ascending groups ([3, 4, 5]-like), not the [5, 4, 3] that
    the kH*kW-only count gave."""
    for stages in (RECOMPUTE_STAGES, SHARE_STAGES):
        sizes, costs = stream_group_sizes(variant_irs["parnet_s"][1], stages, 12)
        assert sum(sizes) == 12
        assert costs[0] < costs[1] and costs[0] < costs[2]
        assert sizes[0] < sizes[1] and sizes[0] < sizes[2], (sizes, costs)


def quantize_random(model_dir: Path, images: int = 8) -> Path:
    """NNCF INT8 IR from random calibration inputs (the MAC count does not depend on the data)."""
    import numpy as np

    from parnet_cpu.export import save_ir
    from parnet_cpu.quantization.openvino_backend import quantize_ir
    from parnet_cpu.quantization.ptq import QuantizeOptions
    from parnet_cpu.system.openvino_core import core

    fp32 = core().read_model(str(model_dir / "model_fp32.xml"))
    shape = [1] + [d.get_length() for d in list(fp32.inputs[0].get_partial_shape())[1:]]
    rng = np.random.default_rng(0)
    calib = [rng.standard_normal(shape, dtype=np.float32) for _ in range(images)]
    save_ir(quantize_ir(fp32, calib, QuantizeOptions(subset_size=images, progress=False)), model_dir / "model_int8.xml")
    stamp_manifest(model_dir)  # the folder's manifest records every model file (loaders verify it)
    return model_dir / "model_int8.xml"


# --------------------------------------------------------------------------- topology placement and `plan`
from parnet_cpu.cli import main as cli_main  # noqa: E402
from parnet_cpu.runtime.cores import (CoreSpecError, place_stream_groups, proportional_sizes,  # noqa: E402
                                      simulated_machine, single_graph_cores)
from parnet_cpu.system.cpuinfo import CORE_EFFICIENCY, describe_machine  # noqa: E402

COSTS = [1.08, 1.43, 1.56]  # ParNet-S stream groups' GMACs (the planner's own count, see above)


def check_groups(info, groups, costs, use_smt=False, include_efficiency=False) -> None:
    """The planner's promises, checked on its output."""
    by_cpu = {c: core for core in info.cores for c in core.cpus}
    flat = [c for g in groups for c in g]
    assert len(flat) == len(set(flat)), "groups overlap"
    assert set(flat) <= set(info.usable_cpus)
    physical = [len({by_cpu[c].cpus[0] for c in g}) for g in groups]
    assert sum(physical) <= len(info.cores)
    for (ci, pi) in zip(costs, physical):  # more work never gets fewer cores
        assert all(pi <= pj for cj, pj in zip(costs, physical) if cj > ci)
    per_socket = {}
    for core in info.cores:
        per_socket[core.socket] = per_socket.get(core.socket, 0) + 1
    for g, p in zip(groups, physical):
        sockets = {by_cpu[c].socket for c in g}
        if p <= max(per_socket.values()):
            assert len(sockets) == 1, f"a {p}-core group crosses sockets {sockets}"
        if not use_smt:
            assert all(c == by_cpu[c].cpus[0] for c in g), "SMT sibling used without --smt"
        if not include_efficiency:
            assert all(by_cpu[c].core_type != CORE_EFFICIENCY for c in g)


@pytest.mark.parametrize("cores,sockets", [(16, 1), (32, 1), (56, 1), (56, 2), (112, 1), (112, 2)])
def test_groups_on_simulated_machines(cores, sockets):
    info = simulated_machine(cores, sockets, threads_per_core=2)
    groups = place_stream_groups(info, COSTS)
    check_groups(info, groups, COSTS)
    assert sum(len(g) for g in groups) >= cores // sockets  # at least a whole socket is put to work
    smt = place_stream_groups(info, COSTS, use_smt=True)
    check_groups(info, smt, COSTS, use_smt=True)
    assert sum(len(g) for g in smt) == 2 * sum(len(g) for g in groups)


@pytest.mark.parametrize("machine", ["xeon-spr-2s", "alderlake-i9-12900k"])
def test_groups_on_captured_machines(machine):
    info = describe_machine(MACHINES / machine, query_openvino=False)
    check_groups(info, place_stream_groups(info, COSTS), COSTS)
    check_groups(info, place_stream_groups(info, COSTS, include_efficiency=True), COSTS, include_efficiency=True)
    assert set(single_graph_cores(info)) <= set(info.usable_cpus)


def test_hybrid_efficiency_cores_only_when_asked():
    info = describe_machine(MACHINES / "alderlake-i9-12900k", query_openvino=False)
    e_cpus = {c for core in info.cores if core.core_type == CORE_EFFICIENCY for c in core.cpus}
    assert e_cpus and not e_cpus & {c for g in place_stream_groups(info, COSTS) for c in g}
    assert e_cpus & {c for g in place_stream_groups(info, COSTS, include_efficiency=True) for c in g}


def test_too_few_cores_is_a_clear_error():
    with pytest.raises(CoreSpecError, match="3 physical cores"):
        place_stream_groups(simulated_machine(2), COSTS)


@pytest.fixture(scope="module")
def int8_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("parnet_s", **NARROW)
    randomize_bn(model)
    folder = export_model_dir(model, tmp_path_factory.mktemp("plan") / "narrow")
    quantize_random(folder)
    return folder


@pytest.mark.slow
def test_int8_ir_counts_the_same_macs(int8_dir):
    """The INT8 IR (weights behind Convert/Multiply) counts exactly what the FP32 IR counts."""
    fp32 = stage_macs(int8_dir / "model_fp32.xml", RECOMPUTE_STAGES)
    assert stage_macs(int8_dir / "model_int8.xml", RECOMPUTE_STAGES) == fp32 and all(v > 0 for v in fp32.values())


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--cpus", "16"], ["--cpus", "32"], ["--cpus", "56"], ["--cpus", "112", "--sockets", "2"],
                                  ["--machine", str(MACHINES / "xeon-spr-2s")],
                                  ["--machine", str(MACHINES / "alderlake-i9-12900k")]])
def test_plan_cli_groups(int8_dir, tmp_path, args, capsys):
    out = tmp_path / "plan.json"
    assert cli_main(["plan", "--model-dir", str(int8_dir), "--no-latency", "--json", str(out), *args]) == 0
    r = json.loads(out.read_text())
    assert "stream 1:" in capsys.readouterr().out
    threads = [g["threads"] for g in r["groups"]]
    gmacs = [g["gmacs"] for g in r["groups"]]
    assert gmacs[0] < gmacs[1] and gmacs[0] < gmacs[2] and threads[0] <= min(threads[1:])
    assert all(len(g["sockets"]) == 1 for g in r["groups"])
    assert sum(threads) <= r["machine"]["physical_cores"] and r["predictions"] is None
    # the groups as --cores / Runtime(cores=...) take them, exactly the printed ones
    from parnet_cpu.runtime.cores import parse_groups
    from parnet_cpu.system.cpuinfo import format_cpu_list

    assert [format_cpu_list(g) for g in parse_groups(r["cores_arg"])] == [g["cpus"] for g in r["groups"]]


@pytest.mark.slow
def test_plan_cli_predicts_and_reuses_its_fit(int8_dir, tmp_path):
    """With latency: a 1-thread profile of every stage at batch 1 and 8, predictions for both plans; the
    JSON's cost model can be fed back with --fit (no profiling) and gives the same numbers."""
    first = tmp_path / "a.json"
    assert cli_main(["plan", "--model-dir", str(int8_dir), "--cpus", "16", "--json", str(first)]) == 0
    a = json.loads(first.read_text())
    assert [p["batch"] for p in a["predictions"]] == [1, 8]
    for p in a["predictions"]:
        assert p["multistream_ms"] > 0 and p["single_ms"] > 0
        assert p["auto_would_choose"] == ("multistream" if p["multistream_ms"] < p["single_ms"] else "single")
    second = tmp_path / "b.json"
    assert cli_main(["plan", "--model-dir", str(int8_dir), "--cpus", "32", "--fit", str(first), "--json", str(second)]) == 0
    b = json.loads(second.read_text())
    assert b["predictions"][0]["single_ms"] <= a["predictions"][0]["single_ms"]  # more cores, never slower
    # groups sized by predicted time, shown next to the MAC split; at the batch they are sized for (1) the
    # predicted critical path is never longer than the MAC split's
    for r in (a, b):
        assert r["sizing"] == "predicted time" and len(r["mac_groups"]) == 3
        assert sum(g["threads"] for g in r["groups"]) == sum(g["threads"] for g in r["mac_groups"])
        assert r["predictions"][0]["multistream_ms"] <= r["predictions_mac_split"][0]["multistream_ms"] + 1e-9
    # the hand-over is the measured parent-worker round trip (x3), not an assumed 0.3 ms; --fit reuses it
    assert "measured" in a["handover_source"] and 0 < a["handover_ms"] != 0.3
    assert b["handover_ms"] == a["handover_ms"] and "--fit" in b["handover_source"]
    # the 8..112-core scan: both splits, batch 1 and 8, and the break-even core count per column
    assert [s["cores"] for s in a["scan"]] == list(range(8, 113, 8))
    for s in a["scan"]:
        assert sum(s["groups"]["time"]) == sum(s["groups"]["macs"]) == s["cores"]
        assert s["ratio_time_b1"] <= s["ratio_macs_b1"] + 1e-9
    assert set(a["break_even_cores"]) == {"ratio_macs_b1", "ratio_macs_b8", "ratio_time_b1", "ratio_time_b8"}


def test_time_balanced_sizes_minimise_the_slowest_group():
    """Exhaustive minimax over the splits: a cost-proportional split is found when time is cost/cores, and
    a stream whose work splits into only 2 items (where MACs mislead) gets 2 cores, the rest go elsewhere."""
    from parnet_cpu.runtime.plan import time_balanced_sizes

    assert time_balanced_sizes(lambda i, n: (1, 2, 3)[i] / n, 3, 12) == [2, 4, 6]
    # equal MACs, so MACs say [4, 4, 4] on 12 cores; stream 1 cannot use more than 2
    grain2 = lambda i, n: 6.0 / min(n, 2) if i == 0 else 6.0 / n  # noqa: E731
    assert proportional_sizes([6.0, 6.0, 6.0], 12) == [4, 4, 4]
    assert time_balanced_sizes(grain2, 3, 12) == [2, 5, 5]
    with pytest.raises(CoreSpecError):
        time_balanced_sizes(lambda i, n: 1.0, 3, 2)


@pytest.mark.parametrize("cores,sockets,smt", [(16, 1, False), (56, 2, False), (112, 2, True), (40, 1, True)])
def test_time_balanced_groups_on_simulated_machines(cores, sockets, smt):
    """On simulated topologies the time-sized groups keep the planner's promises (no overlap, never across
    a socket, no SMT siblings unless asked) and, on each socket, beat or tie the MAC split's slowest group."""
    from parnet_cpu.runtime.plan import time_balanced_groups

    info = simulated_machine(cores, sockets, threads_per_core=2)
    serial = (0.4, 0.1, 0.1)  # per-stream serial fraction: what a MAC count cannot see
    group_time = lambda i, n: COSTS[i] * (serial[i] + (1 - serial[i]) / n)  # noqa: E731
    groups = time_balanced_groups(info, COSTS, group_time, use_smt=smt)
    by_cpu = {c: core for core in info.cores for c in core.cpus}
    flat = [c for g in groups for c in g]
    assert len(flat) == len(set(flat)) and all(groups)
    assert all(len({by_cpu[c].socket for c in g}) == 1 for g in groups)
    if not smt:
        assert all(c == by_cpu[c].cpus[0] for c in flat)
    physical = [len({by_cpu[c].cpus[0] for c in g}) for g in groups]
    macs = place_stream_groups(info, COSTS, smt)
    mac_physical = [len({by_cpu[c].cpus[0] for c in g}) for g in macs]
    assert max(group_time(i, n) for i, n in enumerate(physical)) <= \
        max(group_time(i, n) for i, n in enumerate(mac_physical)) + 1e-12


@pytest.mark.slow
def test_plan_cli_errors(int8_dir, tmp_path, capsys):
    assert cli_main(["plan", "--model-dir", str(int8_dir), "--no-latency", "--cpus", "2"]) == 2
    assert "3 physical cores" in capsys.readouterr().err
    assert cli_main(["plan", "--model-dir", str(int8_dir), "--no-latency", "--cpus", "15", "--sockets", "2"]) == 2
    assert "evenly" in capsys.readouterr().err
    assert cli_main(["plan", "--model-dir", str(tmp_path / "nothing"), "--no-latency"]) == 2
    assert cli_main(["plan", "--model-dir", str(int8_dir), "--machine", str(tmp_path)]) == 2
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert cli_main(["plan", "--model-dir", str(int8_dir), "--cpus", "16", "--fit", str(bad)]) == 2
    assert "cost model" in capsys.readouterr().err
