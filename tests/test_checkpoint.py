"""Checkpoints in the authors' exact layout (written by the test), our own format, and bad files."""
from __future__ import annotations

import argparse
import pickle

import pytest
import torch

import authors_reference
from conftest import NARROW, randomize_bn, rel_l2
from parnet_cpu.models.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from parnet_cpu.models.parnet import ParNetBlock, build_model, create_model


def authors_state_dict(model) -> dict:
    stride2 = {name for name, m in model.named_modules() if isinstance(m, ParNetBlock) and m.stride == 2}
    return {authors_reference.author_keys_for(k, stride2): v.clone() for k, v in model.state_dict().items()}


def write_authors_checkpoint(path, sd, prefix="module.", ema_scale=1.01):
    """A training checkpoint like the authors' files: state_dict, state_dict_ema and training extras."""
    obj = {
        "epoch": 299, "arch": "simplenet_repvgg", "version": 2, "metric": 78.55,
        "state_dict": {prefix + k: v for k, v in sd.items()},
        "state_dict_ema": {prefix + k: (v * ema_scale if v.is_floating_point() else v) for k, v in sd.items()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "momentum": 0.9}]},
        "args": argparse.Namespace(model="simplenet_repvgg", lr=0.1, epochs=300, batch_size=256),
    }
    torch.save(obj, path)


@pytest.fixture
def source_model():
    torch.manual_seed(3)
    m = create_model("parnet_s", **NARROW)
    randomize_bn(m, seed=5)
    return m


@pytest.mark.parametrize("prefix", ["module.", ""])
def test_authors_checkpoint_loads_strictly_and_computes_what_their_code_computes(tmp_path, source_model, prefix):
    sd = authors_state_dict(source_model)
    assert any(".block.rbr_1x1.1.conv.weight" in k for k in sd) and any(".block.rbr_identity." in k for k in sd)
    path = tmp_path / "parnet.pth.tar"
    write_authors_checkpoint(path, sd, prefix=prefix)

    model = create_model("parnet_s", checkpoint=str(path), **NARROW)
    for k, v in source_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        theirs = authors_reference.forward(torch.load(path, weights_only=False)["state_dict"], x)
        assert rel_l2(model(x), theirs) <= 1e-6


def test_ema_weights_are_selectable(tmp_path, source_model):
    path = tmp_path / "ema.pth.tar"
    write_authors_checkpoint(path, authors_state_dict(source_model), ema_scale=2.0)
    model = build_model(source_model.cfg)
    info = load_checkpoint(model, path, use_ema=True)
    assert info["ema"] and len(info["sha256"]) == 64 and info["arch"] == "simplenet_repvgg"
    w = "inits.0.0.dense.conv.weight"
    assert torch.allclose(model.state_dict()[w], 2.0 * source_model.state_dict()[w])


def test_own_format_roundtrip(tmp_path, source_model):
    path = tmp_path / "ours.pt"
    save_checkpoint(source_model, path, epoch=1)
    obj = read_checkpoint(path)
    assert obj["format"] == "parnet-cpu/1" and tuple(obj["config"]["planes"]) == NARROW["planes"]
    model = build_model(source_model.cfg)
    load_checkpoint(model, path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), source_model(x))


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path, source_model):
    sd = authors_state_dict(source_model)
    sd.pop("streams.1.2.block.rbr_dense.conv.weight")
    sd["streams.0.0.block.extra.weight"] = torch.zeros(3)
    sd["head.fc.bias"] = torch.zeros(7)
    path = tmp_path / "bad.pth.tar"
    write_authors_checkpoint(path, sd)
    with pytest.raises(CheckpointError) as e:
        create_model("parnet_s", checkpoint=str(path), **NARROW)
    msg = str(e.value)
    assert "streams.1.2.dense.conv.weight" in msg and "streams.0.0.block.extra.weight" in msg
    assert "head.fc.bias: checkpoint (7,) vs model (1000,)" in msg


def test_wrong_class_count_is_a_clear_error(tmp_path, source_model):
    path = tmp_path / "c.pt"
    save_checkpoint(source_model, path)
    with pytest.raises(CheckpointError, match="head.fc.weight"):
        create_model("parnet_s", num_classes=10, checkpoint=str(path), **NARROW)


def test_corrupt_and_missing_files(tmp_path, source_model):
    good = tmp_path / "good.pt"
    save_checkpoint(source_model, good)
    data = good.read_bytes()
    for name, blob in (("truncated.pt", data[: len(data) // 2]), ("garbage.pt", b"not a checkpoint at all"),
                       ("empty.pt", b"")):
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(CheckpointError, match="cannot read checkpoint"):
            read_checkpoint(tmp_path / name)
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "nope.pth.tar")


class Payload:  # an arbitrary class: a restricted loader must refuse to instantiate it
    def __reduce__(self):
        return (print, ("pwned",))


def test_untrusted_pickles_are_refused(tmp_path):
    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {}, "evil": Payload()}, path)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_checkpoint(path)
    path2 = tmp_path / "evil2.pkl"
    path2.write_bytes(pickle.dumps({"x": Payload()}))
    with pytest.raises(CheckpointError):
        read_checkpoint(path2)
