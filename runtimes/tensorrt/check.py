"""TensorRT explicit-quantization compatibility check, on the CPU: names each node TensorRT would refuse.

Rules and where TensorRT documents them (TensorRT 10.x):

* Opset and operators: ONNX-TensorRT ``docs/operators.md`` (10.15: opsets 9 to 24; ``DynamicQuantizeLinear``,
  ``MatMulInteger``, ``QLinearMatMul`` ... "N"; only standard ONNX ops, model-local functions and plugins import).
* Q/DQ types: "Working with Quantized Types" and the Quantize/Dequantize operator pages: INT8, FP8 (E4M3), FP4 and
  INT4, from FP32/FP16/BF16 with a scale of the same kinds; INT4 is weight-only; symmetric, so every zero point is 0.
* Scales: "The scale tensor must be a build-time constant", scalar (per-tensor), 1-D (per-channel) or of the
  input's rank (block); the ONNX parser also requires positive scales, per-channel only for weights ("Activations-
  quantization does not support per-axis quantization"), one scale per output channel, a single blocked dimension.
* INT4 ("Quantization Schemes"): per-block scales, block size 64 or 128, block dimension one of the last two.

Placement advice that does not stop a build (one quantized GEMM input only) is reported as a warning. The graph
facts these rules read (build-time constness, producers, quantized types, weight axes) come from
:mod:`qexport.runtimes.tensorrt.qdq_graph`.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import os
from typing import Iterable, Iterator

import numpy as np
import onnx_ir as ir

from qexport.errors import QexportError
from qexport.runtimes.tensorrt.qdq_graph import (Constness, all_nodes, node_name, producer_op, quantized_type, static_dims,
                               weight_axes)

log = logging.getLogger(__name__)

QUANTIZED_TYPES = {ir.DataType.INT8, ir.DataType.FLOAT8E4M3FN, ir.DataType.INT4, ir.DataType.FLOAT4E2M1}
FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}
STANDARD_DOMAINS = {"", "ai.onnx"}
# Operators marked "N" (not supported) in ONNX-TensorRT docs/operators.md, TensorRT 10.15.
UNSUPPORTED_OPS = frozenset(
    "AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Col2Im CenterCropPad Compress "
    "ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear ImageDecoder MatMulInteger MaxRoiPool MaxUnpool "
    "MelWeightMatrix Multinomial NegativeLogLikelihoodLoss Optional OptionalGetElement OptionalHasElement "
    "QLinearConv QLinearMatMul RegexFullMatch SequenceAt SequenceConstruct SequenceEmpty SequenceErase "
    "SequenceInsert SequenceLength SequenceMap SoftmaxCrossEntropyLoss SplitToSequence StringConcat "
    "StringNormalizer StringSplit TfIdfVectorizer Unique".split()
)
SHAPE_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"})  # DQ propagates through these


class Rule(str, enum.Enum):
    """Rule ids, as shown to users (``qexport check --json``)."""

    OPSET, UNSUPPORTED_OP = "opset", "unsupported-op"
    QDQ_TYPE, SCALE_TYPE, ZERO_POINT = "qdq-type", "scale-type", "zero-point"
    DYNAMIC_SCALE, SCALE_NOT_POSITIVE, SCALE_SHAPE = "dynamic-scale", "scale-not-positive", "scale-shape"
    ACTIVATION_PER_CHANNEL, WEIGHT_AXIS = "activation-per-channel", "weight-axis"
    INT4_ACTIVATION, INT4_NOT_BLOCKED, BLOCK_ACTIVATION = "int4-activation", "int4-not-blocked", "block-activation"
    BLOCK_SIZE, BLOCK_AXIS, BLOCK_LAYOUT = "block-size", "block-axis", "block-layout"
    Q_WITHOUT_DQ, DQ_WITHOUT_Q, QDQ_PLACEMENT = "q-without-dq", "dq-without-q", "qdq-placement"


class Severity(str, enum.Enum):
    ERROR, WARNING = "error", "warning"


@dataclasses.dataclass(frozen=True)
class Finding:
    """One violation: which rule, which node, and what to do about it."""

    rule: Rule
    node: str
    message: str
    severity: Severity = Severity.ERROR

    def to_json(self) -> dict[str, str]:
        return {"rule": self.rule.value, "node": self.node, "message": self.message, "severity": self.severity.value}


@dataclasses.dataclass(frozen=True)
class TensorRTTarget:
    """What the targeted TensorRT accepts (defaults: TensorRT 10.15 documentation)."""

    min_opset: int = 9
    max_opset: int = 24
    int4_block_sizes: tuple[int, ...] = (64, 128)


class TensorRTIncompatibleError(QexportError):
    """The model breaks TensorRT's explicit-quantization rules; the message lists each finding."""

    def __init__(self, findings: list[Finding]) -> None:
        self.findings = findings
        super().__init__("the model is not compatible with TensorRT:\n" + format_findings(findings))


