"""Reparameterization: fold each ParNet block's branches into one 3x3 conv.

What is folded (all exact in real arithmetic):
- every conv+BN pair -> conv with bias;
- the 1x1 branch -> the centre tap of the 3x3 kernel;
- the stride-2 branch avgpool(2x2)+1x1 -> the 1x1 weights / 4 on taps (1..2, 1..2) of the 3x3,
  stride-2 window (exact when the input side is even, which every ParNet stage guarantees);
- the identity BN and the two-input BNs -> per-channel scale and shift. They are not folded into a
  conv: the SSE gate multiplies the identity output, and folding a BN into a following *padded* conv
  is wrong at the borders.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from parnet_cpu.models.parnet import (ChannelAffine, DualAffine, DualBN, ParNet, ParNetBlock,
                                      ParNetBlockDeploy)


def bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as y = x*scale + shift."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of the single conv equal to bn(conv(x))."""
    scale, shift = bn_scale_shift(bn)
    return conv.weight * scale.view(-1, 1, 1, 1), shift


def pointwise_as_3x3(weight_1x1: torch.Tensor, stride: int) -> torch.Tensor:
    """Embed a 1x1 kernel (optionally preceded by a 2x2/stride-2 average pool) in a 3x3 kernel."""
    out = torch.zeros(*weight_1x1.shape[:2], 3, 3, dtype=weight_1x1.dtype)
    if stride == 1:
        out[:, :, 1, 1] = weight_1x1[:, :, 0, 0]
    else:  # window of a stride-2, pad-1 3x3 conv at output i covers input rows 2i-1..2i+1; the pool covers 2i..2i+1
        out[:, :, 1:3, 1:3] = weight_1x1 / 4.0
    return out


def affine_from_bn(bn: nn.BatchNorm2d) -> ChannelAffine:
    affine = ChannelAffine(bn.num_features)
    scale, shift = bn_scale_shift(bn)
    affine.scale.data.copy_(scale)
    affine.shift.data.copy_(shift)
    return affine


@torch.no_grad()
def fuse_block(block: ParNetBlock) -> ParNetBlockDeploy:
    """Deploy form of one training-form block (the block itself is not modified)."""
    fused = ParNetBlockDeploy(block.in_ch, block.out_ch, block.stride, block.groups, block.activation,
                              has_identity=block.identity_bn is not None)
    w3, b3 = fuse_conv_bn(block.dense.conv, block.dense.bn)
    w1, b1 = fuse_conv_bn(block.pointwise.conv, block.pointwise.bn)
    fused.conv.weight.copy_(w3 + pointwise_as_3x3(w1, block.stride))
    fused.conv.bias.copy_(b3 + b1)
    if block.identity_bn is not None:
        fused.identity = affine_from_bn(block.identity_bn)
    fused.se.conv.weight.copy_(block.se.conv.weight)
    return fused.train(block.training)


def _fuse_children(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, ParNetBlock):
            setattr(module, name, fuse_block(child))
        elif isinstance(child, DualBN):
            dual = DualAffine(child.b1.num_features)
            dual.b1, dual.b2 = affine_from_bn(child.b1), affine_from_bn(child.b2)
            setattr(module, name, dual)
        else:
            _fuse_children(child)


@torch.no_grad()
def reparameterize(model: ParNet) -> ParNet:
    """Return the deploy form of `model` as a new module in eval mode; `model` is left untouched."""
    if not isinstance(model, ParNet):
        raise TypeError(f"expected a ParNet, got {type(model).__name__}")
    deploy = copy.deepcopy(model)
    _fuse_children(deploy)
    return deploy.eval()
