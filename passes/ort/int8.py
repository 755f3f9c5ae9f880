"""Lower W8A8 QDQ linears to ONNX Runtime's CPU integer kernels (uint8 activations; uint8 or int8 weights)."""

from __future__ import annotations

import dataclasses
import enum
import logging
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from qexport.passes._ir import const_array, drop_if_unused, new_initializer, plain_linear, set_graph_output
from qexport.passes.metadata import Meta
from qexport.passes.quantize.insert_qdq import ActQuant

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"


class KernelWeights(str, enum.Enum):
    """The integer type of the lowered weights, which picks ONNX Runtime's CPU kernel (MLAS) for the product."""

    UINT8 = "uint8"  # w + 128 with B zero point 128: the U8U8 kernel, exact on every CPU
    INT8 = "int8"  # the U8S8 kernel: the fast path with AVX-512 VNNI, AVX-VNNI or AMX; without them it saturates


@dataclasses.dataclass(frozen=True)
class QuantLinear:
    """A ``MatMul(DQ(x_q), DQ(w_q))`` made by :class:`~qexport.passes.quantize.insert_qdq.QuantizePass`."""

    matmul: ir.Node
    act_q: ir.Node  # the activation QuantizeLinear
    act_dq: ir.Node
    weight_dq: ir.Node
    mode: ActQuant  # PER_TOKEN or PER_TENSOR
    transposed: bool  # Gemm with transB = 1: the int8 weight is stored [out, in]
    bias: ir.Value | None  # Gemm's C

    @property
    def output(self) -> ir.Value:
        return self.matmul.outputs[0]

    @property
    def weight_int8(self) -> ir.Value:
        return self.weight_dq.inputs[0]

    @property
    def weight_scale(self) -> ir.Value:
        return self.weight_dq.inputs[1]


def match_quant_linear(node: ir.Node) -> QuantLinear | None:
    """The QDQ linear ``node`` is, or None: a MatMul (or Gemm, transB = 1, no alpha/beta/transA) fed by a tagged
    activation DQ and a per-output-channel int8 weight DQ."""
    form = plain_linear(node)
    if form is None:
        return None
    transposed, bias = form
    a, b = (v.producer() if v is not None else None for v in node.inputs[:2])
    if a is None or b is None or a.op_type != "DequantizeLinear" or b.op_type != "DequantizeLinear":
        return None
    mode = a.metadata_props.get(Meta.QUANT)
    if a.outputs[0].dtype != ir.DataType.FLOAT:
        log.debug("%s: MatMulIntegerToFloat lowering is for float32 graphs", node.name)
        return None
    if mode not in (ActQuant.PER_TOKEN, ActQuant.PER_TENSOR) or b.metadata_props.get(Meta.QUANT) != "weight":
        log.debug("%s: inputs are not tagged activation/weight dequantizers", node.name)
        return None
    q = a.inputs[0].producer()
    weight = const_array(b.inputs[0])
    axis = b.attributes["axis"].value if "axis" in b.attributes else 1
    if q is None or q.op_type != "QuantizeLinear" or weight is None or weight.dtype != np.int8 or weight.ndim != 2 \
            or axis != (0 if transposed else 1):
        log.debug("%s: not an int8 weight with per-output-channel scales", node.name)
        return None
    return QuantLinear(node, q, a, b, ActQuant(mode), transposed, bias)


