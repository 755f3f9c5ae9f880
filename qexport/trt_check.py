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

Placement advice that does not stop a build (one quantized GEMM input only) is reported as a warning.
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
    consts = _Constness()
    for node in _all_nodes(model):
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


def _all_nodes(model: ir.Model) -> Iterator[ir.Node]:
    yield from ir.traversal.RecursiveGraphIterator(model.graph)
    for function in model.functions.values():
        yield from ir.traversal.RecursiveGraphIterator(function)


def _name(node: ir.Node) -> str:
    return node.name or f"<unnamed {node.op_type}>"


def _check_opset(model: ir.Model, target: TensorRTTarget) -> Iterator[Finding]:
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if opset is not None and not target.min_opset <= opset <= target.max_opset:
        yield Finding(Rule.OPSET, "<model>", f"default-domain opset {opset} is outside TensorRT's "
                      f"{target.min_opset}..{target.max_opset}; export with an opset in that range")


def _check_node(node: ir.Node, model: ir.Model, target: TensorRTTarget, consts: "_Constness") -> Iterator[Finding]:
    if node.domain not in STANDARD_DOMAINS:
        if (node.domain, node.op_type, node.overload) not in model.functions:
            yield Finding(Rule.UNSUPPORTED_OP, _name(node), f"{node.domain}::{node.op_type} is not an ONNX operator; "
                          "TensorRT imports only standard ops, local functions and registered plugins: use "
                          "QuantizeLinear/DequantizeLinear and MatMul instead of contrib ops")
        return
    if node.op_type in UNSUPPORTED_OPS:
        hint = "use static QuantizeLinear/DequantizeLinear pairs" if "Quant" in node.op_type or "Integer" in \
            node.op_type or node.op_type.startswith("QLinear") else "rewrite the graph without it"
        yield Finding(Rule.UNSUPPORTED_OP, _name(node), f"TensorRT's ONNX parser does not support {node.op_type}; {hint}")
    elif node.op_type in ("QuantizeLinear", "DequantizeLinear"):
        yield from _check_qdq(node, target, consts)
    elif node.op_type in ("MatMul", "Gemm"):
        dequantized = [_producer_op(v, look_through=SHAPE_OPS) == "DequantizeLinear" for v in node.inputs[:2]]
        if any(dequantized) and not all(dequantized):
            yield Finding(Rule.QDQ_PLACEMENT, _name(node), "only one input is dequantized, so TensorRT runs a "
                          "weight-only or float GEMM here; for an INT8 GEMM quantize the activation too (Q/DQ)",
                          Severity.WARNING)


def _producer_op(value: ir.Value | None, look_through: frozenset[str] = frozenset()) -> str | None:
    producer = value.producer() if value is not None else None
    while producer is not None and producer.op_type in look_through:
        producer = producer.inputs[0].producer() if producer.inputs[0] is not None else None
    return producer.op_type if producer is not None else None


def _check_qdq(node: ir.Node, target: TensorRTTarget, consts: "_Constness") -> Iterator[Finding]:
    name, is_dq = _name(node), node.op_type == "DequantizeLinear"
    x, scale = node.inputs[0], node.inputs[1]
    zero_point = node.inputs[2] if len(node.inputs) > 2 else None
    qtype = _quantized_type(node)
    weight = x is not None and consts.is_constant(x)
    if qtype is not None and qtype not in QUANTIZED_TYPES:
        hint = " (without a zero point ONNX quantizes to uint8)" if qtype == ir.DataType.UINT8 and not is_dq else ""
        yield Finding(Rule.QDQ_TYPE, name, f"quantized type {qtype.name} is not one TensorRT "
                      f"supports{hint}; use int8 (symmetric, zero point 0), float8e4m3fn, or int4 for weights")
    if is_dq and not weight and _producer_op(x) != "QuantizeLinear":
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


