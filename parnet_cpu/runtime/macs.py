"""Multiply-accumulates of an OpenVINO graph, counted from its shapes (torch-free).

One counter for the whole project: `profile` divides it by measured time to get GMAC/s, and the planner
can use it to weigh stages. Counted ops: Convolution, GroupConvolution (weights [G, O/G, I/G, kh, kw])
and MatMul; everything else (pooling, elementwise, reorders) is memory-bound and counted as 0 MACs.
"""
from __future__ import annotations

import math


def op_macs(op) -> float:
    """MACs of one node per image (batch dimension excluded); 0 for nodes that do no matrix work or
    whose shapes are dynamic beyond the batch."""
    kind = op.get_type_name()
    if kind not in ("Convolution", "GroupConvolution", "MatMul"):
        return 0.0
    out = list(op.get_output_partial_shape(0))[1:]
    weights = list(op.input_value(1).get_partial_shape())
    if not all(d.is_static for d in out + weights):
        return 0.0
    outputs = math.prod(d.get_length() for d in out)
    w = [d.get_length() for d in weights]
    if kind == "MatMul":  # [N, K] x [K, M] (or transposed): one K-long dot product per output element
        transpose_b = bool(op.get_attributes().get("transpose_b", False))
        return float(outputs * (w[-1] if transpose_b else w[-2]))
    per_output = math.prod(w[1:]) if kind == "Convolution" else math.prod(w[2:])  # I*kh*kw or I/G*kh*kw
    return float(outputs * per_output)


def model_macs(model) -> float:
    """MACs per image of a whole `ov.Model` (FP32 or INT8 IR: the weights' shapes are the same)."""
    return float(sum(op_macs(op) for op in model.get_ops()))