@dataclasses.dataclass(frozen=True)
class LowerOrtPass(ir.passes.InPlacePass):
    """Rewrite QDQ linears into ``com.microsoft.MatMulIntegerToFloat`` (uint8 activations).

    ``weights`` picks the kernel. ``uint8`` (the default) stores w + 128 with a B zero point of 128, the same
    integers, for MLAS's U8U8 kernel, which widens to 16 bits and is exact on every CPU. ``int8`` keeps the int8
    weights for the U8S8 kernel: the fast path on CPUs with AVX-512 VNNI, AVX-VNNI or AMX; on x86 CPUs with AVX2
    only, that kernel sums pairs of u8 x s8 products in saturating 16-bit lanes (``vpmaddubsw``), so large
    activations times large weights clip and the model loses accuracy (docs/measurements.md). Use ``int8`` only
    for a deployment CPU known to have VNNI.

    Rewrite cases (the QDQ graph's integers, up to rounding ties and float accumulation order):

    1. ``per_token``: the same blocked ``QuantizeLinear(x, s_t)`` with a uint8 zero point 128 stores q + 128 in
       one pass over x, then ``MatMulIntegerToFloat(q_u8, w_s8, s_t, s_w, 128)``. The CPU kernel multiplies its
       output by a non-scalar a_scale (``ScaleOutput`` in ORT's matmul_integer_to_float.cc; the contrib-op schema
       documents only a scalar, so tests/test_lower_ort.py guards it); a bias is added after it; the
       s_t chain (Abs, ReduceMax, Div, Max) is kept;
    2. ``per_tensor`` (static s): ``QuantizeLinear(x, s, uint8 128)``, then ``MatMulIntegerToFloat(q_u8, w_s8, s,
       s_w, 128)`` with the bias fused;
    3. Gemm (transB = 1, OPT's fc1/fc2): the int8 weight is transposed to [in, out], its C added after the scales.

    One quantized activation is shared by all linears reading it. Not DynamicQuantizeLinear: that is per-tensor
    asymmetric, a less accurate quantizer. End to end, a flipped rounding tie moves deep layers onto different,
    equally good integers (docs/measurements.md gives the size of that noise). A graph with nothing left to lower
    is reported unmodified.
    """

    weights: KernelWeights = KernelWeights.UINT8
    lossless: ClassVar[bool] = False  # equal to the QDQ graph only up to rounding ties, not to FP32

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", KernelWeights(self.weights))

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        matches = [m for node in graph if (m := match_quant_linear(node)) is not None]
        if not matches:
            return ir.passes.PassResult(model, False)
        zero_point = new_initializer(graph, "qexport.lower.zp128", np.array(128, np.uint8))
        lowered_q: dict[ir.Node, ir.Value] = {}
        blocked_zero_points: dict[tuple, ir.Value] = {}
        for match in matches:
            if match.act_q not in lowered_q:
                lowered_q[match.act_q] = _uint8_activation(graph, match, zero_point, blocked_zero_points)
            _lower_matmul(graph, match, lowered_q[match.act_q], zero_point, self.weights)
        for match in matches:  # the QDQ nodes are unused now
            for node in (match.weight_dq, match.act_dq, match.act_q):
                if node.graph is graph and not any(o.uses() for o in node.outputs):
                    inputs = list(node.inputs)
                    graph.remove(node, safe=True)
                    for value in inputs:
                        if value is not None:
                            drop_if_unused(graph, value)
        log.info("lowered %d linears onto MatMulIntegerToFloat (%d quantized activations, %s weights)", len(matches),
                 len(lowered_q), self.weights.value)
        return ir.passes.PassResult(model, True)


def _mark(node: ir.Node) -> ir.Node:
    node.metadata_props[Meta.LOWERED] = "1"
    return node


def _uint8_activation(graph: ir.Graph, match: QuantLinear, zero_point: ir.Value,
                      blocked_zero_points: dict[tuple, ir.Value]) -> ir.Value:
    """The activation as uint8 with zero point 128 (the same integers as the int8 Q), inserted before its Q."""
    q = match.act_q
    x, scale = q.inputs[0], q.inputs[1]
    base = f"{q.name}.u8"
    nodes = []
    if match.mode is ActQuant.PER_TOKEN:  # the Q's own blocked form (one scale per row), with a blocked uint8 zero point
        attrs = {name: q.attributes[name].value for name in ("axis", "block_size")}
        zero_points = _blocked_zero_points(x, scale, base, nodes, blocked_zero_points)
        quant = _mark(ir.node("QuantizeLinear", [x, scale, zero_points], attributes=attrs, name=base))
    else:
        quant = _mark(ir.node("QuantizeLinear", [x, scale, zero_point], name=base))
    quant.outputs[0].name, quant.outputs[0].dtype = base, ir.DataType.UINT8
    graph.insert_before(q, nodes + [quant])
    return quant.outputs[0]


