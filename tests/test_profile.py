"""`parnet-cpu profile`: per-layer kernels and times from OpenVINO's real counters on a real compiled model."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import NARROW, randomize_bn
from parnet_cpu.cli import main
from parnet_cpu.quantization.ptq import QuantizeOptions, quantize_to_dir
from parnet_cpu.runtime.engine import CompileOptions, float_leftovers, precision_supported
from parnet_cpu.perf.profile import kernel_isa, kernel_precision, macs_per_cycle, peak_gmacs, profile_model
from parnet_cpu.system.cpuinfo import describe_machine

pytestmark = pytest.mark.slow  # its module fixture quantizes a model

REPO = Path(__file__).resolve().parents[1]
ISA = describe_machine(query_openvino=False).isa


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A quantized narrow ParNet (real NNCF INT8 IR) whose report.json carries the profile summary."""
    from parnet_cpu.models.parnet import create_model

    torch.manual_seed(0)
    model = create_model("parnet_s", **NARROW)
    randomize_bn(model)
    out = tmp_path_factory.mktemp("prof") / "narrow"
    quantize_to_dir(model, {"model": "narrow"}, REPO / "calibration" / "sample", out,
                    QuantizeOptions(subset_size=8, eval_limit=4, progress=False), log=lambda *a: None)
    return out


def torch_macs(model, size: int) -> float:
    """MACs per image counted independently, from the deploy-form torch modules' own shapes."""
    from parnet_cpu.reparam.fuse import reparameterize

    deploy, total = reparameterize(model).eval(), [0.0]

    def hook(mod, inp, out):
        if isinstance(mod, torch.nn.Conv2d):
            total[0] += out[0].numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        elif isinstance(mod, torch.nn.Linear):
            total[0] += mod.in_features * mod.out_features
    for m in deploy.modules():
        m.register_forward_hook(hook)
    with torch.inference_mode():
        deploy(torch.zeros(1, 3, size, size))
    return total[0]


def test_kernel_names_are_classified():
    avx512_vnni = {"avx512f": True, "avx512_vnni": True}
    assert kernel_isa("brgconv_avx512_amx_I8", "int8", avx512_vnni) == "AMX"
    assert kernel_isa("brgconv_avx512_I8", "int8", avx512_vnni) == "VNNI"
    assert kernel_isa("brgconv_avx512_I8", "int8", {"avx512f": True}) == "AVX512"  # no VNNI: vpmaddubsw path
    assert kernel_isa("jit_avx2_I8", "int8", {"avx2": True}) == "AVX2"
    assert kernel_isa("jit_avx2_I8", "int8", {"avx2": True, "avx_vnni": True}) == "VNNI"
    assert kernel_isa("brgconv_avx512_f32", "f32", avx512_vnni) == "AVX512"
    assert kernel_isa("ref_any_f32", "f32", avx512_vnni) == "reference"
    assert kernel_isa("unknown_I8", "int8", avx512_vnni) == "none"
    assert [kernel_precision(e) for e in ("jit_avx512_I8", "brgconv_avx512_amx_BF16", "reorder_f32", "jit_uni_U8")] == \
        ["int8", "bf16", "f32", "int8"]


def test_peak_is_rate_times_cores_times_clock():
    core = SimpleNamespace(max_freq_mhz=2000.0)
    amx = SimpleNamespace(isa={"amx_tile": True, "amx_int8": True, "amx_bf16": True, "avx512f": True,
                               "avx512_vnni": True}, vendor="GenuineIntel", cpu_family=6, cores=[core] * 4, root="/")
    assert peak_gmacs("int8", amx, 2)["gmacs"] == pytest.approx(1024 * 2 * 2.0)
    assert peak_gmacs("bf16", amx, 2)["gmacs"] == pytest.approx(512 * 2 * 2.0)
    assert macs_per_cycle("int8", {"avx512f": True, "avx512_vnni": True}, "GenuineIntel", 6) == (128, "AVX512_VNNI")
    assert macs_per_cycle("int8", {"avx512f": True, "avx512_vnni": True}, "AuthenticAMD", 25) == (64, "AVX512_VNNI")
    assert macs_per_cycle("f32", {"avx2": True}, "GenuineIntel", 6) == (16, "AVX2")


