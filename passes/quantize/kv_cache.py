"""Quantize the KV cache to int8 in QDQ form: the graph's past inputs and present outputs become INT8.

The exporter's cache is ``present.i.key = Concat(past_key_values.i.key, k_new, axis=-2)`` (k after rotary, what
enters the cache; likewise for values), a graph output that attention reads. This pass keeps that structure and
changes its type: the past input is INT8, the new tokens are quantized before the concat, so the present output is
INT8 too, and every reader of the present (attention, Shape) reads its dequantized value. Prefill and decode read
the same dequantized cache, so a decode step sees exactly what the prefill stored.

Scales are static and symmetric (zero point 0), calibrated as absmax(x) * ``margin`` / 127 of the new K and V over
the calibration windows, run through the graph as it is before this pass:

* ``per_channel``: one scale per (kv head, channel), ``s`` of shape [H_kv, 1, D] (K's outlier channels get their own
  scale). ONNX's per-axis Q/DQ has one axis, so the scale is applied around a unit-scale pair:
  ``present = Concat(past, QuantizeLinear(k_new / s, 1, 0))`` and attention reads ``DequantizeLinear(present, 1, 0) * s``;
* ``per_head``: one scale per kv head, ``s`` of shape [H_kv], plain per-axis (axis 1) Q/DQ:
  ``present = Concat(past, QuantizeLinear(k_new, s, 0, axis=1))``, attention reads ``DequantizeLinear(present, s, 0, axis=1)``.

Codes saturate to [-128, 127] as QuantizeLinear does (a calibrated absmax maps to ±127). The nodes carry
``Meta.KV_CACHE`` (the granularity), which a lowering onto a runtime's quantized cache (ONNX Runtime
GroupQueryAttention's ``k_scale`` / ``v_scale``) can match. A graph whose past inputs are already INT8 (a second run) is
reported unmodified. The runners feed an empty past of the input's type (the signature's ``kv_dtype``).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from typing import ClassVar, Sequence

import numpy as np
import onnx_ir as ir

from qexport import numerics
from qexport.calibration.calibrator import Calibrator
from qexport.errors import PatternNotFoundError, RecipeError
from qexport.passes._ir import new_initializer
from qexport.passes._settings import coerce_enums
from qexport.passes.metadata import Meta

log = logging.getLogger(__name__)

PAST_PREFIX = "past_key_values."
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)
_QUANTIZE_PASSES = ("quantize", "quantize-gptq", "bias-correct")


class KvGranularity(str, enum.Enum):
    PER_CHANNEL = "per_channel"  # one scale per (kv head, channel): [H_kv, 1, D]
    PER_HEAD = "per_head"  # one scale per kv head: [H_kv]


@dataclasses.dataclass(frozen=True)
class CacheConcat:
    """``present = Concat(past, new, axis=-2)`` with ``past`` a float graph input and ``present`` a graph output."""

    concat: ir.Node
    past: ir.Value  # [B, H_kv, P, D]
    new: ir.Value  # [B, H_kv, S, D]: the new tokens' key (after rotary) or value
    present: ir.Value  # [B, H_kv, P + S, D]
    kv_heads: int
    head_dim: int


def match_cache_concat(node: ir.Node) -> CacheConcat | None:
    """The cache concat ``node`` is, or None (the reason at DEBUG)."""
    if node.op_type != "Concat" or node.domain != "" or len(node.inputs) != 2:
        return None
    past, new = node.inputs
    if past is None or new is None or not past.is_graph_input() or not past.name.startswith(PAST_PREFIX):
        return None
    axis = node.attributes["axis"].value if "axis" in node.attributes else None
    present = node.outputs[0]
    shape = past.shape
    if axis not in (2, -2) or not present.is_graph_output() or past.dtype not in _FLOAT_TYPES or shape is None \
            or len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
        log.debug("%s: not a float Concat(past, new) along the sequence into a present output", node.name)
        return None
    return CacheConcat(node, past, new, present, shape[1], shape[3])


@dataclasses.dataclass(frozen=True)
class QuantizeKvPass(ir.passes.InPlacePass):
    """Make the KV cache INT8 with static scales (see the module docstring for the graph it writes).

    Rewrite cases: every ``Concat(past_key_values.*, new, axis=-2)`` whose output is a ``present.*`` graph output
    (:func:`match_cache_concat`). Every float past input must be such a concat's, else nothing changes and the
    error names the inputs (e.g. a cache already lowered into GroupQueryAttention: run this pass before the ORT
    lowerings). A graph with INT8 past inputs is left alone; one without a KV cache is an error.
    """

    lossless: ClassVar[bool] = False

    bits: int = 8
    granularity: KvGranularity = KvGranularity.PER_CHANNEL
    margin: float = 1.0  # the calibrated absmax is multiplied by this before / 127
    calibrator: Calibrator | None = None  # the pipeline provides it

    def __post_init__(self) -> None:
        coerce_enums(self, "quantize-kv", granularity=KvGranularity)
        if self.bits != 8:
            raise RecipeError(f"quantize-kv bits must be 8 (an int8 cache), got {self.bits}")
        if not self.margin > 0:
            raise RecipeError(f"quantize-kv margin must be positive, got {self.margin}")

    @classmethod
    def recipe_conflict(cls, names: Sequence[str], index: int, checks: Sequence[str]) -> str | None:
        """Why the recipe's pass list ``names`` (this pass at ``index``) and output ``checks`` cannot hold this pass,
        or None; the recipe loader raises it before any export."""
        if "tensorrt" in checks:
            return ("an int8 KV cache is a Concat of an INT8 graph input and a QuantizeLinear, which TensorRT's "
                    "explicit-quantization rules (Q feeds only DQ, DQ reads only Q or constants, per-tensor "
                    "activation scales) refuse; drop kv_cache: int8 (or the quantize-kv pass) or the tensorrt check")
        if names.count(names[index]) > 1:
            return "quantize-kv appears more than once (kv_cache: int8 adds it; write one or the other)"
        if any(n.startswith("ort-") for n in names[:index]):
            return "quantize-kv must run before the ORT lowerings (ort-*), which change the attention it reads"
        late = [n for n in names[index + 1:] if not n.startswith("ort-")]
        if late:
            return (f"quantize-kv must be the last pass before the ORT lowerings, after {', '.join(_QUANTIZE_PASSES)}; "
                    f"{', '.join(late)} follows it")
        return None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        pasts = [v for v in graph.inputs if v.name.startswith(PAST_PREFIX)]
        if not pasts:
            raise RecipeError("quantize-kv: the graph has no KV cache (exported with --no-kv-cache); drop "
                              "kv_cache: int8 or export with the cache")
        floats = [v for v in pasts if v.dtype in _FLOAT_TYPES]
        if not floats:
            return ir.passes.PassResult(model, False)  # already int8
        matches = [m for node in graph if (m := match_cache_concat(node)) is not None]
        missing = sorted({v.name for v in floats} - {m.past.name for m in matches})
        if missing:
            raise PatternNotFoundError(
                f"quantize-kv: past inputs {missing[:4]}{' ...' if len(missing) > 4 else ''} do not feed a "
                "Concat(past, new, axis=-2) into a present output; run quantize-kv before the ORT lowerings "
                "(ort-gqa takes the concat into its kernel)")
        if self.calibrator is None:
            raise RecipeError("quantize-kv needs calibration windows (run it through a recipe, or pass "
                              "calibrator=Calibrator(windows))")
        absmax = self.calibrator.absmax(model, [m.new for m in matches], keep_axes=(1, 3))
        for match in matches:
            self._rewrite(graph, match, self.scales(absmax[match.new]))
        log.info("int8 KV cache (%s): %d cache tensors quantized", self.granularity.value, len(matches))
        return ir.passes.PassResult(model, True)

    def scales(self, absmax: np.ndarray) -> np.ndarray:
        """The float32 scales of one cache tensor from its [H_kv, D] absmax: [H_kv, 1, D] or [H_kv]."""
        peak = absmax * self.margin
        if self.granularity is KvGranularity.PER_HEAD:
            return numerics.absmax_scale(peak.max(axis=1)).astype(np.float32)
        return numerics.absmax_scale(peak).astype(np.float32)[:, None, :]

    def _rewrite(self, graph: ir.Graph, match: CacheConcat, scale: np.ndarray) -> None:
        base, dtype = match.present.name, match.past.dtype
        tag = self.granularity.value
        per_head = self.granularity is KvGranularity.PER_HEAD
        s = new_initializer(graph, f"{base}.kv_scale", scale.astype(dtype.numpy()))
        if per_head:
            q_scale, zero, axis = s, new_initializer(graph, f"{base}.kv_zero", np.zeros(scale.shape, np.int8)), {"axis": 1}
        else:
            q_scale = new_initializer(graph, f"{base}.kv_unit", np.array(1.0, dtype.numpy()))
            zero, axis = new_initializer(graph, f"{base}.kv_zero", np.array(0, np.int8)), {}
        before: list[ir.Node] = []
        x = match.new
        if not per_head:
            x = _node(before, "Div", [x, s], f"{base}.kv_scaled", tag, {}, x)
        q = _node(before, "QuantizeLinear", [x, q_scale, zero], f"{base}.kv_q", tag, axis, match.new, ir.DataType.INT8)
        graph.insert_before(match.concat, before)
        match.concat.replace_input_with(1, q)
        for value in (match.past, match.present):
            value.dtype = ir.DataType.INT8
        readers = [(node, idx) for node, idx in match.present.uses()]
        after: list[ir.Node] = []
        y = _node(after, "DequantizeLinear", [match.present, q_scale, zero], f"{base}.kv_dq", tag, axis, match.present,
                  dtype)
        if not per_head:
            y = _node(after, "Mul", [y, s], f"{base}.kv_dequantized", tag, {}, match.present, dtype)
        graph.insert_after(match.concat, after)
        for node, idx in readers:
            node.replace_input_with(idx, y)


def _node(nodes: list[ir.Node], op: str, inputs: list[ir.Value], name: str, tag: str, attributes: dict,
          like: ir.Value, dtype: ir.DataType | None = None) -> ir.Value:
    """Append a tagged one-output node named ``name``; its output has ``like``'s shape and ``dtype`` (else like's)."""
    node = ir.node(op, inputs, attributes=attributes, name=name)
    node.metadata_props[Meta.KV_CACHE] = tag
    out = node.outputs[0]
    out.name, out.shape, out.dtype = name, like.shape, dtype if dtype is not None else like.dtype
    nodes.append(node)
    return out
