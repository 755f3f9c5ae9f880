"""Weight quantizers and the writer that feeds a linear from ``DequantizeLinear(int weight, scale)``."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qexport.passes import sites as site_matching
from qexport.passes._util import drop_if_unused, new_initializer
from qexport.passes.linear_select import TAG


def quantize_weight(w_in_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output channel of an [in, out] weight: (q int8 [in, out], scale [out])."""
    absmax = np.abs(w_in_out).max(axis=0)
    scale = np.where(absmax > 0, absmax / 127.0, 1.0)
    q = np.clip(np.round(w_in_out / scale), -127, 127).astype(np.int8)
    return q, scale


def write_quantized_weight(graph: ir.Graph, linear: site_matching.Linear, q: np.ndarray, scale: np.ndarray) -> None:
    """Feed the linear's weight input from ``DequantizeLinear(q, scale)``; ``q`` int8 [in, out], ``scale`` [out]."""
    dtype = linear.weight.const_value.numpy().dtype
    gemm_trans = linear.node.op_type == "Gemm" and linear.layout == "out_in"
    stored, axis = (q.T, 0) if gemm_trans else (q, 1)
    base = linear.weight.name if linear.transpose is None else f"{linear.weight.name}.T"
    q_value = new_initializer(graph, f"{base}.int8", np.ascontiguousarray(stored))
    s_value = new_initializer(graph, f"{base}.scale", scale.astype(dtype))
    dq = tagged(ir.node("DequantizeLinear", [q_value, s_value], {"axis": axis}, name=f"{base}.dq"), "weight")
    dq.outputs[0].name = f"{base}.dq"
    dq.outputs[0].dtype, dq.outputs[0].shape = ir.DataType.from_numpy(dtype), ir.Shape(stored.shape)
    graph.insert_before(linear.node, dq)
    old = linear.node.inputs[1]
    linear.node.replace_input_with(1, dq.outputs[0])
    if linear.transpose is not None and not linear.transpose.outputs[0].uses():
        graph.remove(linear.transpose, safe=True)
    drop_if_unused(graph, linear.weight)
    if old is not linear.weight:
        drop_if_unused(graph, old)


def tagged(node: ir.Node, kind: str) -> ir.Node:
    """Mark ``node`` as inserted by quantization (``kind``: "weight", "per_token", "per_tensor")."""
    node.metadata_props[TAG] = kind
    return node