def test_macs_match_an_independent_count(model_dir):
    from parnet_cpu.models.parnet import create_model
    from parnet_cpu.system.openvino_core import core
    from parnet_cpu.runtime.macs import model_macs

    expected = torch_macs(create_model("parnet_s", **NARROW), NARROW["input_size"])
    for ir in ("model_fp32.xml", "model_int8.xml"):
        assert model_macs(core().read_model(str(model_dir / ir))) == pytest.approx(expected)


@pytest.mark.parametrize("leftovers", ["f32", "bf16"])
def test_profile_reads_real_counters(model_dir, leftovers):
    if leftovers == "bf16" and not precision_supported("bf16"):
        pytest.skip("this CPU has no native bf16: the bf16 leftover path does not apply")
    p = profile_model(model_dir, "int8", batch=2, iters=3, threads=1, leftovers=leftovers)
    layers = p["layers"]
    assert p["compile_properties"]["INFERENCE_PRECISION_HINT"] == leftovers == p["float_leftovers"]
    assert p["node_ms"] == pytest.approx(sum(l["ms"] for l in layers)) and p["node_ms"] > 0
    assert 0 < p["node_ms"] <= p["wall_ms"] * 1.05  # counters cannot exceed what the caller waited
    for key in ("matrix_unit_share", "vnni_share", "int8_share", "reorder_share", "conversion_share"):
        assert 0.0 <= p[key] <= 1.0
    assert sum(v["share"] for v in p["by_isa"].values()) == pytest.approx(1.0)
    convs = [l for l in layers if l["type"] in ("Convolution", "GroupConvolution")]
    int8_convs = [l for l in convs if l["precision"] == "int8"]
    assert len(int8_convs) >= 20  # every block's fused 3x3 conv
    # the kernel class follows the CPU: AMX kernels only with AMX, VNNI int8 convs on AVX-512 VNNI CPUs
    has_amx = ISA.get("amx_tile") and ISA.get("amx_int8")
    assert (p["matrix_unit_share"] > 0) == bool(has_amx)
    if ISA.get("avx512_vnni") and not has_amx:
        assert all(l["isa"] == "VNNI" for l in int8_convs) and p["vnni_share"] > 0.3
    # the ops NNCF left in float (SE gates, stem: default ignored scope) run in the leftover precision
    se = [l for l in convs if ".se.conv" in l["name"]]
    assert se and all(l["precision"] == leftovers for l in se)
    assert p["conversions"] >= 1  # int8 <-> float hand-overs around the float gates are counted
    assert p["achieved_gmacs"] > 0 and p["peak"]["gmacs"] and 0 < p["peak_fraction"] < 1.5


