"""Lower the exporter's attention, KV-cache concat and rotary into ``com.microsoft.GroupQueryAttention`` (ORT CPU)."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from qexport.passes._ir import append_node, const_array, new_initializer, producer_of, remove_dead_nodes, set_graph_output
from qexport.passes.metadata import Meta
from qexport.passes.ort.attention import MASK_MIN, AttentionMatch, match_attention
from qexport.passes.ort.rotary import match_rotary

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
BNSH_TO_BSNH = [0, 2, 1, 3]


@dataclasses.dataclass(frozen=True)
class Rotary:
    """The rotary applied to a [B, H, S, D] value: its input and the [B, S, D] (``half`` False) or [B, S, D/2] tables."""

    x: ir.Value
    cos: ir.Value
    sin: ir.Value
    half: bool


@dataclasses.dataclass(frozen=True)
class Int8Cache:
    """An int8 cache tensor as ``quantize-kv`` writes it: ``present = Concat(past, QuantizeLinear(new / s, 1, 0))``
    read as ``DequantizeLinear(present, 1, 0) * s`` (per_channel), or with ``s`` per kv head on axis 1 (per_head)."""

    concat: ir.Node
    past: ir.Value  # INT8 graph input [B, H_kv, P, D]
    new: ir.Value  # the new tokens' float key (after rotary) or value [B, H_kv, S, D]
    scale: np.ndarray  # float32 [H_kv, 1, D]: code = round(new / scale), as GroupQueryAttention's PER_CHANNEL


@dataclasses.dataclass(frozen=True)
class GqaMatch:
    """An attention core whose key and value are ``Concat(past, new)`` along the sequence (or the new ones alone)."""

    core: AttentionMatch
    query: ir.Value  # [B, H, S, D], before the rotary when ``rotary`` is set
    key: ir.Value  # [B, H_kv, S, D], the new tokens only, idem
    value: ir.Value  # [B, H_kv, S, D], the new tokens only
    past_key: ir.Value | None  # graph inputs [B, H_kv, P, D]
    past_value: ir.Value | None
    rotary: Rotary | None  # the tables shared by query and key, when both are rotated by them
    int8: tuple[Int8Cache, Int8Cache] | None = None  # key and value caches, when quantize-kv made them int8


def _int8_cache(value: ir.Value) -> Int8Cache | None:
    """The int8 cache that ``value`` (what attention reads) dequantizes, or None."""
    node = value.producer()
    if node is None or Meta.KV_CACHE not in node.metadata_props:
        return None
    per_head = node.metadata_props[Meta.KV_CACHE] == "per_head"
    dq = node if per_head else node.inputs[0].producer()
    scale = const_array(dq.inputs[1] if per_head else node.inputs[1]) if dq is not None else None
    if dq is None or dq.op_type != "DequantizeLinear" or scale is None or value.shape is None \
            or not isinstance(value.shape[3], int):
        return None
    concat = dq.inputs[0].producer()
    if concat is None or concat.op_type != "Concat" or len(concat.inputs) != 2 or not concat.inputs[0].is_graph_input() \
            or concat.inputs[0].dtype != ir.DataType.INT8:
        return None
    quantize = concat.inputs[1].producer()
    if quantize is None or quantize.op_type != "QuantizeLinear" or Meta.KV_CACHE not in quantize.metadata_props:
        return None
    new = quantize.inputs[0]
    if not per_head:
        divide = new.producer()
        if divide is None or divide.op_type != "Div" or Meta.KV_CACHE not in divide.metadata_props:
            return None
        new = divide.inputs[0]
    heads, head_dim = value.shape[1], value.shape[3]
    scale = np.broadcast_to(scale.reshape(-1, 1, 1) if per_head else scale, (heads, 1, head_dim)).astype(np.float32)
    return Int8Cache(concat, concat.inputs[0], new, scale)


def _rotary_of(value: ir.Value) -> Rotary | None:
    """The rotate-half rotary computing ``value``: decomposed (as exported) or a 4-D ``RotaryEmbedding`` (ort-rotary)."""
    node = value.producer()
    if node is None:
        return None
    if node.op_type == "RotaryEmbedding" and node.domain == "" and len(node.inputs) == 3 \
            and not (node.attributes["interleaved"].value if "interleaved" in node.attributes else 0) \
            and "rotary_embedding_dim" not in node.attributes and "num_heads" not in node.attributes:
        return Rotary(node.inputs[0], node.inputs[1], node.inputs[2], half=True)
    match = match_rotary(node) if node.op_type == "Add" and node.domain == "" else None
    return Rotary(match.x, match.cos, match.sin, half=False) if match is not None else None


def _split_cache(value: ir.Value) -> tuple[ir.Value | None, ir.Value] | None:
    """(past, new) when ``value = Concat(past, new, axis=2)`` with ``past`` a graph input, (None, value) when it is
    not a concat at all, None for any other concat."""
    concat = producer_of(value, "Concat")
    if concat is None:
        return None if _reads_a_cache(value) else (None, value)
    axis = concat.attributes["axis"].value if "axis" in concat.attributes else None
    if len(concat.inputs) != 2 or axis not in (2, -2) or not concat.inputs[0].is_graph_input():
        return None
    return concat.inputs[0], concat.inputs[1]


def _reads_a_cache(value: ir.Value, depth: int = 4) -> bool:
    """Whether ``value`` is computed from a graph-input cache through a few elementwise steps (an int8 cache's
    DequantizeLinear and scale, a Cast): GroupQueryAttention would take it for a cache-less key."""
    node = value.producer()
    if node is None or depth == 0:
        return False
    if node.op_type == "Concat" and any(v is not None and v.is_graph_input() for v in node.inputs):
        return True
    if node.op_type not in ("DequantizeLinear", "Mul", "Cast", "Identity"):
        return False
    return any(v is not None and _reads_a_cache(v, depth - 1) for v in node.inputs)


def match_gqa(softmax: ir.Node) -> GqaMatch | None:
    """The attention around ``softmax`` in a form GroupQueryAttention computes exactly, or None (reason at DEBUG)."""
    core = match_attention(softmax)
    if core is None:
        return None
    if core.mask is None:  # GroupQueryAttention is causal; without the exporter's mask the core may not be
        log.debug("%s: no additive mask", softmax.name)
        return None
    int8 = _int8_cache(core.key), _int8_cache(core.value)
    if (int8[0] is None) != (int8[1] is None):
        log.debug("%s: only one of key / value is an int8 cache", softmax.name)
        return None
    if int8[0] is not None:
        key_parts, value_parts = (int8[0].past, int8[0].new), (int8[1].past, int8[1].new)
    else:
        key_parts, value_parts, int8 = _split_cache(core.key), _split_cache(core.value), None
    if key_parts is None or value_parts is None or (key_parts[0] is None) != (value_parts[0] is None):
        log.debug("%s: key / value are not Concat(past input, new) along the sequence", softmax.name)
        return None
    if not isinstance(core.query.shape[3], int) or core.query.shape[3] % 16:
        log.debug("%s: head size %s is not a multiple of 16 (the CPU kernel's rule)", softmax.name, core.query.shape[3])
        return None
    query, key = core.query, key_parts[1]
    q_rot, k_rot = _rotary_of(query), _rotary_of(key)
    rotary = None
    if q_rot is not None and k_rot is not None and (q_rot.cos, q_rot.sin, q_rot.half) == (k_rot.cos, k_rot.sin, k_rot.half):
        rotary, query, key = q_rot, q_rot.x, k_rot.x
    return GqaMatch(core, query, key, value_parts[1], key_parts[0], value_parts[0], rotary, int8)


@dataclasses.dataclass(frozen=True)
class OrtGqaPass(ir.passes.InPlacePass):
    """Replace each exporter attention core and its cache concat by one ``GroupQueryAttention`` (com.microsoft).

    Matched, from each Softmax: what ``ort-attention`` matches (scores, scale, mask, NaN guard, p @ v, GQA
    repeat), with key and value ``Concat(past_key_values.i, new)`` (their concat is the graph output
    ``present.i``, which the node now writes) or, without a cache, the new ones. A rotate-half rotary on
    query and key with the same tables (decomposed, or ``RotaryEmbedding`` after ``ort-rotary``) runs inside
    the node (``do_rotary``); the graph's own cos / sin tables are its caches, one row per (batch, token),
    so every rope variant stays as exported. Per-head norms (Gemma3) stay outside. The exporter's mask is
    ``attention_bias``: left padding and sliding windows are exact; ``seqlens_k = T - 1`` and
    ``query_seqlens = S`` for every row, which also lets a batch continue a prompt over a cache.

    An int8 cache from ``quantize-kv`` (``present = Concat(past, QuantizeLinear(new / s))``, read dequantized) is
    kept int8 in the node: ``k_quant_type`` / ``v_quant_type`` PER_CHANNEL with ``k_scale`` / ``v_scale`` [H_kv, 1, D]
    (per-head scales repeated over the channels), ``kv_cache_bit_width`` 8. The kernel stores round(new / s),
    saturated, and attends over code * s, the QDQ graph's numerics (int8 past inputs and present outputs stay).

    Layout: query, key and value are read in [B, S, H * D] straight from the projections where the
    exporter's Reshape -> Transpose allows, else transposed back; after ``ort-merge-linears`` the merged
    q/k/v output is read packed (its Split goes). The output feeds the o_proj's Reshape.
    A query row whose mask is all the exporter's minimum (a padding token) gets uniform attention over all
    T keys in the decomposed graph; the node's causal softmax sees fewer, so such rows are set to the
    mean of v, inside an ``If`` that a batch without padding skips.

    Needs a mask (the kernel is causal), a head size that is a multiple of 16 and ONNX Runtime 1.32+
    (``query_seqlens``). A graph without a match, or a second run, is reported unmodified. CPU only:
    keep the decomposed form for TensorRT.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        matches = [m for node in graph if (m := match_gqa(node)) is not None]
        if not matches:
            return ir.passes.PassResult(model, False)
        graph.opset_imports.setdefault(MS_DOMAIN, 1)
        shared = _Shared(graph)
        for index, match in enumerate(matches):
            _fuse(graph, match, f"qexport.gqa.{index}", shared)
        removed = remove_dead_nodes(graph)
        if any(m.int8 is not None for m in matches):
            graph.sort()  # a reader of the dequantized cache other than attention now reads the node's present
        log.info("lowered %d attention cores to GroupQueryAttention (%d rotary fused, %d with an int8 cache, %d "
                 "nodes removed)", len(matches), sum(m.rotary is not None for m in matches),
                 sum(m.int8 is not None for m in matches), removed)
        return ir.passes.PassResult(model, True)


