"""Lower blocked INT4 weight linears to ONNX Runtime's ``MatMulNBits`` (4-bit weights read by the kernel itself)."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from qexport.errors import RecipeError
from qexport.passes._ir import const_array, new_initializer, remove_if_unused, replace_node_output
from qexport.passes.metadata import Meta
from qexport.passes.ort.int8 import MS_DOMAIN

log = logging.getLogger(__name__)

ZERO_POINT = 8  # MatMulNBits' default 4-bit zero point: stored nibble = code + 8


@dataclasses.dataclass(frozen=True)
class Int4Linear:
    """``MatMul(a, DequantizeLinear(codes INT4 [K, N], scale [K / block, N], axis 0, block_size))``."""

    matmul: ir.Node
    dequantize: ir.Node
    codes: np.ndarray  # int8 [K, N], values in [-8, 7]
    scale: np.ndarray  # [K / block, N]
    block: int


def match_int4_linear(node: ir.Node) -> Int4Linear | None:
    """The int4 weight linear ``node`` is (a MatMul whose B is a tagged blocked INT4 weight DequantizeLinear along
    the input axis, without zero point), or None."""
    if node.domain != "" or node.op_type != "MatMul" or len(node.inputs) != 2:
        return None
    dq = node.inputs[1].producer() if node.inputs[1] is not None else None
    if dq is None or dq.op_type != "DequantizeLinear" or dq.domain != "" or dq.metadata_props.get(Meta.QUANT) != "weight":
        return None
    weight = dq.inputs[0]
    if weight is None or weight.const_value is None or weight.const_value.dtype != ir.DataType.INT4:
        return None
    if len(dq.inputs) > 2 and dq.inputs[2] is not None:
        zero = const_array(dq.inputs[2])
        if zero is None or np.any(zero.astype(np.int64) != 0):
            return None
    axis = dq.attributes["axis"].value if "axis" in dq.attributes else 1
    block = dq.attributes["block_size"].value if "block_size" in dq.attributes else 0
    scale = const_array(dq.inputs[1])
    codes = np.asarray(weight.const_value.numpy()).astype(np.int8)
    if codes.ndim != 2 or axis != 0 or block < 16 or block & (block - 1) or scale is None \
            or scale.shape != (codes.shape[0] // block, codes.shape[1]) or codes.shape[0] % block:
        return None
    return Int4Linear(node, dq, codes, scale.astype(np.float32), int(block))


def pack_nibbles(codes: np.ndarray, block: int) -> np.ndarray:
    """MatMulNBits' B layout of int4 ``codes`` [K, N]: uint8 [N, K / block, block / 2], two codes + 8 per byte,
    the lower-index code in the low nibble."""
    k, n = codes.shape
    stored = (codes.T.astype(np.int16) + ZERO_POINT).astype(np.uint8).reshape(n, k // block, block // 2, 2)
    return stored[..., 0] | (stored[..., 1] << 4)


@dataclasses.dataclass(frozen=True)
class LowerInt4OrtPass(ir.passes.InPlacePass):
    """Replace each int4 weight linear by ``com.microsoft.MatMulNBits`` (recipe name ``ort-int4``).

    Rewrite: ``MatMul(a, DequantizeLinear(codes, scale, axis 0, block_size b))`` (what ``quantize`` and
    ``quantize-gptq`` write for ``weights: int4``) becomes ``MatMulNBits(a, packed codes + 8, scale^T, bits 4,
    block_size b, accuracy_level)``: the kernel reads the 4-bit weights, so nothing dequantizes the whole
    weight at every run (ONNX Runtime does not fuse this pattern itself when ``a`` comes from an activation
    DequantizeLinear). The activation's own Quantize/DequantizeLinear pair is kept.

    ``accuracy_level`` 0 (default) computes in float32: the same products as the QDQ graph, equal up to float
    summation order. Level 4 lets the kernel round the activations to int8 per block (faster, lossy). dINT4
    weights (a lookup, not a uniform grid) and Gemm linears are left as they are. A second run changes nothing.
    """

    accuracy_level: int = 0

    def __post_init__(self) -> None:
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise RecipeError(f"ort-int4 accuracy_level must be 0-4 (MatMulNBits), got {self.accuracy_level}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        matches = [m for node in graph if (m := match_int4_linear(node)) is not None]
        if not matches:
            return ir.passes.PassResult(model, False)
        graph.opset_imports.setdefault(MS_DOMAIN, 1)
        for match in matches:
            _lower(graph, match, self.accuracy_level)
        log.info("lowered %d int4 linears to MatMulNBits (accuracy level %d)", len(matches), self.accuracy_level)
        return ir.passes.PassResult(model, True)


def _lower(graph: ir.Graph, match: Int4Linear, accuracy_level: int) -> None:
    k, n = match.codes.shape
    base = match.dequantize.name or match.matmul.name
    packed = new_initializer(graph, f"{base}.nbits", pack_nibbles(match.codes, match.block))
    scales = new_initializer(graph, f"{base}.nbits_scale", np.ascontiguousarray(match.scale.T).reshape(-1))
    node = ir.node("MatMulNBits", [match.matmul.inputs[0], packed, scales], domain=MS_DOMAIN, name=f"{base}.nbits",
                   attributes={"K": k, "N": n, "bits": 4, "block_size": match.block, "accuracy_level": accuracy_level})
    node.metadata_props[Meta.LOWERED] = "int4"
    replace_node_output(graph, match.matmul, node, f"{base}.nbits_out")  # the logits keep their name
    remove_if_unused(graph, match.dequantize)
