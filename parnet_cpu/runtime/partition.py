"""Cut an exported ParNet IR (FP32 or INT8) into stages at its named stage tensors.

The IR carries the names `stem`, `inits1`, `stream1..3` (see `parnet_cpu.export`). A stage is the
subgraph between some named tensors and others: each input tensor's consumers are rewired to a new
Parameter, so an INT8 stage keeps exactly the FakeQuantize nodes (and parameters) of the whole model.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from parnet_cpu.artifacts import INPUT_NAME, OUTPUT_NAME


@dataclass(frozen=True)
class Stage:
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


NUM_STREAMS = 3  # ParNet's parallel streams: one core group (worker) each in the multi-stream plan
STREAM_STAGES = tuple(f"stream{i}" for i in range(1, NUM_STREAMS + 1))  # ("stream1", "stream2", "stream3")

# inits1 is recomputed by streams 2 and 3 (as the authors' multi-GPU code does) ...
RECOMPUTE_STAGES = (
    Stage("stem", (INPUT_NAME,), ("stem",)),
    Stage("stream1", ("stem",), ("stream1",)),
    Stage("stream2", ("stem",), ("stream2",)),
    Stage("stream3", ("stem",), ("stream3",)),
    Stage("tail", ("stream1", "stream2", "stream3"), (OUTPUT_NAME,)),
)
# ... or computed once by stream 2's group and handed to stream 3.
SHARE_STAGES = (
    Stage("stem", (INPUT_NAME,), ("stem",)),
    Stage("stream1", ("stem",), ("stream1",)),
    Stage("inits1", ("stem",), ("inits1",)),
    Stage("stream2", ("inits1",), ("stream2",)),
    Stage("stream3", ("inits1",), ("stream3",)),
    Stage("tail", ("stream1", "stream2", "stream3"), (OUTPUT_NAME,)),
)
SINGLE_STAGES = (Stage("model", (INPUT_NAME,), (OUTPUT_NAME,)),)


def _named_ports(model) -> dict[str, object]:
    ports = {}
    for op in model.get_ops():
        if op.get_type_name() == "Result":
            continue
        for out in op.outputs():
            for name in out.get_names():
                ports[name] = out
    return ports


def _single_fake_quantize(port):
    """The FakeQuantize node that is the only consumer of `port`, if any (INT8 IRs)."""
    consumers = {t.get_node() for t in port.get_target_inputs()}
    if len(consumers) == 1:
        node = next(iter(consumers))
        if node.get_type_name() == "FakeQuantize" and node.input_value(0) == port:
            return node
    return None


def cut_stage(ir_path: str | Path, stage: Stage):
    """A fresh `ov.Model` computing `stage.outputs` from `stage.inputs` of the IR at `ir_path`."""
    import openvino as ov

    from parnet_cpu.system.openvino_core import core

    model = core().read_model(str(ir_path))  # a private copy: the rewiring below mutates it
    ports = _named_ports(model)
    missing = [n for n in stage.inputs + stage.outputs if n not in ports and n != INPUT_NAME]
    if missing:
        raise ValueError(f"{ir_path}: tensors {missing} not found; re-export the model with this version")
    params = []
    for name in stage.inputs:
        if name == INPUT_NAME:
            params.append(model.get_parameters()[0])
            continue
        port = ports[name]
        param = ov.opset13.parameter(port.get_partial_shape(), port.get_element_type(), name=name)
        param.output(0).set_names({name})
        fq = _single_fake_quantize(port)
        if fq is not None:
            # INT8: the producer stage hands over the quantized values (see below); quantizing them
            # again with the same FakeQuantize is the identity on its grid, and keeps OpenVINO's u8
            # convs here. Cutting before the FakeQuantize instead moves the requantization out of the
            # producing conv and changes rounding (measured ~1e-3..6e-3 relative on the logits).
            port = fq.output(0)
            fq_in = [param.output(0)] + [fq.input_value(i) for i in range(1, 5)]
            param_out = ov.opset13.fake_quantize(*fq_in, fq.get_attributes()["levels"]).output(0)
        else:
            param_out = param.output(0)
        for target in list(port.get_target_inputs()):
            target.replace_source_output(param_out)
        params.append(param)
    results = []
    for name in stage.outputs:
        fq = _single_fake_quantize(ports[name])
        result = ov.opset13.result(fq.output(0) if fq is not None else ports[name])
        result.output(0).set_names({name})
        results.append(result)
    return ov.Model(results, params, stage.name)
