"""Fuse a residual ``Add`` into the ``RMSNormalization`` that reads it: ``com.microsoft.SkipSimplifiedLayerNormalization``."""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir

from qexport.passes._ir import const_array, producer_of
from qexport.passes.metadata import Meta

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"


@dataclasses.dataclass(frozen=True)
class SkipNormMatch:
    """``RMSNormalization(Add(a, b), gamma)`` over the last axis, a and b of the same shape."""

    norm: ir.Node
    add: ir.Node
    epsilon: float


def _same_full_shape(a: ir.Value, b: ir.Value) -> bool:
    """Whether a and b have one known shape of rank 2 or 3 (no broadcasting in the Add)."""
    return a.shape is not None and b.shape is not None and len(a.shape) in (2, 3) and a.shape == b.shape \
        and isinstance(a.shape[-1], int)


def match_skip_norm(norm: ir.Node) -> SkipNormMatch | None:
    """The residual Add and RMSNorm at ``norm``, or None (the reason is logged at DEBUG); no graph output among them."""
    if norm.op_type != "RMSNormalization" or norm.domain != "" or len(norm.inputs) != 2:
        return None
    attrs = norm.attributes
    axis = attrs["axis"].value if "axis" in attrs else -1
    stash = attrs["stash_type"].value if "stash_type" in attrs else 1
    add, gamma = producer_of(norm.inputs[0], "Add"), const_array(norm.inputs[1])
    if add is None or gamma is None or gamma.ndim != 1 or stash != 1 or norm.inputs[0].dtype != ir.DataType.FLOAT:
        return None
    a, b = add.inputs
    rank = len(a.shape) if a.shape is not None else 0
    if axis not in (-1, rank - 1) or not _same_full_shape(a, b) or a.shape[-1] != gamma.shape[0] \
            or add.outputs[0].is_graph_output() or norm.outputs[0].is_graph_output():
        log.debug("%s: the Add broadcasts, or the norm is not over its last axis", norm.name)
        return None
    return SkipNormMatch(norm, add, float(attrs["epsilon"].value) if "epsilon" in attrs else 1e-5)


@dataclasses.dataclass(frozen=True)
class OrtSkipNormPass(ir.passes.InPlacePass):
    """Replace ``Add(a, b) -> RMSNormalization`` by one ``SkipSimplifiedLayerNormalization(a, b, gamma)``.

    Matched (after ``ort-rms-norm``): an RMSNormalization over the last axis, float32 stash, constant
    gamma, whose input is an Add of two same-shape [B, S, hidden] (or [tokens, hidden]) values, the
    residual stream and a block output. The node's fourth output, the sum, replaces the Add for its other
    readers (the next residual Add). One Add per norm; a pair with a graph output is left alone.

    Numerics: the same sum and normalization in float32, equal up to float rounding; one kernel and one
    pass over the rows in place of two. A graph without a match, or a second run, is reported unmodified.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        matches, adds = [], set()
        for node in graph:
            match = match_skip_norm(node)
            if match is not None and match.add not in adds:
                adds.add(match.add)
                matches.append(match)
        if not matches:
            return ir.passes.PassResult(model, False)
        graph.opset_imports.setdefault(MS_DOMAIN, 1)
        for index, match in enumerate(matches):
            _fuse(graph, match, f"qexport.skip_norm.{index}")
        log.info("fused %d residual Adds into SkipSimplifiedLayerNormalization nodes", len(matches))
        return ir.passes.PassResult(model, True)


def _fuse(graph: ir.Graph, match: SkipNormMatch, base: str) -> None:
    add, norm = match.add, match.norm
    node = ir.node("SkipSimplifiedLayerNormalization", [add.inputs[0], add.inputs[1], norm.inputs[1]],
                   attributes={"epsilon": match.epsilon}, domain=MS_DOMAIN, name=base, num_outputs=4)
    node.metadata_props[Meta.SKIP_NORM] = "1"
    out, _, _, total = node.outputs
    for new, old, label in ((out, norm.outputs[0], "out"), (total, add.outputs[0], "sum")):
        new.name, new.dtype, new.shape = f"{base}.{label}", old.dtype, old.shape
    graph.insert_before(add, node)
    norm.outputs[0].replace_all_uses_with(out)
    add.outputs[0].replace_all_uses_with(total)
    graph.remove([norm, add], safe=True)
