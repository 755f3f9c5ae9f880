"""Fuse the exporter's decomposed rotary position embedding into ONNX ``RotaryEmbedding`` (opset 23) nodes."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from qexport.passes._ir import (const_array, new_initializer, producer_of, raise_default_opset,
                                 remove_dead_nodes)
from qexport.passes.metadata import Meta

log = logging.getLogger(__name__)

ROTARY_OPSET = 23
_ELEMENTWISE = ("Cos", "Sin", "Mul", "Cast")  # what may lie between Concat(f, f) and the cos / sin tables


@dataclasses.dataclass(frozen=True)
class RotaryMatch:
    """``x * C + Concat(-x[..., h:], x[..., :h]) * S`` with C, S = Unsqueeze([B, S, 2h] cos / sin tables, 1)."""

    x: ir.Value  # [B, heads, S, 2h]
    cos: ir.Value  # [B, S, 2h], its two halves equal
    sin: ir.Value
    output: ir.Value


def _ints(value: ir.Value | None) -> list[int] | None:
    array = const_array(value) if value is not None else None
    return None if array is None or array.ndim > 1 else [int(v) for v in array.reshape(-1)]


def _last_axis_slice(node: ir.Node | None, x: ir.Value, rank: int) -> tuple[int, int] | None:
    """(start, end) of ``node`` = Slice(x, start, end) along the last axis with step 1, or None."""
    if node is None or node.op_type != "Slice" or node.inputs[0] is not x or len(node.inputs) < 4:
        return None
    starts, ends, axes = (_ints(v) for v in node.inputs[1:4])
    steps = _ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else [1]
    if not starts or not ends or not axes or len(starts) != 1 or axes[0] not in (-1, rank - 1) or steps != [1]:
        return None
    return starts[0], ends[0]


def _duplicated_halves(table: ir.Value) -> bool:
    """Whether ``table`` is an elementwise function (cos, sin, a scalar scaling) of ``Concat(f, f, axis=-1)``."""
    value = table
    for _ in range(4):
        node = value.producer()
        if node is None or node.domain != "":
            return False
        if node.op_type == "Concat":
            axis = node.attributes["axis"].value if "axis" in node.attributes else None
            return len(node.inputs) == 2 and node.inputs[0] is node.inputs[1] and axis == -1
        if node.op_type not in _ELEMENTWISE:
            return False
        if node.op_type == "Mul":
            scalar = [i for i in node.inputs if (a := const_array(i)) is not None and a.size == 1]
            others = [i for i in node.inputs if i not in scalar]
            if len(scalar) != 1 or len(others) != 1:
                return False
            value = others[0]
        else:
            value = node.inputs[0]
    return False


def _table(factor: ir.Value) -> ir.Value | None:
    """The [B, S, 2h] table ``factor`` = Unsqueeze(table, axes=[1]) broadcasts over heads, if its halves are equal."""
    unsqueeze = producer_of(factor, "Unsqueeze")
    if unsqueeze is None or _ints(unsqueeze.inputs[1] if len(unsqueeze.inputs) > 1 else None) != [1]:
        return None
    table = unsqueeze.inputs[0]
    return table if table is not None and _duplicated_halves(table) else None


def match_rotary(add: ir.Node) -> RotaryMatch | None:
    """The rotary embedding whose final ``Add`` is ``add``, or None."""
    if add.op_type != "Add" or add.domain != "" or len(add.inputs) != 2 or add.outputs[0].is_graph_output():
        return None
    for first, second in (add.inputs, add.inputs[::-1]):
        direct, rotated = producer_of(first, "Mul"), producer_of(second, "Mul")
        if direct is None or rotated is None:
            continue
        for x, cos_factor in (direct.inputs, direct.inputs[::-1]):
            for half, sin_factor in (rotated.inputs, rotated.inputs[::-1]):
                match = _match_parts(add, x, cos_factor, half, sin_factor)
                if match is not None:
                    return match
    return None


def _match_parts(add: ir.Node, x: ir.Value, cos_factor: ir.Value, half: ir.Value, sin_factor: ir.Value) -> RotaryMatch | None:
    if x is None or x.shape is None or len(x.shape) != 4 or not isinstance(x.shape[3], int) or x.shape[3] % 2:
        return None
    width = x.shape[3]
    concat = producer_of(half, "Concat")
    if concat is None or len(concat.inputs) != 2 or concat.attributes["axis"].value not in (-1, 3):
        return None
    neg = producer_of(concat.inputs[0], "Neg")
    upper = _last_axis_slice(neg.inputs[0].producer() if neg is not None else None, x, 4)
    lower = _last_axis_slice(concat.inputs[1].producer(), x, 4)
    if upper is None or lower is None or upper[0] != width // 2 or upper[1] < width or lower != (0, width // 2):
        return None
    cos, sin = _table(cos_factor), _table(sin_factor)
    if cos is None or sin is None:
        return None
    return RotaryMatch(x, cos, sin, add.outputs[0])


@dataclasses.dataclass(frozen=True)
class OrtRotaryPass(ir.passes.InPlacePass):
    """Replace each decomposed rotary embedding by ``RotaryEmbedding(x, cos[..., :h], sin[..., :h])`` (opset 23).

    Matched (the Hugging Face ``rotate_half`` form, as exported for Llama, Qwen2 and Gemma):
    ``Add(Mul(x, Unsqueeze(cos, 1)), Mul(Concat(Neg(x[..., h:]), x[..., :h]), Unsqueeze(sin, 1)))`` for x
    [B, heads, S, 2h], where the [B, S, 2h] ``cos`` / ``sin`` tables are elementwise functions of
    ``Concat(f, f)`` (so their two halves are equal, which RotaryEmbedding's half-width caches assume).
    One ``Slice`` per table gives the half-width cache, shared by every layer. Partial rotary (a rotated
    prefix of the head) is not matched and stays as it is.

    Numerics: x1 cos - x2 sin and x2 cos + x1 sin, the same products and sums in float32, equal up to float
    rounding; one kernel instead of seven nodes per query and key. The default-domain opset is raised to 23.
    A graph without a match, or a second run, is reported unmodified.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        matches = [m for node in graph if (m := match_rotary(node)) is not None]
        if not matches:
            return ir.passes.PassResult(model, False)
        raise_default_opset(graph, ROTARY_OPSET)
        halves: dict[ir.Value, ir.Value] = {}
        for index, match in enumerate(matches):
            _fuse(graph, match, f"qexport.rotary.{index}", halves)
        removed = remove_dead_nodes(graph)
        log.info("fused %d rotary embeddings into RotaryEmbedding nodes (%d nodes removed)", len(matches), removed)
        return ir.passes.PassResult(model, True)


def _half(graph: ir.Graph, table: ir.Value, width: int, halves: dict[ir.Value, ir.Value]) -> ir.Value:
    """``table[..., :width // 2]``, one Slice per table, inserted right after the table's producer."""
    if table not in halves:
        name = f"{table.name}.half"
        ints = lambda label, v: new_initializer(graph, f"{name}.{label}", np.array(v, dtype=np.int64))  # noqa: E731
        node = ir.node("Slice", [table, ints("start", [0]), ints("end", [width // 2]), ints("axis", [-1])], name=name)
        node.outputs[0].name, node.outputs[0].dtype = name, table.dtype
        graph.insert_after(table.producer(), node)
        halves[table] = node.outputs[0]
    return halves[table]


def _fuse(graph: ir.Graph, match: RotaryMatch, base: str, halves: dict[ir.Value, ir.Value]) -> None:
    width = match.x.shape[3]
    cos, sin = _half(graph, match.cos, width, halves), _half(graph, match.sin, width, halves)
    node = ir.node("RotaryEmbedding", [match.x, cos, sin], attributes={"interleaved": 0}, name=base)
    node.metadata_props[Meta.ROTARY] = "1"
    out = node.outputs[0]
    out.name, out.dtype, out.shape = base, match.output.dtype, match.output.shape
    graph.insert_before(match.output.producer(), node)
    match.output.replace_all_uses_with(out)
