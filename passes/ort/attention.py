"""Fuse the exporter's decomposed attention into one ONNX ``Attention`` (opset 23) node for ONNX Runtime CPU."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from qexport.passes._ir import (append_node, const_array, new_initializer, producer_of, raise_default_opset,
                                 remove_dead_nodes)
from qexport.passes.metadata import Meta

log = logging.getLogger(__name__)

ATTENTION_OPSET = 23
MASK_MIN = float(np.finfo(np.float32).min)  # the exporter's "masked" value


@dataclasses.dataclass(frozen=True)
class AttentionMatch:
    """``MatMul(Softmax(MatMul(q * a, kᵀ * b) + mask), v)``, with k and v before any GQA head repeat."""

    softmax: ir.Node
    output: ir.Value  # the last MatMul's output, [B, H, S, D]
    query: ir.Value  # [B, H, S, D]
    key: ir.Value  # [B, H_kv, T, D]
    value: ir.Value  # [B, H_kv, T, D]
    mask: ir.Value | None  # additive float mask broadcastable to [B, H, S, T]
    scale: float


def _attr(node: ir.Node, name: str, default=None):
    return node.attributes[name].value if name in node.attributes else default


def _scalar(value: ir.Value | None) -> float | None:
    array = const_array(value)
    return float(array) if array is not None and array.size == 1 and array.dtype == np.float32 else None


def _unscaled(value: ir.Value) -> tuple[ir.Value, float]:
    """``x`` and ``c`` when ``value = Mul(x, c)`` with a scalar constant c, else (value, 1)."""
    mul = producer_of(value, "Mul")
    if mul is not None:
        for i in (0, 1):
            c = _scalar(mul.inputs[1 - i])
            if c is not None:
                return mul.inputs[i], c
    return value, 1.0


def _shape_slice(value: ir.Value | None) -> tuple[ir.Value, int, int] | None:
    """(x, start, end) when ``value = Slice(Shape(x), start, end)`` on axis 0 with step 1."""
    node = producer_of(value, "Slice")
    if node is None or len(node.inputs) < 3:
        return None
    shape = producer_of(node.inputs[0], "Shape")
    start, end = const_array(node.inputs[1]), const_array(node.inputs[2])
    extra = [const_array(v) if v is not None else None for v in node.inputs[3:5]]
    if shape is None or start is None or end is None or _attr(shape, "start") or _attr(shape, "end") is not None:
        return None
    if any(e is not None and int(e.reshape(-1)[0]) != d for e, d in zip(extra, (0, 1))):
        return None
    return shape.inputs[0], int(start.reshape(-1)[0]), int(end.reshape(-1)[0])


def _concat_of(value: ir.Value | None, source: ir.Value, parts: list) -> bool:
    """Whether ``value = Concat(parts)``, each part a constant [-1] or a (start, end) slice of Shape(source)."""
    node = producer_of(value, "Concat")
    if node is None or len(node.inputs) != len(parts):
        return False
    for v, part in zip(node.inputs, parts):
        if isinstance(part, int):
            array = const_array(v)
            if array is None or array.reshape(-1).tolist() != [part]:
                return False
        else:
            got = _shape_slice(v)
            if got is None or got[0] is not source or (got[1], got[2]) != part:
                return False
    return True


def _transposed_last_two(value: ir.Value) -> ir.Value | None:
    """x when ``value`` is x with its last two axes swapped: Transpose(0, 1, 3, 2), or the exporter's
    Reshape(x, [-1, T, D]) -> Transpose(0, 2, 1) -> Reshape([B, H, D, T]) with shapes sliced from Shape(x)."""
    node = producer_of(value, "Transpose")
    if node is not None and list(_attr(node, "perm", [])) == [0, 1, 3, 2]:
        return node.inputs[0]
    outer = producer_of(value, "Reshape")
    middle = producer_of(outer.inputs[0], "Transpose") if outer is not None else None
    inner = producer_of(middle.inputs[0], "Reshape") if middle is not None else None
    if inner is None or list(_attr(middle, "perm", [])) != [0, 2, 1]:
        return None
    x = inner.inputs[0]
    big, small = 2**63 - 1, -(2**63)
    if _concat_of(inner.inputs[1], x, [-1, (-2, -1), (-1, big)]) and \
            _concat_of(outer.inputs[1], x, [(small, -2), (-1, big), (-2, -1)]):
        return x
    return None


def _before_repeat(value: ir.Value) -> ir.Value:
    """x [B, H_kv, T, D] when ``value`` is the exporter's GQA repeat_kv of x (Unsqueeze(2), Expand, Reshape;
    full-range Slices in between are skipped), else ``value`` itself."""
    reshape = producer_of(value, "Reshape")
    expand = producer_of(reshape.inputs[0], "Expand") if reshape is not None else None
    current = expand.inputs[0] if expand is not None else None
    seen_unsqueeze = None
    while current is not None and (node := current.producer()) is not None and node.domain == "":
        if node.op_type == "Slice" and _is_full_slice(node):
            current = node.inputs[0]
        elif node.op_type == "Unsqueeze" and seen_unsqueeze is None and (axes := const_array(node.inputs[1])) is not None \
                and axes.reshape(-1).tolist() == [2]:
            seen_unsqueeze, current = node, node.inputs[0]
        else:
            break
    return current if seen_unsqueeze is not None and current is not None else value


def _is_full_slice(node: ir.Node) -> bool:
    starts, ends = const_array(node.inputs[1]), const_array(node.inputs[2])
    steps = const_array(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
    return starts is not None and ends is not None and not starts.any() and bool((ends >= 2**62).all()) \
        and (steps is None or bool((steps == 1).all()))


def _heads(value: ir.Value) -> int | None:
    shape = value.shape
    if shape is None or len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
        return None
    return shape[1]


def match_attention(softmax: ir.Node) -> AttentionMatch | None:
    """The attention core around ``softmax``, or None (the reason is logged at DEBUG)."""
    if softmax.op_type != "Softmax" or softmax.domain != "" or _attr(softmax, "axis", -1) not in (-1, 3):
        return None
    scores, mask = softmax.inputs[0], None
    add = producer_of(scores, "Add")
    if add is not None:
        first = next((i for i in (0, 1) if producer_of(add.inputs[i], "MatMul") is not None), None)
        if first is None:
            return None
        scores, mask = add.inputs[first], add.inputs[1 - first]
        if len(add.outputs[0].uses()) != 1 or mask.dtype != ir.DataType.FLOAT:
            return None
    qk = producer_of(scores, "MatMul")
    if qk is None or len(scores.uses()) != 1:
        return None
    (query, a), (key_t, b) = _unscaled(qk.inputs[0]), _unscaled(qk.inputs[1])
    key = _transposed_last_two(key_t)
    probs = softmax.outputs[0]
    uses = {node for node, _ in probs.uses()}
    where = next((n for n in uses if n.op_type == "Where"), None)
    if where is not None:  # the exporter's NaN guard: Where(IsNaN(p), 0, p)
        isnan = producer_of(where.inputs[0], "IsNaN")
        if isnan is None or isnan.inputs[0] is not probs or where.inputs[2] is not probs or _scalar(where.inputs[1]) != 0.0 \
                or uses != {isnan, where} or len(isnan.outputs[0].uses()) != 1:
            log.debug("%s: unexpected consumers of the softmax", softmax.name)
            return None
        probs = where.outputs[0]
    av = next((n for n, i in probs.uses() if n.op_type == "MatMul" and i == 0), None)
    if key is None or av is None or len(probs.uses()) != 1:
        log.debug("%s: not an attention core (k transpose or p @ v not found)", softmax.name)
        return None
    key, value = _before_repeat(key), _before_repeat(av.inputs[1])
    heads, kv_heads, v_heads = _heads(query), _heads(key), _heads(value)
    if heads is None or kv_heads is None or kv_heads != v_heads or heads % kv_heads:
        log.debug("%s: head counts %s / %s / %s are not static or not GQA", softmax.name, heads, kv_heads, v_heads)
        return None
    return AttentionMatch(softmax, av.outputs[0], query, key, value, mask, float(np.float32(a) * np.float32(b)))


@dataclasses.dataclass(frozen=True)
class OrtAttentionPass(ir.passes.InPlacePass):
    """Replace each exporter attention core by one ``Attention`` node (opset 23; ONNX Runtime's CPU kernel).

    Matched, from each Softmax: ``MatMul(q * a, kᵀ * b)`` (kᵀ a Transpose or the exporter's
    Reshape/Transpose/Reshape), an optional additive float mask, the optional NaN guard
    ``Where(IsNaN(p), 0, p)``, then ``MatMul(p, v)``; k and v are taken from before the exporter's GQA
    repeat (Unsqueeze(2) -> Expand -> Reshape), so the node reads the KV cache as it is (H_kv heads) and
    the repeat, transposes and guard become dead and are removed. ``scale = a * b``.

    Numerics: equal to the decomposed graph up to float rounding, including left padding. A query row
    whose mask is entirely the exporter's finite minimum (a padding token) gets uniform attention in the
    decomposed graph (the guard never fires: no NaN) but 0 from the fused kernel; the pass restores the
    decomposed value for such rows, ``y += dead_row * mean_t(v)`` (a few nodes on [B, H, S, D] and
    smaller, inside an ``If`` that skips them when no row is dead: a batch without padding), so padding
    positions' outputs and cache entries are unchanged too.

    The default-domain opset is raised to 23 (ONNX Runtime 1.23+). A graph without a matching core, or a
    second run, is reported unmodified. The node is ONNX Runtime specific in practice: keep the QDQ /
    decomposed form for TensorRT.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        matches = [m for node in graph if (m := match_attention(node)) is not None]
        if not matches:
            return ir.passes.PassResult(model, False)
        raise_default_opset(graph, ATTENTION_OPSET)
        dead_rows: dict[ir.Value, tuple[ir.Value, ir.Value]] = {}
        for index, match in enumerate(matches):
            _fuse(graph, match, f"qexport.attention.{index}", dead_rows)
        removed = remove_dead_nodes(graph)
        log.info("fused %d attention cores into Attention nodes (%d nodes removed)", len(matches), removed)
        return ir.passes.PassResult(model, True)


def _fuse(graph: ir.Graph, match: AttentionMatch, base: str, dead_rows: dict[ir.Value, tuple[ir.Value, ir.Value]]) -> None:
    nodes: list[ir.Node] = []
    inputs = [match.query, match.key, match.value] + ([match.mask] if match.mask is not None else [])
    attention = ir.node("Attention", inputs, attributes={"scale": match.scale}, name=base)
    attention.metadata_props[Meta.ATTENTION] = "1"
    result = attention.outputs[0]
    result.name, result.dtype, result.shape = base, match.output.dtype, match.output.shape
    nodes.append(attention)
    if match.mask is not None:
        result = _restore_dead_rows(graph, match, result, base, nodes, dead_rows)
    graph.insert_before(match.output.producer(), nodes)
    match.output.replace_all_uses_with(result)


def _restore_dead_rows(graph: ir.Graph, match: AttentionMatch, y: ir.Value, base: str, nodes: list[ir.Node],
                       dead_rows: dict[ir.Value, tuple[ir.Value, ir.Value]]) -> ir.Value:
    """y + dead * mean_t(v), head h reading kv head h // (H / H_kv), dead = 1 where a mask row is all minimum;
    inside ``If(any row dead)``, so a step without padding (one prompt, every decode step of it) skips it."""
    heads, kv_heads, head_dim = _heads(match.query), _heads(match.key), match.query.shape[3]
    if match.mask not in dead_rows:  # [B, 1, 1, S, 1] float and "any row dead", once per mask
        last = _shared(graph, "last_axis", np.array([-1], np.int64))
        row_max = append_node(nodes, "ReduceMax", [match.mask, last], f"{base}.mask_row_max")
        is_dead = append_node(nodes, "Equal", [row_max, _shared(graph, "masked", np.array(MASK_MIN, np.float32))], f"{base}.dead")
        dead = append_node(nodes, "Cast", [is_dead], f"{base}.dead_f", to=ir.DataType.FLOAT)
        dead5 = append_node(nodes, "Unsqueeze", [dead, _shared(graph, "axis1", np.array([1], np.int64))], f"{base}.dead5")
        any_dead = append_node(nodes, "ReduceMax", [dead], f"{base}.any_dead_f", keepdims=0)
        dead_rows[match.mask] = (dead5, append_node(nodes, "Cast", [any_dead], f"{base}.any_dead", to=ir.DataType.BOOL))
    dead5, any_dead = dead_rows[match.mask]
    split = new_initializer(graph, f"{base}.groups", np.array([0, kv_heads, heads // kv_heads, -1, head_dim], np.int64))
    merge = new_initializer(graph, f"{base}.heads", np.array([0, heads, -1, head_dim], np.int64))
    axis2 = _shared(graph, "axis2", np.array([2], np.int64))
    restore: list[ir.Node] = []
    mean_v = append_node(restore, "ReduceMean", [match.value, axis2], f"{base}.mean_v")  # [B, H_kv, 1, D]
    mean_v = append_node(restore, "Unsqueeze", [mean_v, axis2], f"{base}.mean_v5")  # [B, H_kv, 1, 1, D]
    fix = append_node(restore, "Mul", [dead5, mean_v], f"{base}.dead_fix")  # [B, H_kv, 1, S, D]
    grouped = append_node(restore, "Reshape", [y, split], f"{base}.grouped")
    fixed = append_node(restore, "Add", [grouped, fix], f"{base}.restored")
    restored = append_node(restore, "Reshape", [fixed, merge], f"{base}.restored4")
    unchanged: list[ir.Node] = []
    kept = append_node(unchanged, "Identity", [y], f"{base}.no_dead_rows")
    for value in (restored, kept):
        value.dtype, value.shape = match.output.dtype, match.output.shape
    branches = {"then_branch": ir.Graph([], [restored], nodes=restore, name=f"{base}.restore"),
                "else_branch": ir.Graph([], [kept], nodes=unchanged, name=f"{base}.keep")}
    out = append_node(nodes, "If", [any_dead], f"{base}.out", **branches)
    out.dtype, out.shape = match.output.dtype, match.output.shape
    return out


def _shared(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """The constant ``qexport.attention.<name>``, registered on first use."""
    existing = graph.initializers.get(f"qexport.attention.{name}")
    return existing if existing is not None else new_initializer(graph, f"qexport.attention.{name}", array)
