"""Split each fused causal ``Attention`` node's queries into chunks that skip the keys the mask hides.

ONNX Runtime's CPU ``Attention`` kernel computes every query against every key and masks afterwards, so a
causal prefill of S tokens does twice the work it needs. Query rows ``[a, b)`` of a causal layer can only
see keys ``[0, P + b)`` (P: the cached length), so the rows are cut into ``chunks`` pieces, each attending
to its own key prefix: ``(chunks + 1) / (2 * chunks)`` of the products (5/8 for 4 chunks). Each chunk's
softmax drops only keys whose mask entry is the exporter's minimum, whose weight is exactly 0 in float32,
so the result is the same as the single node's.

Matched: ``Attention(q, k, v, mask)`` nodes that ``ort-attention`` inserted (its metadata), with 4-D
q/k/v and the exporter's additive mask ``Where(cond, 0, float32 min)``. The mask is causal because the
graph is a causal LM's export; the pass relies on that and checks only the mask's form. Each node becomes
``If(S >= min_rows)``: the chunked nodes when true, the original node when false (decode steps, short
prompts; ``Attention`` rejects an empty chunk). Chunk bounds and mask slices are computed once per mask.
A graph without such nodes, or a second run, is reported unmodified.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from qexport.errors import RecipeError
from qexport.passes._ir import append_node, const_array, new_initializer, producer_of
from qexport.passes.metadata import Meta
from qexport.passes.ort.attention import MASK_MIN

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ChunkMatch:
    """A fused ``Attention(q, k, v, mask)`` whose mask is the exporter's causal additive mask."""

    node: ir.Node
    query: ir.Value  # [B, H, S, D]
    key: ir.Value  # [B, H_kv, P + S, D]
    value: ir.Value
    mask: ir.Value  # [B, 1, S, P + S]


def _is_exporter_mask(mask: ir.Value) -> bool:
    where = producer_of(mask, "Where")
    if where is None:
        return False
    zero, low = const_array(where.inputs[1]), const_array(where.inputs[2])
    return (zero is not None and low is not None and zero.size == low.size == 1
            and float(zero.reshape(-1)[0]) == 0.0 and float(low.reshape(-1)[0]) == MASK_MIN)


def match_chunkable(node: ir.Node) -> ChunkMatch | None:
    """The match for ``node`` when it is a fused attention this pass can chunk, else None."""
    if node.op_type != "Attention" or node.domain != "" or Meta.ATTENTION not in node.metadata_props:
        return None
    if len(node.inputs) != 4 or any(v is None for v in node.inputs) or len(node.outputs) != 1:
        log.debug("%s: not (q, k, v, mask) with one output", node.name)
        return None
    query, key, value, mask = node.inputs
    if any(v.shape is None or v.shape.rank() != 4 for v in (query, key, value, mask)):
        log.debug("%s: q/k/v/mask are not all 4-D", node.name)
        return None
    if not _is_exporter_mask(mask):
        log.debug("%s: the mask is not the exporter's Where(cond, 0, min)", node.name)
        return None
    return ChunkMatch(node, query, key, value, mask)


@dataclasses.dataclass(frozen=True)
class _Bounds:
    """Per mask: the If condition, the chunks' row counts, key ends and mask slices."""

    cond: ir.Value
    sizes: ir.Value  # [chunks] int64: rows per chunk
    zero: ir.Value  # [0]
    axis: ir.Value  # [2]: the sequence axis of q, k, v
    key_ends: list[ir.Value]  # [1] int64 each: P + the chunk's last row + 1
    masks: list[ir.Value]  # the chunk's rows of the mask, its keys only


