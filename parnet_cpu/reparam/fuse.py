"""Reparameterization: the whole model's deploy form, built from each module's own `reparameterize()`.

What is folded (all exact in real arithmetic; the math lives next to the blocks, in models/parnet.py):
- every conv+BN pair -> conv with bias;
- the 1x1 branch -> the centre tap of the 3x3 kernel;
- the stride-2 branch avgpool(2x2)+1x1 -> the 1x1 weights / 4 on taps (1..2, 1..2) of the 3x3,
  stride-2 window (exact when the input side is even, which every ParNet stage guarantees);
- the identity BN and the two-input BNs -> per-channel scale and shift. They are not folded into a
  conv: the SSE gate multiplies the identity output, and folding a BN into a following *padded* conv
  is wrong at the borders.
This module only walks the model (models never import it: no cycle).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from parnet_cpu.models.parnet import ParNet

__all__ = ["reparameterize"]  # the folding math (fuse_conv_bn, bn_scale_shift, ...) is models.parnet's


def _fuse_children(module: nn.Module) -> None:
    """Replace, depth first, every child that knows its deploy form (timm's convention: a
    `reparameterize()` method) by that form."""
    for name, child in module.named_children():
        if callable(getattr(child, "reparameterize", None)):
            setattr(module, name, child.reparameterize())
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