class _Shared:
    """The lengths, position indices, caches and dead-row flags every layer reads, built once (per mask or table)."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.batch_seq: ir.Value | None = None  # [B, S] int64
        self.per_mask: dict[ir.Value, tuple[ir.Value, ir.Value, ir.Value, ir.Value, ir.Value]] = {}
        self.per_table: dict[ir.Value, tuple[ir.Value, ir.Value]] = {}
        self.per_cache: dict[ir.Value, ir.Value] = {}

    def const(self, name: str, array) -> ir.Value:
        existing = self.graph.initializers.get(f"qexport.gqa.{name}")
        return existing if existing is not None else new_initializer(self.graph, f"qexport.gqa.{name}", np.asarray(array))

    def lengths(self, mask: ir.Value, query3: ir.Value, nodes: list[ir.Node]):
        """(seqlens_k, total_sequence_length, query_seqlens, total int64 [1], dead rows [B, S, 1] bool, any dead)."""
        if self.batch_seq is None:
            self.batch_seq = append_node(nodes, "Shape", [query3], "qexport.gqa.batch_seq", start=0, end=2)
        if mask not in self.per_mask:
            base = f"qexport.gqa.mask{len(self.per_mask)}"
            total64 = append_node(nodes, "Shape", [mask], f"{base}.total64", start=-1)  # [1]
            total32 = append_node(nodes, "Cast", [total64], f"{base}.total32", to=ir.DataType.INT32)
            total = append_node(nodes, "Squeeze", [total32, self.const("axis0", [0])], f"{base}.total")
            batch = append_node(nodes, "Gather", [self.batch_seq, self.const("zero", [0])], f"{base}.batch")
            last = append_node(nodes, "Sub", [total32, self.const("one32", np.array([1], np.int32))], f"{base}.last")
            seqlens = append_node(nodes, "Expand", [last, batch], f"{base}.seqlens_k")
            seq32 = append_node(nodes, "Cast", [append_node(nodes, "Gather", [self.batch_seq, self.const("one", [1])],
                                                            f"{base}.seq64")], f"{base}.seq32", to=ir.DataType.INT32)
            query_lens = append_node(nodes, "Expand", [seq32, batch], f"{base}.query_seqlens")
            row_max = append_node(nodes, "ReduceMax", [mask, self.const("last_axis", [-1])], f"{base}.row_max")
            dead4 = append_node(nodes, "Equal", [row_max, self.const("masked", np.array(MASK_MIN, np.float32))],
                                f"{base}.dead4")  # [B, 1, S, 1]
            dead = append_node(nodes, "Squeeze", [dead4, self.const("axis1", [1])], f"{base}.dead")
            any_dead = append_node(nodes, "Cast", [append_node(nodes, "ReduceMax", [append_node(
                nodes, "Cast", [dead], f"{base}.dead_f", to=ir.DataType.FLOAT)], f"{base}.any_dead_f", keepdims=0)],
                f"{base}.any_dead", to=ir.DataType.BOOL)
            self.per_mask[mask] = (seqlens, total, query_lens, total64, (dead, any_dead))
        return self.per_mask[mask]

    def caches(self, rotary: Rotary, total64: ir.Value, head_dim: int, nodes: list[ir.Node]) -> tuple[ir.Value, ...]:
        """(cos cache, sin cache, position ids): row b * S + s of the caches is the tables' (b, s) row, then T zero
        rows (the kernel wants at least T rows); a table with batch 1 is read by every row of the batch."""
        if rotary.cos not in self.per_table:
            base = f"qexport.gqa.rope{len(self.per_table)}"
            dims = append_node(nodes, "Shape", [rotary.cos], f"{base}.dims", start=0, end=2)
            count = append_node(nodes, "ReduceProd", [dims], f"{base}.rows", keepdims=0)
            rows = append_node(nodes, "Range", [self.const("zero_s", np.array(0, np.int64)), count,
                                                self.const("one_s", np.array(1, np.int64))], f"{base}.range")
            positions = append_node(nodes, "Expand", [append_node(nodes, "Reshape", [rows, dims], f"{base}.index"),
                                                      self.batch_seq], f"{base}.position_ids")
            pads = append_node(nodes, "Concat", [self.const("pad_before", [0, 0]), total64, self.const("pad_width", [0])],
                               f"{base}.pads", axis=0)
            self.per_table[rotary.cos] = (positions, pads)
        positions, pads = self.per_table[rotary.cos]
        return (*(self._cache(table, rotary.half, head_dim // 2, pads, nodes) for table in (rotary.cos, rotary.sin)),
                positions)

    def _cache(self, table: ir.Value, half: bool, width: int, pads: ir.Value, nodes: list[ir.Node]) -> ir.Value:
        """The [rows + T, D/2] cache of one [B, S, D] (or, ``half``, [B, S, D/2]) table."""
        if table not in self.per_cache:
            base, rows = f"{table.name}.gqa_cache", table
            if not half:
                rows = append_node(nodes, "Slice", [table, self.const("zero", [0]), self.const(f"width{width}", [width]),
                                                    self.const("last_axis", [-1])], f"{base}.half")
            flat = append_node(nodes, "Reshape", [rows, self.const(f"rows_by{width}", [-1, width])], f"{base}.flat")
            self.per_cache[table] = append_node(nodes, "Pad", [flat, pads], f"{base}.padded")
        return self.per_cache[table]


def _bsnh(value: ir.Value, heads: int, head_dim: int, base: str, nodes: list[ir.Node], shared: _Shared) -> ir.Value:
    """``value`` [B, H, S, D] as [B, S, H * D]: the exporter's projection output when value is
    Transpose(Reshape(y [B, S, H * D]), (0, 2, 1, 3)), else a Transpose and Reshape of it."""
    transpose = producer_of(value, "Transpose")
    reshape = producer_of(transpose.inputs[0], "Reshape") if transpose is not None else None
    if reshape is not None and list(transpose.attributes["perm"].value) == BNSH_TO_BSNH:
        y, view = reshape.inputs[0], reshape.outputs[0]
        if y.shape is not None and view.shape is not None and len(y.shape) == 3 and len(view.shape) == 4 \
                and y.shape[-1] == heads * head_dim and tuple(view.shape[2:]) == (heads, head_dim) \
                and tuple(y.shape[:2]) == tuple(view.shape[:2]):
            return y
    moved = append_node(nodes, "Transpose", [value], f"{base}.bsnh", perm=BNSH_TO_BSNH)
    return append_node(nodes, "Reshape", [moved, shared.const("merge_heads", [0, 0, -1])], f"{base}.bsnh3")


def _packed(query: ir.Value, key: ir.Value, value: ir.Value, heads: int, kv_heads: int, head_dim: int) -> ir.Value | None:
    """x when query, key and value are the three outputs of ``Split(x, [H * D, H_kv * D, H_kv * D], axis=-1)``."""
    split = query.producer()
    if split is None or split.op_type != "Split" or split.domain != "" or list(split.outputs) != [query, key, value]:
        return None
    axis = split.attributes["axis"].value if "axis" in split.attributes else 0
    sizes = const_array(split.inputs[1]) if len(split.inputs) > 1 else None
    if sizes is None or query.shape is None or len(query.shape) != 3 or axis not in (-1, 2) \
            or sizes.tolist() != [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]:
        return None
    return split.inputs[0]


def _output_reshape(output: ir.Value, heads: int, head_dim: int) -> ir.Value | None:
    """The [B, S, H * D] value the exporter makes of the core's output (Transpose (0, 2, 1, 3) then Reshape), if any."""
    uses = output.uses()
    transpose = uses[0][0] if len(uses) == 1 and not output.is_graph_output() else None
    if transpose is None or transpose.op_type != "Transpose" or list(transpose.attributes["perm"].value) != BNSH_TO_BSNH:
        return None
    moved = transpose.outputs[0]
    uses = moved.uses()
    reshape = uses[0][0] if len(uses) == 1 and not moved.is_graph_output() else None
    if reshape is None or reshape.op_type != "Reshape" or reshape.domain != "":
        return None
    flat = reshape.outputs[0]
    ok = flat.shape is not None and moved.shape is not None and len(flat.shape) == 3 and \
        flat.shape[-1] == heads * head_dim and tuple(flat.shape[:2]) == tuple(moved.shape[:2])
    return flat if ok else None


