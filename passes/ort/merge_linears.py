"""Merge the lowered linears that read one activation (q/k/v, gate/up) into one kernel call: ``MatMulIntegerToFloat``
(``ort-int8``) or ``MatMulNBits`` (``ort-nbits``, ``ort-int4``)."""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from qexport.errors import RecipeError
from qexport.passes._ir import const_array, drop_if_unused, new_initializer, set_graph_output
from qexport.passes.metadata import Meta
from qexport.passes.ort.int8 import MS_DOMAIN

log = logging.getLogger(__name__)


def _key(node: ir.Node) -> tuple | None:
    """What the linears that may merge share (A, its scale, its zero point, B's zero point), or None if ``node``
    cannot merge: a lowered MatMulIntegerToFloat with a constant 2-D int8 B and no B zero point, or uint8 B with a
    scalar B zero point (:class:`~qexport.passes.ort.int8.KernelWeights`), and 1-D per-column B scales."""
    if node.domain != MS_DOMAIN or node.op_type != "MatMulIntegerToFloat" or Meta.LOWERED not in node.metadata_props:
        return None
    inputs = list(node.inputs) + [None] * (7 - len(node.inputs))
    a, b, a_scale, b_scale, a_zp, b_zp, bias = inputs
    weight, scale = const_array(b), const_array(b_scale)
    if weight is None or weight.dtype not in (np.int8, np.uint8) or weight.ndim != 2 or scale is None \
            or scale.shape != weight.shape[1:]:
        return None
    zp = const_array(b_zp) if b_zp is not None else None
    if (weight.dtype == np.int8) != (b_zp is None) or (zp is not None and (zp.ndim != 0 or zp.dtype != np.uint8)):
        return None
    if bias is not None and (const_array(bias) is None or const_array(bias).ndim != 1):
        return None
    return (a, a_scale, a_zp, b_zp, weight.shape[0], bias is not None)


NBITS_ATTRIBUTES = ("K", "bits", "block_size", "accuracy_level")


def _nbits_key(node: ir.Node) -> tuple | None:
    """What lowered ``MatMulNBits`` nodes that may merge share (A, K, bits, block size, accuracy level, whether they
    have a bias), or None: constant packed B [N, K / block, bytes] and scales [N * K / block], no zero points or
    g_idx, a constant 1-D bias or none."""
    if node.domain != MS_DOMAIN or node.op_type != "MatMulNBits" or Meta.LOWERED not in node.metadata_props:
        return None
    inputs = list(node.inputs) + [None] * (6 - len(node.inputs))
    a, b, scales, zero_points, g_idx, bias = inputs[:6]
    if zero_points is not None or g_idx is not None or any(name not in node.attributes for name in NBITS_ATTRIBUTES):
        return None
    weight, scale = const_array(b), const_array(scales)
    n = node.attributes["N"].value if "N" in node.attributes else None
    if weight is None or scale is None or weight.ndim != 3 or n is None or weight.shape[0] != n or scale.size % n:
        return None
    if bias is not None and (const_array(bias) is None or const_array(bias).shape != (n,)):
        return None
    return ("nbits", a, *(node.attributes[name].value for name in NBITS_ATTRIBUTES), bias is not None)