@dataclasses.dataclass(frozen=True)
class OrtAttentionChunksPass(ir.passes.InPlacePass):
    """Chunk the queries of each fused causal ``Attention`` (see the module docstring). Lossless."""

    chunks: int = 4
    min_rows: int = 128  # chunk when the step has at least this many query rows

    def __post_init__(self):
        if self.chunks < 2:
            raise RecipeError(f"ort-attention-chunks: chunks must be at least 2, got {self.chunks}")
        if self.min_rows < self.chunks:
            raise RecipeError(f"ort-attention-chunks: min_rows ({self.min_rows}) must be at least chunks "
                             f"({self.chunks}) so that no chunk is empty")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        matches = [m for node in graph if (m := match_chunkable(node)) is not None]
        if not matches:
            return ir.passes.PassResult(model, False)
        bounds: dict[ir.Value, _Bounds] = {}
        for index, match in enumerate(matches):
            if match.mask not in bounds:
                bounds[match.mask] = self._bounds(graph, match, f"qexport.attention_chunks.mask{len(bounds)}")
            self._chunk(graph, match, bounds[match.mask], f"qexport.attention_chunks.{index}")
        log.info("split the queries of %d attention nodes into %d chunks (when >= %d rows)",
                 len(matches), self.chunks, self.min_rows)
        return ir.passes.PassResult(model, True)

    def _bounds(self, graph: ir.Graph, match: ChunkMatch, base: str) -> _Bounds:
        c = lambda name, array: new_initializer(graph, f"{base}.{name}", np.array(array, np.int64))  # noqa: E731
        nodes: list[ir.Node] = []
        add = lambda op, inputs, suffix, **attrs: append_node(nodes, op, inputs, f"{base}.{suffix}", **attrs)  # noqa: E731
        rows = add("Shape", [match.mask], "rows", start=2, end=3)  # [S]
        total = add("Shape", [match.mask], "total", start=3, end=4)  # [P + S]
        past = add("Sub", [total, rows], "past")
        cond = add("GreaterOrEqual", [rows, c("min_rows", [self.min_rows])], "cond")
        zero, count = c("zero", [0]), c("chunks", [self.chunks])
        ends = [add("Div", [add("Mul", [rows, c(f"k{i}", [i])], f"rows_x{i}"), count], f"end{i}")
                for i in range(1, self.chunks)] + [rows]
        starts = [zero] + ends[:-1]
        key_ends = [add("Add", [past, end], f"key_end{i}") for i, end in enumerate(ends[:-1])] + [total]
        sizes = add("Concat", [add("Sub", [end, start], f"size{i}") for i, (start, end) in enumerate(zip(starts, ends))],
                    "sizes", axis=0)
        axes = c("axes", [2, 3])
        masks = []
        for i, (start, end, key_end) in enumerate(zip(starts, ends, key_ends)):
            lo = add("Concat", [start, zero], f"lo{i}", axis=0)
            hi = add("Concat", [end, key_end], f"hi{i}", axis=0)
            masks.append(add("Slice", [match.mask, lo, hi, axes], f"mask{i}"))
        producer = match.mask.producer()
        graph.insert_after(producer, nodes)
        return _Bounds(cond, sizes, zero, c("axis", [2]), key_ends, masks)

    def _chunk(self, graph: ir.Graph, match: ChunkMatch, bounds: _Bounds, base: str) -> None:
        node, axis = match.node, bounds.axis
        attrs = {name: attr.value for name, attr in node.attributes.items()}
        then: list[ir.Node] = []
        split = ir.node("Split", [match.query, bounds.sizes], attributes={"axis": 2}, num_outputs=self.chunks,
                        name=f"{base}.then.q")
        for i, q in enumerate(split.outputs):
            q.name = f"{base}.then.q{i}"
        then.append(split)
        outs, name = [], f"{base}.then"
        for i, q in enumerate(split.outputs):
            if i == self.chunks - 1:
                k, v = match.key, match.value
            else:
                k = append_node(then, "Slice", [match.key, bounds.zero, bounds.key_ends[i], axis], f"{name}.k{i}")
                v = append_node(then, "Slice", [match.value, bounds.zero, bounds.key_ends[i], axis], f"{name}.v{i}")
            outs.append(append_node(then, "Attention", [q, k, v, bounds.masks[i]], f"{name}.y{i}", **attrs))
        joined = append_node(then, "Concat", outs, f"{name}.y", axis=2)
        otherwise: list[ir.Node] = []
        whole = append_node(otherwise, "Attention", list(node.inputs), f"{base}.else.y", **attrs)
        for inner in then + otherwise:
            if inner.op_type == "Attention":
                inner.metadata_props[Meta.ATTENTION] = node.metadata_props[Meta.ATTENTION]
        for value in (joined, whole):
            value.dtype, value.shape = node.outputs[0].dtype, node.outputs[0].shape
        choose = ir.node("If", [bounds.cond], name=base, attributes={
            "then_branch": ir.Graph([], [joined], nodes=then, name=f"{base}.then"),
            "else_branch": ir.Graph([], [whole], nodes=otherwise, name=f"{base}.else")})
        choose.metadata_props[Meta.ATTENTION_CHUNKS] = str(self.chunks)
        result = choose.outputs[0]
        result.name, result.dtype, result.shape = base, node.outputs[0].dtype, node.outputs[0].shape
        graph.insert_before(node, choose)
        node.outputs[0].replace_all_uses_with(result)
        graph.remove(node, safe=True)