def _fuse(graph: ir.Graph, match: GqaMatch, base: str, shared: _Shared) -> None:
    core = match.core
    heads, kv_heads, head_dim = core.query.shape[1], core.key.shape[1], core.query.shape[3]
    nodes: list[ir.Node] = []
    query = _bsnh(match.query, heads, head_dim, f"{base}.q", nodes, shared)
    key = _bsnh(match.key, kv_heads, head_dim, f"{base}.k", nodes, shared)
    value = _bsnh(match.value, kv_heads, head_dim, f"{base}.v", nodes, shared)
    packed = _packed(query, key, value, heads, kv_heads, head_dim)
    if packed is not None:  # ort-merge-linears ran first: the node reads the merged q/k/v output, no Split
        query, key, value = packed, None, None
    seqlens, total, query_lens, total64, (dead, any_dead) = shared.lengths(core.mask, query, nodes)
    rotary = shared.caches(match.rotary, total64, head_dim, nodes) if match.rotary is not None else (None, None, None)
    scales = (None, None)
    attributes = {"num_heads": heads, "kv_num_heads": kv_heads, "scale": core.scale,
                  "do_rotary": int(match.rotary is not None)}
    if match.int8 is not None:  # the kernel keeps the cache in int8: code = round(new / s), read as code * s
        scales = tuple(new_initializer(graph, f"{base}.{kv}_scale", c.scale) for kv, c in zip("kv", match.int8))
        attributes.update(k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=8)
    inputs = [query, key, value, match.past_key, match.past_value, seqlens, total, *rotary, core.mask,
              None, *scales, None, None, query_lens]
    node = ir.node("GroupQueryAttention", inputs, attributes=attributes, domain=MS_DOMAIN, name=base, num_outputs=3)
    node.metadata_props[Meta.GQA] = "1"
    out, present_key, present_value = node.outputs
    flat = _output_reshape(core.output, heads, head_dim)
    out.name, out.dtype, out.shape = base, core.output.dtype, flat.shape if flat is not None else None
    nodes.append(node)
    out = _restore_dead_rows(present_value, scales[1], out, (dead, any_dead), heads, kv_heads, head_dim, base, nodes,
                             shared)
    graph.insert_before(core.output.producer(), nodes)
    # the int8 present is the concat's output (what the graph returns); attention read its dequantized value
    replaced = (core.key, core.value) if match.int8 is None else (match.int8[0].concat.outputs[0], match.int8[1].concat.outputs[0])
    for old, new, label in zip(replaced, (present_key, present_value), ("present_key", "present_value")):
        new.name, new.dtype, new.shape = f"{base}.{label}", old.dtype, old.shape
        if old.is_graph_output():
            set_graph_output(graph, old, new)
        if match.past_key is not None:  # without a cache, ``old`` is the new key / value, which the node reads
            old.replace_all_uses_with(new)
    if flat is not None:
        flat.replace_all_uses_with(out)
        return
    split = append_node(after := [], "Reshape", [out, shared.const(f"split{heads}x{head_dim}", [0, 0, heads, head_dim])],
                        f"{base}.split_heads")
    bnsh = append_node(after, "Transpose", [split], f"{base}.bnsh", perm=BNSH_TO_BSNH)
    bnsh.dtype, bnsh.shape = core.output.dtype, core.output.shape
    graph.insert_before(core.output.producer(), after)
    core.output.replace_all_uses_with(bnsh)