def test_profile_cli_table_json_multistream_and_errors(model_dir, tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["profile", "--model-dir", str(model_dir), "--batch", "1", "--iters", "2", "--threads", "1",
                 "--plan", "multistream", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "matrix unit (AMX) share" in text and "per op class" in text and "GMAC/s" in text
    report = json.loads(out.read_text())
    assert set(report["stages"]) == {"stem", "stream1", "stream2", "stream3", "tail"}
    assert {l["name"] for l in report["layers"]} and report["nodes"] == len(report["layers"])
    assert main(["profile", "--model-dir", str(tmp_path / "missing")]) == 2
    assert "not a parnet-cpu model folder" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="^2$"):  # a number out of range is a usage error (parnet_cpu.options)
        main(["profile", "--model-dir", str(model_dir), "--batch", "0"])


def test_quantize_report_carries_the_profile(model_dir):
    report = json.loads((model_dir / "report.json").read_text())
    prof = report["profile"]
    assert prof["precision"] == "int8" and 0.0 <= prof["matrix_unit_share"] <= 1.0
    assert prof["float_leftovers"] == float_leftovers("int8") == \
        CompileOptions(precision="int8").properties()["INFERENCE_PRECISION_HINT"]
    assert prof["by_op_class"]["Convolution"]["nodes"] >= 20


def test_float_leftover_choice_follows_cpu_cap_and_opt_out(monkeypatch):
    from parnet_cpu.runtime.engine import LEFTOVERS_ENV, default_leftovers

    assert default_leftovers({"avx512_bf16": True}) == "bf16"
    assert default_leftovers({"amx_tile": True, "amx_bf16": True}) == "bf16"
    assert default_leftovers({"avx2": True, "avx512_vnni": True}) == "f32"
    assert default_leftovers({"avx512_bf16": True}, cap="AVX2") == "f32"  # capped like benchmarks/engines.py
    assert default_leftovers({"avx512_bf16": True}, cap="AVX512_CORE_AMX") == "bf16"
    monkeypatch.setenv(LEFTOVERS_ENV, "f32")
    assert CompileOptions(precision="int8").properties()["INFERENCE_PRECISION_HINT"] == "f32"
    assert CompileOptions(precision="int8", leftovers="bf16").properties()["INFERENCE_PRECISION_HINT"] == "bf16"
    assert CompileOptions(precision="fp32", leftovers="bf16").properties()["INFERENCE_PRECISION_HINT"] == "f32"
    monkeypatch.setenv(LEFTOVERS_ENV, "fp8")
    with pytest.raises(ValueError, match="auto, bf16, f32"):
        CompileOptions(precision="int8").properties()
    monkeypatch.delenv(LEFTOVERS_ENV)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert float_leftovers("int8") == "f32"


def test_old_defaults_reachable_through_explicit_flags(tmp_path, monkeypatch, capsys):
    """The defaults before issue 14 (stem and SE gates in float, float leftovers f32) are the default
    --ignored-scope with `--int8-leftovers f32` (what report.json says); --legacy-defaults is gone."""
    from parnet_cpu.runtime.engine import LEFTOVERS_ENV

    monkeypatch.setenv(LEFTOVERS_ENV, "auto")  # restored at teardown, whatever the CLI sets for its process
    out = tmp_path / "legacy"
    assert main(["quantize", "--model", "parnet_s", "--planes", "16,32,64,128", "--input-size", "64", "--calib",
                 str(REPO / "calibration" / "sample"), "--out", str(out), "--subset-size", "8", "--eval-limit", "2",
                 "--int8-leftovers", "f32", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["options"]["ignored_scope"] == ["se", "stem"]
    assert report["profile"]["float_leftovers"] == "f32"
    stem = [l for l in report["profile"]["layers"] if ".inits.0.0.conv/" in l["name"] and l["op_class"] == "Convolution"]
    assert stem and stem[0]["precision"] == "f32"


def test_generic_kernels_are_not_counted_as_vnni():
    from parnet_cpu.perf.profile import classify

    vnni = {"avx512f": True, "avx512_vnni": True}
    assert kernel_isa("jit_uni_I8", "int8", vnni) == "AVX512"
    assert classify("pool", "ReduceMean", "jit_avx512_I8", 1.0, vnni).isa == "AVX512"  # OpenVINO's own int8 jit
    assert classify("conv", "Convolution", "brgconv_avx512_I8", 1.0, vnni).isa == "VNNI"


def test_full_batches_take_the_static_shape_compile_with_the_same_results(model_dir):
    """Runtime's in-process single graph runs a full batch on a static-shape compile (as benchmark_app
    does); full and partial batches give the single graph's results."""
    import numpy as np

    from conftest import rel_l2
    from parnet_cpu.runtime.engine import compile_model
    from parnet_cpu.runtime.runtime import Runtime

    x = np.random.default_rng(3).standard_normal((4, 3, 64, 64), dtype=np.float32)
    ref = compile_model(model_dir / "model_fp32.xml", CompileOptions(precision="fp32"))(x)[0]
    with Runtime(model_dir, precision="fp32", plan="single", max_batch=4, inflight=1) as rt:
        assert "in this process" in rt.plan.reason
        slot = rt._slots.queue[0]
        assert list(slot.full.get_compiled_model().inputs[0].get_partial_shape().to_shape()) == [4, 3, 64, 64]
        full, part = rt.infer(x), rt.infer(x[:2])
    assert rel_l2(full, ref) <= 1e-5 and rel_l2(part, ref[:2]) <= 1e-5
