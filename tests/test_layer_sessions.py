"""Layer-by-layer runs (StagedRuns): cuts at the residual stream, stages following weight changes, no cut where a
layer reads the stream around it."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from pass_testing import load
from qexport.calibration import layer_sessions
from qexport.calibration.calibrator import Calibrator
from qexport.passes._ir import new_initializer
from qexport.passes.quantize.gptq import GptqPass
from qexport.calibration.layer_sessions import StagedRuns
from qexport.passes.discovery.linear_select import selected_linears
from qexport.passes.metadata import Meta
from qexport.passes.discovery.names import NameFilter
from qexport.passes.discovery.residual import find_residual_stream


def _weight_codes(model) -> dict[str, np.ndarray]:
    return {n.name: n.inputs[0].const_value.numpy().astype(np.int8) for n in model.graph
            if n.metadata_props.get(Meta.QUANT) == "weight"}


def linear_role(lin) -> str:
    return lin.node.metadata_props[Meta.ROLE].split(".", 2)[2]


def _site_inputs(model, pattern):
    return list(dict.fromkeys(lin.input for lin in selected_linears(model, NameFilter((pattern,)), False)))


def test_staged_runs_from_cuts_inside_the_model_follow_weight_changes(tiny_export):
    """Four stages (attention, then MLP inputs of each layer: cuts at each residual add), an earlier weight changed
    between stages: each stage's values equal a whole-graph run of the model as it is at that stage."""
    from qexport.calibration.stats import run_values

    windows = tuple(np.arange(3 + 50 * i, 40 + 50 * i, dtype=np.int64) for i in range(2))
    model = load(tiny_export("llama"))
    stages = [_site_inputs(model, f"layers.{i}.{part}") for i in (0, 1) for part in ("attn.[qkv]", "mlp.[gu]*")]
    writers = [lin.weight for lin in selected_linears(model, NameFilter(), False) if linear_role(lin) in ("attn.o", "mlp.down")]
    runs = StagedRuns(model, stages, windows)
    stream = layer_sessions.stream_values(model)
    assert runs.cuts == stream[:4]
    for k, stage in enumerate(stages):
        got = list(runs.run(k))
        whole = list(run_values(model, [v.name for v in stage], windows))
        for g, w in zip(got, whole):
            for v in stage:
                np.testing.assert_allclose(g[v.name], w[v.name], rtol=1e-6, atol=1e-6 * np.abs(w[v.name]).max())
        weight = writers[k]  # the branch writer just before the next cut: only the cached stream carries it on
        weight.const_value = ir.tensor(weight.const_value.numpy() * 0.5, name=weight.name)
    assert runs.from_cache == 3


def test_a_layer_reading_the_stream_around_the_cut_has_no_cut(tiny_export):
    """Layer 1's norm also reads the embedding (x - 0 * embedding: the same values): no cut serves layer 1, which
    then runs from the embedding output, and sequential GPTQ gives the codes of the unmodified graph."""
    windows = tuple(np.arange(3 + 60 * i, 67 + 60 * i, dtype=np.int64) for i in range(2))
    settings = dict(calibrator=Calibrator(windows), weights="int4", group_size=32, sequential=True)
    model = load(tiny_export("llama"))
    stream = layer_sessions.stream_values(model)
    residual_add = find_residual_stream(model).blocks[2].add
    graph = model.graph
    zero = ir.node("Mul", [stream[0], new_initializer(graph, "zero", np.zeros((), np.float32))])
    around = ir.node("Sub", [stream[2], zero.outputs[0]])
    graph.insert_after(stream[2].producer(), [zero, around])
    for node, index in list(stream[2].uses()):
        if node is not residual_add and node is not around:
            node.replace_input_with(index, around.outputs[0])
    depths = layer_sessions.stream_depths(model, stream)
    assert layer_sessions.find_cut(graph, _site_inputs(model, "layers.1.*"), stream, depths) is None
    assert layer_sessions.find_cut(graph, _site_inputs(model, "layers.0.*"), stream, depths) is stream[0]
    GptqPass(**settings)(model)
    reference = load(tiny_export("llama"))
    GptqPass(**settings)(reference)
    a, b = _weight_codes(model), _weight_codes(reference)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
