"""Activation quantizers as QuantizeLinear/DequantizeLinear nodes: per-token dynamic and per-tensor static int8,
shared by ``quantize`` (which keeps them) and ``quantize-gptq`` (which simulates later layers' inputs with them)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qexport import numerics
from qexport.passes._ir import new_initializer
from qexport.passes.quantize.weight_quant import tagged


class SharedConsts:
    """Initializers shared by every per-token quantizer (created on first use)."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self._values: dict[str, ir.Value] = {}

    def get(self, name: str, array: np.ndarray) -> ir.Value:
        if name not in self._values:
            self._values[name] = new_initializer(self.graph, f"qexport.quant.{name}", array)
        return self._values[name]

    def remove_unused(self) -> None:
        """Take the constants no node reads any more off the graph."""
        for name, value in list(self._values.items()):
            if not value.uses():
                self.graph.initializers.pop(value.name)
                del self._values[name]


def _float_like(value: ir.Value, like: ir.Value, name: str) -> ir.Value:
    value.name = name
    value.dtype, value.shape = like.dtype, like.shape
    return value


def per_token_qdq(graph: ir.Graph, x: ir.Value, width: int, before: ir.Node,
                  consts: SharedConsts) -> tuple[ir.Value, list[ir.Node]]:
    """x -> per-token symmetric int8 Q/DQ inserted before ``before``; returns the dequantized value and the nodes."""
    return _dynamic_qdq(graph, x, f"{x.name}.qtok", "per_token", width, [], before, consts)


def per_tensor_qdq(graph: ir.Graph, x: ir.Value, scale: float, before: ir.Node) -> ir.Value:
    """x -> per-tensor symmetric int8 Q/DQ with a constant scale; returns the dequantized value."""
    dtype = x.dtype.numpy() if x.dtype is not None else np.float32
    base = f"{x.name}.qten"
    s = new_initializer(graph, f"{base}.scale", np.array(scale, dtype))
    zp = new_initializer(graph, f"{base}.zero_point", np.array(0, np.int8))
    q = ir.node("QuantizeLinear", [x, s, zp], name=f"{base}.q")
    q.outputs[0].name, q.outputs[0].dtype = f"{base}.q", ir.DataType.INT8
    dq = ir.node("DequantizeLinear", [q.outputs[0], s, zp], name=f"{base}.dq")
    graph.insert_before(before, [tagged(q, "per_tensor"), tagged(dq, "per_tensor")])
    return _float_like(dq.outputs[0], x, f"{base}.dq")


def per_block_qdq(graph: ir.Graph, x: ir.Value, width: int, block: int, before: ir.Node,
                  consts: SharedConsts, tag: str = "per_block") -> tuple[ir.Value, list[ir.Node]]:
    """x [..., width] -> symmetric int8 Q/DQ with one scale per token and ``block`` consecutive channels, inserted
    before ``before``; returns the dequantized value and the nodes, tagged ``tag`` (``quantize`` keeps its
    ``per_group`` quantizers; GPTQ removes its ``per_block`` ones). ``block`` must divide ``width``."""
    base = f"{x.name}.qblk"
    rank = len(x.shape) if x.shape is not None else 3  # [batch, seq, width], or OPT's flattened [tokens, width]
    blocks = consts.get(f"blocks_{rank}_{width}_{block}", np.array([0] * (rank - 1) + [width // block, block], np.int64))
    reshape = ir.node("Reshape", [x, blocks], name=f"{base}.blocks")
    reshape.outputs[0].name = f"{base}.blocks"
    return _dynamic_qdq(graph, x, base, tag, block, [reshape], before, consts)


def _dynamic_qdq(graph: ir.Graph, x: ir.Value, base: str, tag: str, block: int, grouping: list[ir.Node],
                 before: ir.Node, consts: SharedConsts) -> tuple[ir.Value, list[ir.Node]]:
    """x -> symmetric int8 Q/DQ along the last axis in blocks of ``block``, each block's scale its absmax / 127
    computed in the graph: over the last axis of x, or of ``grouping``'s output (x reshaped into the blocks, whose
    reduced axis is then dropped). Returns the dequantized value and the nodes, inserted before ``before``."""
    dtype = x.dtype.numpy() if x.dtype is not None else np.float32
    source = grouping[-1].outputs[0] if grouping else x
    abs_ = ir.node("Abs", [source], name=f"{base}.abs")
    reduce = ir.node("ReduceMax", [abs_.outputs[0], consts.get("axis_last", np.array([-1], np.int64))],
                     {"keepdims": 0 if grouping else 1}, name=f"{base}.absmax")
    qmax = consts.get(f"qmax_{np.dtype(dtype).name}", np.array(numerics.INT8_QMAX, dtype))
    div = ir.node("Div", [reduce.outputs[0], qmax], name=f"{base}.scale_raw")
    eps = consts.get(f"eps_{np.dtype(dtype).name}", np.array(numerics.SCALE_EPS, dtype))
    scale = ir.node("Max", [div.outputs[0], eps], name=f"{base}.scale")
    q = ir.node("QuantizeLinear", [x, scale.outputs[0]],
                {"axis": -1, "block_size": block, "output_dtype": ir.DataType.INT8.value}, name=f"{base}.q")
    dq = ir.node("DequantizeLinear", [q.outputs[0], scale.outputs[0]], {"axis": -1, "block_size": block},
                 name=f"{base}.dq")
    for node, suffix in ((abs_, "abs"), (reduce, "absmax"), (div, "scale_raw"), (scale, "scale"), (q, "q")):
        node.outputs[0].name = f"{base}.{suffix}"
    q.outputs[0].dtype = ir.DataType.INT8
    nodes = [tagged(n, tag) for n in (*grouping, abs_, reduce, div, scale, q, dq)]
    graph.insert_before(before, nodes)
    return _float_like(dq.outputs[0], x, f"{base}.dq"), nodes
