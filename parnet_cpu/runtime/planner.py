"""How much work each stage of the multi-stream plan does, and how many cores each stream gets.

Torch-free. The MACs come from the IR's shapes (`macs.op_macs`: Convolution weights are
[C_out, C_in, kH, kW], so one output costs C_in*kH*kW MACs; GroupConvolution [G, C_out/G, C_in/G, kH, kW]
costs C_in/G*kH*kW). Core groups are sized in proportion to each stream group's MACs, so the most
expensive stream gets the most cores (the count that ignored C_in did the opposite: it weighed the
cheap, wide-at-56x56 stream 1 heaviest).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from parnet_cpu.runtime.cores import proportional_sizes
from parnet_cpu.runtime.macs import model_macs
from parnet_cpu.runtime.partition import Stage

STREAM_STAGES = ("stream1", "stream2", "stream3")


def stage_macs(ir_path: str | Path, stages: Sequence[Stage]) -> dict[str, float]:
    """MACs per image of each stage (convolutions and the classifier), counted on the cut subgraph."""
    from parnet_cpu.runtime.partition import cut_stage

    return {stage.name: model_macs(cut_stage(ir_path, stage)) for stage in stages}


def stream_costs(macs: dict[str, float]) -> list[float]:
    """Work of the three stream groups. With a shared `inits1` stage (SHARE_STAGES) stream 2's group
    computes it; with RECOMPUTE_STAGES it is already inside the stream2 and stream3 stages."""
    return [macs["stream1"], macs["stream2"] + macs.get("inits1", 0.0), macs["stream3"]]


def stream_group_sizes(ir_path: str | Path, stages: Sequence[Stage], total: int) -> tuple[list[int], list[float]]:
    """(cores per stream group, MACs per stream group) for `total` physical cores, sizes in proportion
    to the MACs (largest remainder, at least one core each)."""
    macs = stage_macs(ir_path, [s for s in stages if s.name in STREAM_STAGES or s.name == "inits1"])
    costs = stream_costs(macs)
    return proportional_sizes(costs, total), costs