def _quantized_type(node: ir.Node) -> ir.DataType | None:
    """DQ: its input's type. Q: output, else zero point, else output_dtype, else ONNX's default uint8."""
    if node.op_type == "DequantizeLinear":
        x = node.inputs[0]
        producer = x.producer() if x is not None else None
        if x is not None and x.dtype is None and producer is not None and producer.op_type == "QuantizeLinear":
            return _quantized_type(producer)  # intermediate values may carry no type before shape inference
        return x.dtype if x is not None else None
    zero_point = node.inputs[2] if len(node.inputs) > 2 else None
    output_dtype = node.attributes.get_int("output_dtype", 0)
    return node.outputs[0].dtype or (zero_point.dtype if zero_point is not None else None) or \
        (ir.DataType(output_dtype) if output_dtype else ir.DataType.UINT8)


def _static_dims(value: ir.Value | None) -> tuple[int, ...] | None:
    if value is None or value.shape is None or not all(isinstance(d, int) for d in value.shape):
        return None
    return tuple(value.shape)


def _check_granularity(
    node: ir.Node, x: ir.Value, scale: ir.Value, qtype: ir.DataType | None, weight: bool, target: TensorRTTarget
) -> Iterator[Finding]:
    name, x_dims, s_dims = _name(node), _static_dims(x), _static_dims(scale)
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
    out_axis, in_axis = _weight_axes(node, len(x_dims))
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
    name = _name(node)
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


def _weight_axes(node: ir.Node, rank: int) -> tuple[int | None, int | None]:
    """Output-channel and reduction axes of the weight, from the GEMM it feeds (through its DQ for a Q)."""
    outputs = list(node.outputs)
    if node.op_type == "QuantizeLinear":
        outputs = [o for use, _ in node.outputs[0].uses() if use.op_type == "DequantizeLinear" for o in use.outputs]
    for value in outputs:
        for consumer, index in value.uses():
            if consumer.op_type == "MatMul" and index == 1 and rank >= 2:
                return rank - 1, rank - 2
            if consumer.op_type == "Gemm" and index == 1:
                return (0, 1) if consumer.attributes.get_int("transB", 0) else (1, 0)
            if consumer.op_type == "Conv" and index == 1:
                return 0, 1
    log.debug("%s: no MatMul/Gemm/Conv weight consumer, axis rule not applied", _name(node))
    return None, None


class _Constness:
    """Whether a value is known at build time (initializer, Constant, or computed only from those)."""

    def __init__(self) -> None:
        self._memo: dict[int, bool] = {}

    def is_constant(self, value: ir.Value) -> bool:
        key = id(value)
        if key not in self._memo:
            self._memo[key] = False  # cycles (loop-carried values) are not constant
            producer = value.producer()
            if value.const_value is not None:
                self._memo[key] = True
            elif producer is not None and producer.op_type not in ("Shape", "Size", "RandomNormal", "RandomUniform",
                                                                     "RandomNormalLike", "RandomUniformLike"):
                self._memo[key] = all(v is None or self.is_constant(v) for v in producer.inputs)
        return self._memo[key]

    @staticmethod
    def array(value: ir.Value) -> np.ndarray | None:
        """The value as numpy when it is an initializer or a Constant's output; None otherwise."""
        if value.const_value is not None:
            return value.const_value.numpy()
        producer = value.producer()
        if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
            return producer.attributes["value"].as_tensor().numpy()
        return None

    def trace(self, value: ir.Value | None, limit: int = 6) -> str:
        """The run-time ops that compute ``value``, breadth first, for the message."""
        ops: list[str] = []
        frontier = [value]
        while frontier and len(ops) < limit:
            v = frontier.pop(0)
            if v is not None and not self.is_constant(v):
                producer = v.producer()
                ops.append(producer.op_type if producer is not None else f"input {v.name!r}")
                frontier.extend(producer.inputs if producer is not None else [])
        return " <- ".join(dict.fromkeys(ops)) or "unknown"