def _restore_dead_rows(present_value: ir.Value, v_scale: ir.Value | None, y: ir.Value, flags: tuple[ir.Value, ir.Value],
                       heads: int, kv_heads: int, head_dim: int, base: str, nodes: list[ir.Node],
                       shared: _Shared) -> ir.Value:
    """``Where(dead row, mean over all T keys of v, y)`` (head h reading kv head h // (H / H_kv)), inside
    ``If(any row dead)``; an int8 cache (``v_scale`` set) is dequantized there too, as attention reads it, so a
    batch without padding never converts the cache."""
    dead, any_dead = flags
    restore: list[ir.Node] = []
    if v_scale is not None:
        codes = append_node(restore, "Cast", [present_value], f"{base}.v_codes", to=y.dtype)
        present_value = append_node(restore, "Mul", [codes, v_scale], f"{base}.v_dequantized")
        present_value.dtype = y.dtype
    mean_v = append_node(restore, "ReduceMean", [present_value, shared.const("axis2", [2])], f"{base}.mean_v")  # [B,Hkv,1,D]
    mean_v = append_node(restore, "Unsqueeze", [append_node(restore, "Transpose", [mean_v], f"{base}.mean_v_t",
                                                            perm=BNSH_TO_BSNH), shared.const("axis3", [3])],
                         f"{base}.mean_v5")  # [B, 1, H_kv, 1, D]
    group = shared.const(f"group{kv_heads}x{heads // kv_heads}", [1, 1, 1, heads // kv_heads, 1])
    mean_v = append_node(restore, "Expand", [mean_v, group], f"{base}.mean_v_heads")  # [B, 1, H_kv, G, D]
    mean_v = append_node(restore, "Reshape", [mean_v, shared.const("merge_heads", [0, 0, -1])], f"{base}.mean_v3")
    restored = append_node(restore, "Where", [dead, mean_v, y], f"{base}.restored")
    kept = append_node(unchanged := [], "Identity", [y], f"{base}.no_dead_rows")
    for value in (restored, kept):
        value.dtype = y.dtype
    branches = {"then_branch": ir.Graph([], [restored], nodes=restore, name=f"{base}.restore"),
                "else_branch": ir.Graph([], [kept], nodes=unchanged, name=f"{base}.keep")}
    out = append_node(nodes, "If", [any_dead], f"{base}.out", **branches)
    out.dtype = y.dtype
    return out
