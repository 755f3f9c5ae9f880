"""Lower per-group W8A8 / W4A8 linears onto ONNX Runtime's ``MatMulNBits`` at ``accuracy_level`` 4, which quantizes
the activations itself: the same integers as the QDQ graph, with no quantizer nodes left in the graph."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from qexport.passes._ir import const_array, new_initializer, plain_linear, remove_if_unused, replace_node_output
from qexport.passes.metadata import Meta
from qexport.passes.ort.int4 import pack_nibbles
from qexport.passes.ort.int8 import MS_DOMAIN
from qexport.passes.quantize.insert_qdq import ActQuant

log = logging.getLogger(__name__)

ACCURACY_LEVEL = 4  # MatMulNBits' int8 compute: A rounded to int8 per block of block_size along K, absmax / 127


@dataclasses.dataclass(frozen=True)
class GroupLinear:
    """``MatMul(DQ(Q(x, s_group)), DQ(w))`` (or Gemm with a bias) with per-group activations."""

    matmul: ir.Node
    act_dq: ir.Node
    x: ir.Value  # the float input of the activation quantizer
    weight_dq: ir.Node
    bits: int  # 8: int8 per output channel or in groups along K, 4: INT4 in groups along K
    codes: np.ndarray  # int8 [K, N]
    scale: np.ndarray  # float32 [K / block, N]
    block: int
    bias: ir.Value | None


def _block_of_activation(dq: ir.Node) -> tuple[ir.Value, int] | None:
    """(x, block) of a ``per_group`` activation dequantizer made by ``quantize``, or None."""
    if dq.op_type != "DequantizeLinear" or dq.domain != "" or dq.metadata_props.get(Meta.QUANT) != ActQuant.PER_GROUP.value:
        return None
    q = dq.inputs[0].producer()
    if q is None or q.op_type != "QuantizeLinear" or "block_size" not in q.attributes:
        return None
    axis = q.attributes["axis"].value if "axis" in q.attributes else 1
    if axis != -1 and (q.inputs[0].shape is None or axis != len(q.inputs[0].shape) - 1):
        return None
    return q.inputs[0], int(q.attributes["block_size"].value)


def _weight(dq: ir.Node, transposed: bool, block: int) -> tuple[int, np.ndarray, np.ndarray] | None:
    """(bits, codes [K, N], scale [K / block, N]) of a tagged int8 per-channel, int8 blocked or INT4 blocked weight
    (blocks of ``block`` input channels), or None."""
    if dq.op_type != "DequantizeLinear" or dq.domain != "" or dq.metadata_props.get(Meta.QUANT) != "weight":
        return None
    if len(dq.inputs) > 2 and dq.inputs[2] is not None:
        zero = const_array(dq.inputs[2])
        if zero is None or np.any(zero.astype(np.int64) != 0):
            return None
    weight, scale = dq.inputs[0], const_array(dq.inputs[1])
    if weight is None or weight.const_value is None or scale is None:
        return None
    dtype = weight.const_value.dtype
    if dtype not in (ir.DataType.INT8, ir.DataType.INT4):
        return None
    stored = np.asarray(weight.const_value.numpy()).astype(np.int8)
    if stored.ndim != 2:
        return None
    codes = stored.T if transposed else stored  # [K, N]
    k, n = codes.shape
    axis = dq.attributes["axis"].value if "axis" in dq.attributes else 1
    w_block = dq.attributes["block_size"].value if "block_size" in dq.attributes else 0
    if dtype == ir.DataType.INT8 and not w_block:  # one scale per output channel, repeated for every block of K
        if axis != (0 if transposed else 1) or scale.shape != (n,):
            return None
        return 8, codes, np.repeat(scale.reshape(1, n), k // block, axis=0).astype(np.float32)
    if w_block != block or axis != (1 if transposed else 0):
        return None
    scale = scale.T if transposed else scale
    if scale.shape != (k // block, n):
        return None
    return (4 if dtype == ir.DataType.INT4 else 8), codes, np.ascontiguousarray(scale).astype(np.float32)


def match_group_linear(node: ir.Node) -> GroupLinear | None:
    """The per-group quantized linear ``node`` is, or None (see :class:`LowerNBitsOrtPass` for the cases)."""
    form = plain_linear(node)
    if form is None:
        return None
    transposed, bias = form
    a, b = (v.producer() if v is not None else None for v in node.inputs[:2])
    if a is None or b is None:
        return None
    found = _block_of_activation(a)
    if found is None or a.outputs[0].dtype != ir.DataType.FLOAT:
        return None
    x, block = found
    if block < 16 or block & (block - 1):
        return None  # MatMulNBits takes power-of-two blocks of at least 16
    weight = _weight(b, transposed, block)
    if weight is None or weight[1].shape[0] % block:
        return None
    bits, codes, scale = weight
    return GroupLinear(node, a, x, b, bits, codes, scale, block, bias)


def pack_bytes(codes: np.ndarray, block: int) -> np.ndarray:
    """MatMulNBits' 8-bit B layout of int8 ``codes`` [K, N]: uint8 [N, K / block, block], each code + 128."""
    k, n = codes.shape
    return (codes.T.astype(np.int16) + 128).astype(np.uint8).reshape(n, k // block, block)


@dataclasses.dataclass(frozen=True)
class LowerNBitsOrtPass(ir.passes.InPlacePass):
    """Replace per-group quantized linears by ``com.microsoft.MatMulNBits`` at accuracy level 4 (recipe name
    ``ort-nbits``).

    Rewrite: ``MatMul(DequantizeLinear(QuantizeLinear(x, s)), DequantizeLinear(w_q, Δ))``, where the activation
    quantizer is ``quantize``'s ``per_group`` one (symmetric int8, one scale per token and block of b input
    channels, s = absmax / 127) and the weight is int8 per output channel, or int8 or INT4 in groups of the same b
    along the input axis (``int8_group``, ``int4``; no zero point), becomes ``MatMulNBits(x, packed codes,
    Δ per block, bits 8 or 4, block_size b, accuracy_level 4)``; a Gemm (transB = 1) passes its bias as
    MatMulNBits' bias (as does one with transB = 0). At level 4 the
    kernel rounds each block of x to int8 with the same scale and multiplies integers, so the result is the QDQ
    graph's up to float rounding (a block's scale is computed once, a code may flip where x / s is a rounding tie).
    An int8 weight's per-channel scale is repeated for each block. The activation quantizer is removed once no
    linear reads it. b must be a power of two of at least 16 that divides K.

    ONNX Runtime's MLAS has level-4 int8 kernels for x86-64 (AVX2, AVX-512) and ARM64 (its sqnbitgemm sources);
    the equality above was measured on an AVX-512 VNNI CPU only. Where it has no int8 kernel, MatMulNBits computes
    in float32, which skips the activation rounding (closer to float, no longer the QDQ graph). A second run
    changes nothing.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        matches = [m for node in graph if (m := match_group_linear(node)) is not None]
        if not matches:
            return ir.passes.PassResult(model, False)
        graph.opset_imports.setdefault(MS_DOMAIN, 1)
        quantizers = {}
        for match in matches:
            _lower(graph, match)
            quantizers[match.act_dq] = None
        removed = sum(_remove_dead_quantizer(graph, dq) for dq in quantizers)
        counts = {bits: sum(m.bits == bits for m in matches) for bits in (8, 4)}
        log.info("lowered %d int8 and %d int4 linears to MatMulNBits (accuracy level 4); %d activation quantizers "
                 "removed", counts[8], counts[4], removed)
        return ir.passes.PassResult(model, True)


def _lower(graph: ir.Graph, match: GroupLinear) -> None:
    k, n = match.codes.shape
    base = match.weight_dq.name or match.matmul.name
    packed = pack_bytes(match.codes, match.block) if match.bits == 8 else pack_nibbles(match.codes, match.block)
    b = new_initializer(graph, f"{base}.nbits", packed)
    scales = new_initializer(graph, f"{base}.nbits_scale", np.ascontiguousarray(match.scale.T).reshape(-1))
    inputs: list[ir.Value | None] = [match.x, b, scales]
    if match.bias is not None:
        inputs += [None, None, match.bias]  # zero points and g_idx left out
    node = ir.node("MatMulNBits", inputs, domain=MS_DOMAIN, name=f"{base}.nbits",
                   attributes={"K": k, "N": n, "bits": match.bits, "block_size": match.block,
                               "accuracy_level": ACCURACY_LEVEL})
    node.metadata_props[Meta.LOWERED] = f"int{match.bits}"
    replace_node_output(graph, match.matmul, node, f"{base}.nbits_out")  # the logits keep their name
    remove_if_unused(graph, match.weight_dq)


def _remove_dead_quantizer(graph: ir.Graph, dq: ir.Node) -> bool:
    """Remove the activation quantizer ending in ``dq`` (its nodes tagged ``per_group``) if nothing reads it."""
    pending = [dq]
    removed_dq = False
    while pending:
        node = pending.pop()
        if node is None or node.metadata_props.get(Meta.QUANT) != ActQuant.PER_GROUP.value:
            continue
        producers = [v.producer() for v in node.inputs if v is not None]
        if remove_if_unused(graph, node):
            removed_dq = removed_dq or node is dq
            pending += producers
    return removed_dq
