"""Facts about a Q/DQ graph that the TensorRT check reads: which values are build-time constants, what produces a
value (through shape-only ops), static dimensions, the quantized type of a Q/DQ node, and the output-channel and
reduction axes of the weight a Q/DQ feeds. No rules here: :mod:`qexport.runtimes.tensorrt.check` judges these facts."""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import onnx_ir as ir

log = logging.getLogger(__name__)


def all_nodes(model: ir.Model) -> Iterator[ir.Node]:
    """Every node of the model: the main graph, its subgraphs, and the model-local functions."""
    yield from ir.traversal.RecursiveGraphIterator(model.graph)
    for function in model.functions.values():
        yield from ir.traversal.RecursiveGraphIterator(function)


def node_name(node: ir.Node) -> str:
    """The node's name for a message (unnamed nodes by their op type)."""
    return node.name or f"<unnamed {node.op_type}>"


def producer_op(value: ir.Value | None, look_through: frozenset[str] = frozenset()) -> str | None:
    """The op type that produces ``value``, past any ops in ``look_through`` (first input); None for an input."""
    producer = value.producer() if value is not None else None
    while producer is not None and producer.op_type in look_through:
        producer = producer.inputs[0].producer() if producer.inputs[0] is not None else None
    return producer.op_type if producer is not None else None


def quantized_type(node: ir.Node) -> ir.DataType | None:
    """DQ: its input's type. Q: output, else zero point, else output_dtype, else ONNX's default uint8."""
    if node.op_type == "DequantizeLinear":
        x = node.inputs[0]
        producer = x.producer() if x is not None else None
        if x is not None and x.dtype is None and producer is not None and producer.op_type == "QuantizeLinear":
            return quantized_type(producer)  # intermediate values may carry no type before shape inference
        return x.dtype if x is not None else None
    zero_point = node.inputs[2] if len(node.inputs) > 2 else None
    output_dtype = node.attributes.get_int("output_dtype", 0)
    return node.outputs[0].dtype or (zero_point.dtype if zero_point is not None else None) or \
        (ir.DataType(output_dtype) if output_dtype else ir.DataType.UINT8)


def static_dims(value: ir.Value | None) -> tuple[int, ...] | None:
    """The value's shape when every dimension is a known integer, else None."""
    if value is None or value.shape is None or not all(isinstance(d, int) for d in value.shape):
        return None
    return tuple(value.shape)


def weight_axes(node: ir.Node, rank: int) -> tuple[int | None, int | None]:
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
    log.debug("%s: no MatMul/Gemm/Conv weight consumer, axis rule not applied", node_name(node))
    return None, None


class Constness:
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
