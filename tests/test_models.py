"""Model zoo: exact parameter counts, reparameterization equivalence, configuration errors."""
from __future__ import annotations

import pytest
import torch

import parnet_cpu
from conftest import randomize_bn, rel_l2, slow_param
from parnet_cpu.models.parnet import (ChannelAffine, ParNetBlock, ParNetBlockDeploy, ParNetConfig, count_parameters, create_model)

# exact counts from the facts file (authors' code, training form; the paper's counts are the fused ones)
PARAMS = {
    "parnet_s": (20_930_936, 19_128_980),
    "parnet_m": (38_953_256, 35_576_616),
    "parnet_l": (60_180_008, 54_914_824),
    "parnet_xl": (93_176_168, 84_962_784),
}


@pytest.mark.parametrize("name", [n if n == "parnet_s" else slow_param(n) for n in sorted(PARAMS)])
def test_parameter_counts_both_forms(name):
    model = create_model(name)
    deploy = parnet_cpu.reparameterize(model)
    assert (count_parameters(model), count_parameters(deploy)) == PARAMS[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PARAMS))
def test_reparameterization_equivalence_every_variant(name):
    torch.manual_seed(0)
    model = create_model(name)
    randomize_bn(model, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deploy = parnet_cpu.reparameterize(model)
    assert deploy is not model and deploy.is_deploy and not model.is_deploy
    for batch in (1, 4):
        x = torch.randn(batch, 3, 224, 224)
        with torch.no_grad():
            ref, out = model(x), deploy(x)
        assert out.shape == (batch, 1000)
        assert rel_l2(out, ref) <= 1e-5
    # the training model is left untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


BLOCK_KINDS = [
    # (in, out, stride, groups): stream block with SSE identity, strided downsample, grouped fusion block,
    # grouped strided fusion block, stem block from 3 channels
    (32, 32, 1, 1), (32, 64, 2, 1), (128, 64, 1, 2), (64, 96, 2, 2), (3, 16, 2, 1),
]


@pytest.mark.parametrize("in_ch,out_ch,stride,groups", BLOCK_KINDS)
@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_each_block_type_fuses_exactly(in_ch, out_ch, stride, groups, activation):
    torch.manual_seed(0)
    block = ParNetBlock(in_ch, out_ch, stride, groups, activation).eval()
    randomize_bn(block)
    with torch.no_grad():
        block.se.conv.weight.mul_(3.0)  # make the gate matter
    fused = block.reparameterize()
    assert isinstance(fused, ParNetBlockDeploy)
    assert isinstance(fused.identity, ChannelAffine) == (in_ch == out_ch and stride == 1)
    for batch in (1, 4):
        x = torch.randn(batch, in_ch, 16, 16)
        with torch.no_grad():
            assert rel_l2(fused(x), block(x)) <= 1e-5


def test_narrow_and_cifar_configs_fuse(narrow_model):
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert rel_l2(parnet_cpu.reparameterize(narrow_model)(x), narrow_model(x)) <= 1e-5
    cifar = create_model("parnet_cifar10", planes=(16, 32, 64, 128))
    randomize_bn(cifar)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = cifar(x)
        assert out.shape == (2, 10)
        assert rel_l2(parnet_cpu.reparameterize(cifar)(x), out) <= 1e-5


def test_stage_functions_compose_to_forward(narrow_model):
    m = narrow_model
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        s = m.forward_stem(x)
        x2 = m.forward_inits1(s)
        y1, y2, y3 = m.forward_stream1(s), m.forward_stream2(x2), m.forward_stream3(x2)
        assert s.shape[-1] == 16 and x2.shape[-1] == 8 and y3.shape[-1] == 4 and y1.shape[-1] == 8
        assert torch.equal(m.forward_tail(y1, y2, y3), m(x))


@pytest.mark.parametrize("bad", [
    dict(planes=(16, 32, 64)), dict(num_blocks=(5, 6, 6, 2)), dict(activation="gelu"),
    dict(input_size=100), dict(stem_stride=3),
])
def test_bad_configs_are_rejected(bad):
    with pytest.raises(ValueError):
        ParNetConfig(**{**dict(planes=(16, 32, 64, 128)), **bad})


def test_unknown_model_name_lists_the_choices():
    with pytest.raises(ValueError, match="parnet_s"):
        create_model("parnet_q")


def test_importing_the_package_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, parnet_cpu, parnet_cpu.artifacts; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
