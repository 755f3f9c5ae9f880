"""Fuse the exporter's decomposed RMSNorm into one ONNX ``RMSNormalization`` (opset 23) node."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from qexport.passes._ir import const_array, new_initializer, raise_default_opset
from qexport.passes.metadata import Meta

log = logging.getLogger(__name__)

RMS_NORM_OPSET = 23


@dataclasses.dataclass(frozen=True)
class RmsNormMatch:
    """``x * Reciprocal(Sqrt(ReduceMean(Pow(x, 2), -1) + eps))`` (or ``x / Sqrt(...)``), then ``* gamma``."""

    x: ir.Value
    epsilon: float
    gamma: np.ndarray | None  # a constant [hidden] weight multiplied after the normalization
    output: ir.Value  # the last matched node's output
    nodes: tuple[ir.Node, ...]


def _only(value: ir.Value, op_type: str) -> ir.Node | None:
    """The single consumer of ``value`` when it is a default-domain ``op_type`` and value is not a graph output."""
    uses = value.uses()
    if len(uses) != 1 or value.is_graph_output():
        return None
    node = uses[0][0]
    return node if node.domain == "" and node.op_type == op_type else None


def _other(node: ir.Node, value: ir.Value) -> ir.Value | None:
    a, b = node.inputs[0], node.inputs[1]
    return b if a is value else a if b is value else None


def _last_axis_mean(node: ir.Node, rank: int) -> bool:
    axes = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if axes is None and "axes" in node.attributes:
        axes = np.asarray(node.attributes["axes"].value)
    keepdims = node.attributes["keepdims"].value if "keepdims" in node.attributes else 1
    return axes is not None and axes.size == 1 and int(axes.reshape(-1)[0]) in (-1, rank - 1) and keepdims == 1


def match_rms_norm(pow_node: ir.Node) -> RmsNormMatch | None:
    """The RMSNorm starting at ``pow_node``, or None; every intermediate value must have that one use."""
    if pow_node.op_type != "Pow" or pow_node.domain != "":
        return None
    x, two = pow_node.inputs[0], const_array(pow_node.inputs[1])
    if x is None or two is None or two.size != 1 or float(two.reshape(-1)[0]) != 2.0 or x.dtype != ir.DataType.FLOAT \
            or x.shape is None:
        return None
    mean = _only(pow_node.outputs[0], "ReduceMean")
    add = _only(mean.outputs[0], "Add") if mean is not None and _last_axis_mean(mean, len(x.shape)) else None
    eps = const_array(_other(add, mean.outputs[0])) if add is not None else None
    sqrt = _only(add.outputs[0], "Sqrt") if eps is not None and eps.size == 1 else None
    if sqrt is None:
        return None
    nodes = [pow_node, mean, add, sqrt]
    uses = sqrt.outputs[0].uses()
    if len(uses) != 1:
        return None
    nxt = uses[0][0]
    if nxt.op_type == "Div" and nxt.domain == "" and nxt.inputs[0] is x and nxt.inputs[1] is sqrt.outputs[0]:
        out = nxt
    elif (rec := _only(sqrt.outputs[0], "Reciprocal")) is not None and (mul := _only(rec.outputs[0], "Mul")) is not None \
            and _other(mul, rec.outputs[0]) is x:
        nodes.append(rec)
        out = mul
    else:
        return None
    nodes.append(out)
    gamma = None
    scale = _only(out.outputs[0], "Mul")
    if scale is not None:
        array = const_array(_other(scale, out.outputs[0]))
        if array is not None and array.ndim == 1 and isinstance(x.shape[-1], int) and array.shape[0] == x.shape[-1]:
            gamma, out = array.astype(np.float32), scale
            nodes.append(scale)
    return RmsNormMatch(x, float(eps.reshape(-1)[0]), gamma, out.outputs[0], tuple(nodes))


@dataclasses.dataclass(frozen=True)
class OrtRmsNormPass(ir.passes.InPlacePass):
    """Replace each decomposed RMSNorm by ``RMSNormalization(x, gamma, axis=-1, epsilon)`` (opset 23).

    Matched: ``Pow(x, 2) -> ReduceMean(last axis, keepdims) -> Add(eps) -> Sqrt -> Reciprocal -> Mul(x, .)``
    (or ``Div(x, Sqrt(.))``), each intermediate used once, then an optional ``Mul`` by a constant [hidden]
    gamma (ones when there is none, e.g. after fold-norm left gamma = 1 in place). Float32 only.
    Numerics: the same formula in float32 (the kernel's stash type), equal up to float rounding; one kernel
    in place of 5-7 passes over [B, S, hidden]. The default-domain opset is raised to 23. A graph without a
    match, or a second run, is reported unmodified.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        matches = [m for node in graph if (m := match_rms_norm(node)) is not None]
        if not matches:
            return ir.passes.PassResult(model, False)
        raise_default_opset(graph, RMS_NORM_OPSET)
        for index, match in enumerate(matches):
            _fuse(graph, match, f"qexport.rms_norm.{index}")
        log.info("fused %d RMSNorms into RMSNormalization nodes", len(matches))
        return ir.passes.PassResult(model, True)


def _fuse(graph: ir.Graph, match: RmsNormMatch, base: str) -> None:
    width = match.x.shape[-1]
    gamma = match.gamma if match.gamma is not None else np.ones(width, np.float32)
    scale = new_initializer(graph, f"{base}.scale", gamma)
    node = ir.node("RMSNormalization", [match.x, scale], attributes={"axis": -1, "epsilon": match.epsilon}, name=base)
    node.metadata_props[Meta.RMS_NORM] = "1"
    out = node.outputs[0]
    out.dtype, out.shape = match.output.dtype, match.output.shape
    graph.insert_before(match.nodes[0], [node])
    if match.output.is_graph_output():
        for i, value in enumerate(graph.outputs):
            if value is match.output:
                name, match.output.name = match.output.name, f"{match.output.name}_pre"
                out.name, graph.outputs[i] = name, out
    else:
        out.name = base
    match.output.replace_all_uses_with(out)
    for old in reversed(match.nodes):
        inputs = [v for v in old.inputs if v is not None]
        graph.remove(old, safe=True)
        for value in inputs:
            if value.is_initializer() and not value.uses() and not value.is_graph_output():
                del graph.initializers[value.name]