@dataclasses.dataclass(frozen=True)
class MergeInt8LinearsPass(ir.passes.InPlacePass):
    """Replace the ``MatMulIntegerToFloat`` nodes that share their uint8 activation by one node and a Split; and the
    same for ``MatMulNBits`` nodes that share their float activation, K, bits, block size and accuracy level.

    Rewrite, for each group of >= 2 lowered linears (from :class:`~qexport.passes.ort.int8.LowerOrtPass`)
    with the same A, A scale and A zero point, constant weights B_i [K, N_i] (int8, or uint8 with one shared
    scalar B zero point) and per-column scales s_i:

    1. B = concat_i B_i along N, s = concat_i s_i (and the fused biases, when every member has one);
    2. ``MatMulIntegerToFloat(A, B, a_scale, s, a_zp[, b_zp, bias])`` then ``Split(axis=-1, [N_1, ...])``,
       each piece taking the place (and the consumers, graph output names included) of one old node.

    For MatMulNBits: the packed B [N_i, K / block, bytes], the scales (N_i * K / block, N-major) and the biases are
    concatenated along N and the attribute N is their sum. At accuracy level 4 the kernel rounds each row's blocks of
    A to int8 once per call, with the same scales whatever N is, so the merge keeps the integers too.

    Exact: each output column is the same integer dot product scaled by the same two factors, so the merged
    graph equals the unmerged one (up to the kernel's blocking of float accumulation). One pass over A in
    place of one per linear (q/k/v, gate/up), and a wider N for the GEMM.
    A graph with no such group is reported unmodified.

    ``max_columns``: a group whose merged width (sum of N_i) is larger stays separate (None: no limit). The
    Split copies the merged output once more, which for wide groups costs more than the merge saves (the
    profile behind the presets' limit is in docs/measurements.md).
    """

    lossless: ClassVar[bool] = True
    max_columns: int | None = None

    def __post_init__(self):
        if self.max_columns is not None and self.max_columns < 2:
            raise RecipeError(f"ort-merge-linears: max_columns must be at least 2 (or left out), got {self.max_columns}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        groups: dict[tuple, list[ir.Node]] = {}
        for node in graph:
            if (key := _key(node) or _nbits_key(node)) is not None:
                groups.setdefault(key, []).append(node)
        candidates = [nodes for nodes in groups.values() if len(nodes) > 1]
        merged = [nodes for nodes in candidates if self.max_columns is None or _width(nodes) <= self.max_columns]
        if len(merged) < len(candidates):
            log.info("left %d groups of linears separate (wider than max_columns %d)", len(candidates) - len(merged),
                     self.max_columns)
        for nodes in merged:
            (_merge_nbits if nodes[0].op_type == "MatMulNBits" else _merge)(graph, nodes)
        if merged:
            log.info("merged %d linears into %d", sum(map(len, merged)), len(merged))
        return ir.passes.PassResult(model, bool(merged))


def _width(nodes: list[ir.Node]) -> int:
    """The merged output width of ``nodes``: the sum of their weights' N."""
    return sum(int(n.attributes["N"].value) if n.op_type == "MatMulNBits" else int(const_array(n.inputs[1]).shape[1])
               for n in nodes)


def _merge(graph: ir.Graph, nodes: list[ir.Node]) -> None:
    first = nodes[0]
    base = f"{first.name}.merged"
    widths = [_width([n]) for n in nodes]
    weight = new_initializer(graph, f"{base}.w", np.concatenate([const_array(n.inputs[1]) for n in nodes], axis=1))
    scale = new_initializer(graph, f"{base}.w_scale", np.concatenate([const_array(n.inputs[3]) for n in nodes]))
    inputs = [first.inputs[0], weight, first.inputs[2], scale, first.inputs[4]]
    b_zp = first.inputs[5] if len(first.inputs) > 5 else None  # shared: part of the merge key
    has_bias = len(first.inputs) > 6 and first.inputs[6] is not None
    if b_zp is not None or has_bias:
        inputs.append(b_zp)
    if has_bias:
        inputs.append(new_initializer(graph, f"{base}.bias", np.concatenate([const_array(n.inputs[6]) for n in nodes])))
    matmul = ir.node("MatMulIntegerToFloat", inputs, domain=MS_DOMAIN, version=1, name=base)
    matmul.metadata_props[Meta.LOWERED] = "1"
    _replace(graph, nodes, matmul, base, widths)


def _merge_nbits(graph: ir.Graph, nodes: list[ir.Node]) -> None:
    first = nodes[0]
    base = f"{first.name}.merged"
    widths = [_width([n]) for n in nodes]
    weight = new_initializer(graph, f"{base}.w", np.concatenate([const_array(n.inputs[1]) for n in nodes], axis=0))
    scale = new_initializer(graph, f"{base}.w_scale", np.concatenate([const_array(n.inputs[2]).reshape(-1) for n in nodes]))
    inputs: list[ir.Value | None] = [first.inputs[0], weight, scale]
    if len(first.inputs) > 5 and first.inputs[5] is not None:  # every member has one: part of the merge key
        inputs += [None, None, new_initializer(graph, f"{base}.bias", np.concatenate([const_array(n.inputs[5]) for n in nodes]))]
    attributes = {name: first.attributes[name].value for name in NBITS_ATTRIBUTES}
    matmul = ir.node("MatMulNBits", inputs, domain=MS_DOMAIN, name=base, attributes={**attributes, "N": sum(widths)})
    matmul.metadata_props[Meta.LOWERED] = first.metadata_props[Meta.LOWERED]
    _replace(graph, nodes, matmul, base, widths)


def _replace(graph: ir.Graph, nodes: list[ir.Node], matmul: ir.Node, base: str, widths: list[int]) -> None:
    """Put ``matmul`` (all of ``nodes`` in one) and a Split of its output in place of ``nodes``."""
    first = nodes[0]
    matmul.metadata_props[Meta.MERGED_LINEARS] = ",".join(n.name or "" for n in nodes)
    out = matmul.outputs[0]
    out.name, out.dtype = base, first.outputs[0].dtype
    split_sizes = new_initializer(graph, f"{base}.split", np.array(widths, np.int64))
    split = ir.node("Split", [out, split_sizes], attributes={"axis": -1}, num_outputs=len(nodes), name=f"{base}.split")
    graph.insert_before(first, [matmul, split])
    for node, piece in zip(nodes, split.outputs):
        old = node.outputs[0]
        piece.name, piece.dtype, piece.shape = f"{base}.{node.name}", old.dtype, old.shape
        if old.is_graph_output():
            set_graph_output(graph, old, piece)
        old.replace_all_uses_with(piece)
    for node in nodes:
        olds = list(node.inputs)
        graph.remove(node, safe=True)
        for value in olds:
            if value is not None:
                drop_if_unused(graph, value)