def _blocked_zero_points(x: ir.Value, scale: ir.Value, base: str, nodes: list[ir.Node],
                         made: dict[tuple, ir.Value]) -> ir.Value:
    """uint8 128 shaped like ``scale`` (``x``'s shape with a last axis of 1). One per static-or-named shape of
    ``x`` less its last axis (a decoder's per-token scales all share [batch, sequence, 1]), made from the first
    such scale; one per scale when x's shape has unnamed dims."""
    dims = list(x.shape)[:-1] if x.shape is not None else None
    named = dims is not None and all(isinstance(d, int) or (isinstance(d, ir.SymbolicDim) and d.value) for d in dims)
    key = tuple(d if isinstance(d, int) else d.value for d in dims) if named else None
    if key is not None and key in made:
        return made[key]
    shape = _mark(ir.node("Shape", [scale], name=f"{base}.zp_shape"))
    fill = ir.tensor(np.array([128], np.uint8), name=f"{base}.zp_value")
    zeros = _mark(ir.node("ConstantOfShape", [shape.outputs[0]], attributes={"value": fill}, name=f"{base}.zp"))
    shape.outputs[0].name, shape.outputs[0].dtype = shape.name, ir.DataType.INT64
    zeros.outputs[0].name, zeros.outputs[0].dtype = zeros.name, ir.DataType.UINT8
    nodes += [shape, zeros]
    if key is not None:
        made[key] = zeros.outputs[0]
    return zeros.outputs[0]


def _lower_matmul(graph: ir.Graph, match: QuantLinear, q_u8: ir.Value, zero_point: ir.Value,
                  weights: KernelWeights) -> None:
    """Replace the MatMul (Gemm) by MatMulIntegerToFloat (then the bias Add for per-token scales)."""
    out = match.output
    per_token = match.mode is ActQuant.PER_TOKEN
    a_scale = match.act_q.inputs[1]  # per-token [..., 1] or per-tensor scalar
    base = match.matmul.name or out.name
    weight, unsigned = match.weight_int8, weights is KernelWeights.UINT8
    if match.transposed or unsigned:
        codes = const_array(weight).T if match.transposed else const_array(weight)  # B is read as [in, out]
        if unsigned:  # the same integers, offset by the zero point 128
            codes = (codes.astype(np.int16) + 128).astype(np.uint8)
        weight = new_initializer(graph, f"{weight.name}.{'u8' if unsigned else 'in_out'}", np.ascontiguousarray(codes))
    fused_bias = match.bias if match.bias is not None and not per_token else None  # added after the scales
    inputs = [q_u8, weight, a_scale, match.weight_scale, zero_point]
    if unsigned or fused_bias is not None:
        inputs.append(zero_point if unsigned else None)  # B's zero point
    if fused_bias is not None:
        inputs.append(fused_bias)
    nodes = [_mark(ir.node("MatMulIntegerToFloat", inputs, domain=MS_DOMAIN, version=1, name=f"{base}.int"))]
    if per_token and match.bias is not None:  # the kernel scales its bias input by a non-scalar a_scale too
        nodes.append(_mark(ir.node("Add", [nodes[-1].outputs[0], match.bias], name=f"{base}.bias")))
    for node in nodes:
        node.outputs[0].name, node.outputs[0].dtype, node.outputs[0].shape = node.name, out.dtype, out.shape
    result = nodes[-1].outputs[0]
    graph.insert_before(match.matmul, nodes)
    if out.is_graph_output():
        set_graph_output(graph, out, result)  # moves the output name (logits) onto the lowered value
    out.replace_all_uses_with(result)
    graph.remove(match.matmul, safe=True)
    if MS_DOMAIN not in graph.opset_imports:
        graph.opset_imports[MS_DOMAIN] = 1