def check_model(model: ir.Model, target: TensorRTTarget = TensorRTTarget()) -> list[Finding]:
    """Every finding for ``model``, errors first, in graph order."""
    findings = list(_check_opset(model, target))
    consts = Constness()
    for node in all_nodes(model):
        findings.extend(_check_node(node, model, target, consts))
    return sorted(findings, key=lambda f: f.severity != Severity.ERROR)


def check_path(path: str | os.PathLike, target: TensorRTTarget = TensorRTTarget()) -> list[Finding]:
    return check_model(ir.load(os.fspath(path)), target)


def errors(findings: Iterable[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == Severity.ERROR]


def require_compatible(model: ir.Model, target: TensorRTTarget = TensorRTTarget()) -> list[Finding]:
    """Raise :class:`TensorRTIncompatibleError` on any error; return the warnings."""
    findings = check_model(model, target)
    if errors(findings):
        raise TensorRTIncompatibleError(errors(findings))
    return findings


def format_findings(findings: Iterable[Finding]) -> str:
    return "\n".join(f"  [{f.severity.value}] {f.rule.value} at {f.node}: {f.message}" for f in findings) or "  none"


def _check_opset(model: ir.Model, target: TensorRTTarget) -> Iterator[Finding]:
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if opset is not None and not target.min_opset <= opset <= target.max_opset:
        yield Finding(Rule.OPSET, "<model>", f"default-domain opset {opset} is outside TensorRT's "
                      f"{target.min_opset}..{target.max_opset}; export with an opset in that range")


def _check_node(node: ir.Node, model: ir.Model, target: TensorRTTarget, consts: Constness) -> Iterator[Finding]:
    name = node_name(node)
    if node.domain not in STANDARD_DOMAINS:
        if (node.domain, node.op_type, node.overload) not in model.functions:
            yield Finding(Rule.UNSUPPORTED_OP, name, f"{node.domain}::{node.op_type} is not an ONNX operator; "
                          "TensorRT imports only standard ops, local functions and registered plugins: use "
                          "QuantizeLinear/DequantizeLinear and MatMul instead of contrib ops")
        return
    if node.op_type in UNSUPPORTED_OPS:
        hint = "use static QuantizeLinear/DequantizeLinear pairs" if "Quant" in node.op_type or "Integer" in \
            node.op_type or node.op_type.startswith("QLinear") else "rewrite the graph without it"
        yield Finding(Rule.UNSUPPORTED_OP, name, f"TensorRT's ONNX parser does not support {node.op_type}; {hint}")
    elif node.op_type in ("QuantizeLinear", "DequantizeLinear"):
        yield from _check_qdq(node, target, consts)
    elif node.op_type in ("MatMul", "Gemm"):
        dequantized = [producer_op(v, look_through=SHAPE_OPS) == "DequantizeLinear" for v in node.inputs[:2]]
        if any(dequantized) and not all(dequantized):
            yield Finding(Rule.QDQ_PLACEMENT, name, "only one input is dequantized, so TensorRT runs a "
                          "weight-only or float GEMM here; for an INT8 GEMM quantize the activation too (Q/DQ)",
                          Severity.WARNING)


def _check_qdq(node: ir.Node, target: TensorRTTarget, consts: Constness) -> Iterator[Finding]:
    name, is_dq = node_name(node), node.op_type == "DequantizeLinear"
    x, scale = node.inputs[0], node.inputs[1]
    zero_point = node.inputs[2] if len(node.inputs) > 2 else None
    qtype = quantized_type(node)
    weight = x is not None and consts.is_constant(x)
    if qtype is not None and qtype not in QUANTIZED_TYPES:
        hint = " (without a zero point ONNX quantizes to uint8)" if qtype == ir.DataType.UINT8 and not is_dq else ""
        yield Finding(Rule.QDQ_TYPE, name, f"quantized type {qtype.name} is not one TensorRT "
                      f"supports{hint}; use int8 (symmetric, zero point 0), float8e4m3fn, or int4 for weights")
    if is_dq and not weight and producer_op(x) != "QuantizeLinear":
        yield Finding(Rule.DQ_WITHOUT_Q, name, "dequantizes a run-time tensor that no QuantizeLinear produced; "
                      "TensorRT takes quantized data only from constants or a QuantizeLinear")
    if not is_dq:
        uses = [use for out in node.outputs for use in out.uses()]
        if any(n.op_type != "DequantizeLinear" for n, _ in uses) or any(o.is_graph_output() for o in node.outputs):
            yield Finding(Rule.Q_WITHOUT_DQ, name, "its output must feed only DequantizeLinear nodes; "
                          "add a DequantizeLinear after it (Q/DQ pairs)")
    if scale is not None and scale.dtype is not None and scale.dtype not in FLOAT_TYPES:
        yield Finding(Rule.SCALE_TYPE, name, f"scale type {scale.dtype.name} must be float32, float16 or bfloat16")
    if scale is None or not consts.is_constant(scale):
        yield Finding(Rule.DYNAMIC_SCALE, name, f"the scale is computed at run time ({consts.trace(scale)}); "
                      "TensorRT needs build-time scales: use calibrated static per-tensor activation scales "
                      "(w8a8-static) instead of a dynamic-quantization subgraph")
        return
    scale_array = consts.array(scale)
    if scale_array is not None and not np.all(scale_array.astype(np.float32) > 0):
        yield Finding(Rule.SCALE_NOT_POSITIVE, name, "every scale must be positive; clamp scales to a small minimum")
    if zero_point is not None:
        zp = consts.array(zero_point) if consts.is_constant(zero_point) else None
        if zp is None or np.any(zp.astype(np.float32) != 0):
            yield Finding(Rule.ZERO_POINT, name, "TensorRT quantization is symmetric: the zero point must be a "
                          "constant of zeros; requantize with zero point 0 (or drop it and set output_dtype)")
    yield from _check_granularity(node, x, scale, qtype, weight, target)


def _check_granularity(
    node: ir.Node, x: ir.Value, scale: ir.Value, qtype: ir.DataType | None, weight: bool, target: TensorRTTarget
) -> Iterator[Finding]:
    name, x_dims, s_dims = node_name(node), static_dims(x), static_dims(scale)
    if s_dims is None:
        log.debug("%s: scale shape unknown, granularity not checked", name)
        return
    rank = len(x_dims) if x_dims is not None else (x.shape.rank() if x.shape is not None else None)
    size = math.prod(s_dims)
    blocked = node.attributes.get_int("block_size", 0) > 0 or (size > 1 and rank is not None and rank >= 2
                                                               and len(s_dims) == rank)
    per_channel = size > 1 and not blocked
    if not weight:
        if qtype == ir.DataType.INT4:
            yield Finding(Rule.INT4_ACTIVATION, name, "TensorRT supports INT4 for weights only; quantize "
                          "activations to int8 (per-tensor) or leave them in floating point")
        elif blocked:
            yield Finding(Rule.BLOCK_ACTIVATION, name, "block quantization of a run-time tensor is not a static "
                          "Q/DQ TensorRT takes; use one per-tensor scale for activations")
        if per_channel:
            yield Finding(Rule.ACTIVATION_PER_CHANNEL, name, f"activation scales must be per-tensor (scalar), "
                          f"got shape {list(s_dims)}; calibrate one scale for the whole tensor")
        return
    if qtype == ir.DataType.INT4 and not blocked:
        yield Finding(Rule.INT4_NOT_BLOCKED, name, "INT4 weights need per-block scales (blocked DequantizeLinear, "
                      f"block size {' or '.join(map(str, target.int4_block_sizes))} along the input axis)")
    if x_dims is None:
        return
    axis = node.attributes.get_int("axis", 1) % max(len(x_dims), 1)
    out_axis, in_axis = weight_axes(node, len(x_dims))
    if per_channel:
        if len(s_dims) != 1 or s_dims[0] != x_dims[axis]:
            yield Finding(Rule.SCALE_SHAPE, name, f"{s_dims[0] if s_dims else 0} scales for axis {axis} of "
                          f"length {x_dims[axis]}; give one scale per output channel")
        elif out_axis is not None and axis != out_axis:
            yield Finding(Rule.WEIGHT_AXIS, name, f"per-channel axis {axis} is not the consumer's output-channel "
                          f"axis {out_axis}; quantize per output channel (axis={out_axis})")
    elif blocked:
        yield from _check_blocks(node, x_dims, s_dims, axis, in_axis, qtype, target)


def _check_blocks(
    node: ir.Node, x_dims: tuple[int, ...], s_dims: tuple[int, ...], axis: int, in_axis: int | None,
    qtype: ir.DataType | None, target: TensorRTTarget,
) -> Iterator[Finding]:
    name = node_name(node)
    if len(s_dims) != len(x_dims):
        yield Finding(Rule.BLOCK_LAYOUT, name, f"block scales must have the weight's rank {len(x_dims)}")
        return
    blocked_dims = [i for i, (xd, sd) in enumerate(zip(x_dims, s_dims)) if xd != sd]
    block = node.attributes.get_int("block_size", 0) or (x_dims[axis] // max(s_dims[axis], 1))
    if blocked_dims not in ([axis], []) or x_dims[axis] % block or s_dims[axis] != x_dims[axis] // block:
        yield Finding(Rule.BLOCK_LAYOUT, name, f"scale shape {list(s_dims)} does not block weight {list(x_dims)} "
                      f"along axis {axis} alone by {block}; block one axis whose length the block size divides")
    if axis < len(x_dims) - 2:
        yield Finding(Rule.BLOCK_AXIS, name, f"block axis {axis} must be one of the last two dimensions")
    elif in_axis is not None and axis != in_axis:
        yield Finding(Rule.BLOCK_AXIS, name, f"blocks run along axis {axis}, but the consumer reduces over axis "
                      f"{in_axis}; block along the input (reduction) axis")
    if qtype == ir.DataType.INT4:
        if block not in target.int4_block_sizes:
            yield Finding(Rule.BLOCK_SIZE, name, f"INT4 block size {block} is not supported; use "
                          f"{' or '.join(map(str, target.int4_block_sizes))}")
        if x_dims[-1] % 2:
            yield Finding(Rule.BLOCK_LAYOUT, name, "INT4 weights need an even last dimension (two values per byte)")
