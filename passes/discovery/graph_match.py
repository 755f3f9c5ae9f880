"""Building blocks of site matching: weight linears and normalizations as the exporter spells them.

Pure functions over an onnx_ir graph; see :mod:`qexport.passes.discovery.sites` for the spellings matched.
"""

from __future__ import annotations

import dataclasses
import enum
import logging

import numpy as np
import onnx_ir as ir

from qexport.passes._ir import DATA_MOVEMENT, const_array, const_f64, is_token_slice, skip_casts_up
from qexport.passes.metadata import Meta

log = logging.getLogger(__name__)


class NormKind(enum.Enum):
    RMS_DECOMPOSED = "rms_decomposed"
    LAYER_NORM = "LayerNormalization"
    SIMPLIFIED_LAYER_NORM = "SimplifiedLayerNormalization"
    RMS_NORMALIZATION = "RMSNormalization"
    SKIP_LAYER_NORM = "SkipLayerNormalization"
    SKIP_SIMPLIFIED_LAYER_NORM = "SkipSimplifiedLayerNormalization"


# fused op -> (gamma input index, beta input index or None)
_FUSED = {
    NormKind.LAYER_NORM: (1, 2),
    NormKind.SIMPLIFIED_LAYER_NORM: (1, None),
    NormKind.RMS_NORMALIZATION: (1, None),
    NormKind.SKIP_LAYER_NORM: (2, 3),
    NormKind.SKIP_SIMPLIFIED_LAYER_NORM: (2, None),
}
ACTIVATIONS = frozenset({"Gelu", "Relu", "Sigmoid", "Tanh", "Elu", "Selu", "Softplus", "HardSwish", "Mish", "FastGelu"})
POSITIVE_HOMOGENEOUS = frozenset({"Relu", "LeakyRelu"})  # act(x / s) = act(x) / s for s > 0


@dataclasses.dataclass(frozen=True)
class Linear:
    """A weight linear layer. ``weight`` is the initializer as stored: [in, out] or [out, in] (``layout``)."""

    node: ir.Node
    weight: ir.Value
    layout: str  # "in_out" (MatMul B, Gemm transB=0) or "out_in" (Gemm transB=1, MatMul of Transpose(E))
    transpose: ir.Node | None
    bias: ir.Value | None
    bias_node: ir.Node | None  # the bias Add, or the Gemm itself when its C is the bias
    output: ir.Value  # after the bias

    @property
    def input(self) -> ir.Value:
        return self.node.inputs[0]

    def weight_in_out(self) -> np.ndarray:
        """The weight as a float64 [in, out] matrix (ONNX MatMul layout, W transposed)."""
        w = const_f64(self.weight)
        return w if self.layout == "in_out" else w.T

    def bias_array(self) -> np.ndarray | None:
        return None if self.bias is None else const_f64(self.bias)

    @property
    def in_features(self) -> int:
        return self.weight_in_out().shape[0]

    @property
    def out_features(self) -> int:
        return self.weight_in_out().shape[1]


@dataclasses.dataclass(frozen=True)
class Norm:
    """A normalization; ``gamma``/``beta`` are inputs ``gamma_index``/``beta_index`` of ``gamma_node``/``beta_node``."""

    kind: NormKind
    nodes: tuple[ir.Node, ...]
    input: ir.Value
    output: ir.Value
    gamma_node: ir.Node | None
    gamma_index: int | None
    beta_node: ir.Node | None = None
    beta_index: int | None = None

    @property
    def gamma(self) -> ir.Value | None:
        return None if self.gamma_node is None else self.gamma_node.inputs[self.gamma_index]

    @property
    def beta(self) -> ir.Value | None:
        if self.beta_node is None or self.beta_index is None or len(self.beta_node.inputs) <= self.beta_index:
            return None
        return self.beta_node.inputs[self.beta_index]


def match_linear(node: ir.Node) -> Linear | None:
    """The weight linear ``node`` is, or ``None`` (activation x activation MatMuls are not linears).

    MatMuls inserted by a pass as online transforms (tagged ``qexport.online_*`` in their metadata, such as
    the R4 Hadamard) have a constant B but are not model weights, so they are not linears either.
    """
    if is_online_transform(node):
        return None
    if node.op_type == "MatMul" and node.domain == "" and len(node.inputs) == 2:
        b = node.inputs[1]
        if b is None:
            return None
        if const_array(b) is not None and b.const_value.numpy().ndim == 2:
            weight, layout, transpose = b, "in_out", None
        elif (t := b.producer()) is not None and t.op_type == "Transpose" and _perm(t) in ((1, 0), None):
            src = t.inputs[0]
            if const_array(src) is None or src.const_value.numpy().ndim != 2:
                return None
            weight, layout, transpose = src, "out_in", t
        else:
            return None
        out = node.outputs[0]
        consumers = out.consumers()
        if len(consumers) == 1 and not out.is_graph_output():
            add = consumers[0]
            if add.op_type == "Add" and len(add.inputs) == 2:
                other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
                bias = const_array(other)
                width = weight.const_value.numpy().shape[1 if layout == "in_out" else 0]
                if bias is not None and bias.shape == (width,):
                    return Linear(node, weight, layout, transpose, other, add, add.outputs[0])
        return Linear(node, weight, layout, transpose, None, None, out)
    if node.op_type == "Gemm" and node.domain == "":
        attrs = {name: attr.value for name, attr in node.attributes.items()}
        b = node.inputs[1]
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            return None
        if const_array(b) is None:
            return None
        c = node.inputs[2] if len(node.inputs) > 2 else None
        if c is not None and (const_array(c) is None or const_array(c).ndim != 1):
            return None
        layout = "out_in" if attrs.get("transB", 0) else "in_out"
        return Linear(node, b, layout, None, c, node if c is not None else None, node.outputs[0])
    return None


def linear_producing(value: ir.Value) -> Linear | None:
    """The linear whose output (after bias) is ``value``."""
    p = value.producer()
    if p is None:
        return None
    candidates = [p] if p.op_type != "Add" else [i.producer() for i in p.inputs if i is not None and i.producer()]
    for node in candidates:
        lin = match_linear(node)
        if lin is not None and lin.output is value:
            return lin
    return None


def _perm(node: ir.Node) -> tuple[int, ...] | None:
    attr = node.attributes.get("perm")
    return None if attr is None else tuple(attr.value)


def find_norms(graph: ir.Graph) -> list[Norm]:
    """Every normalization in ``graph`` (residual norms and head norms alike), in graph order."""
    norms = []
    for node in graph:
        kind = next((k for k in _FUSED if k.value == node.op_type), None)
        if kind is not None:
            g, b = _FUSED[kind]
            beta_node = node if b is not None and len(node.inputs) > b and node.inputs[b] is not None else None
            norms.append(Norm(kind, (node,), node.inputs[0], node.outputs[0], node, g, beta_node, b if beta_node else None))
        elif node.op_type == "Sqrt":
            norm = _match_rms_chain(node)
            if norm is not None:
                norms.append(norm)
    return norms


def _match_rms_chain(sqrt: ir.Node) -> Norm | None:
    add = sqrt.inputs[0].producer()
    if add is None or add.op_type != "Add":
        return None
    mean = next((i.producer() for i in add.inputs if i is not None and i.producer() is not None), None)
    if mean is None or mean.op_type != "ReduceMean" or not any(const_array(i) is not None for i in add.inputs):
        return None
    square = mean.inputs[0].producer()
    if square is None or not _is_square(square):
        return None
    x = skip_casts_up(square.inputs[0])
    nodes = [square, mean, add, sqrt]
    scaled = None
    for c in sqrt.outputs[0].consumers():
        if c.op_type == "Div" and c.inputs[1] is sqrt.outputs[0] and skip_casts_up(c.inputs[0]) is x:
            nodes, scaled = nodes + [c], c
        elif c.op_type == "Reciprocal":
            for m in c.outputs[0].consumers():
                if m.op_type == "Mul" and any(skip_casts_up(i) is x for i in m.inputs if i is not c.outputs[0]):
                    nodes, scaled = nodes + [c, m], m
    if scaled is None:
        log.debug("rejected RMS chain at %s: no Mul(x, 1/sqrt) or Div(x, sqrt) on the same x", sqrt.name)
        return None
    out = scaled.outputs[0]
    consumers = out.consumers()
    if len(consumers) == 1 and consumers[0].op_type == "Cast":
        out = consumers[0].outputs[0]
        consumers = out.consumers()
    if len(consumers) == 1 and consumers[0].op_type == "Mul" and not scaled.outputs[0].is_graph_output():
        mul = consumers[0]
        index = 1 if mul.inputs[0] is out else 0
        gamma = const_array(mul.inputs[index])
        if gamma is not None and gamma.ndim == 1:
            return Norm(NormKind.RMS_DECOMPOSED, tuple(nodes + [mul]), x, mul.outputs[0], mul, index)
    return Norm(NormKind.RMS_DECOMPOSED, tuple(nodes), x, out, None, None)


def _is_square(node: ir.Node) -> bool:
    if node.op_type == "Pow":
        exponent = const_array(node.inputs[1])
        return exponent is not None and exponent.size == 1 and float(exponent.reshape(-1)[0]) == 2.0
    return node.op_type == "Mul" and node.inputs[0] is node.inputs[1]


def is_online_transform(node: ir.Node) -> bool:
    """Whether a pass inserted ``node`` as part of an online transform (metadata ``qexport.online_*``)."""
    return any(key.startswith(Meta.ONLINE) for key in node.metadata_props)


def _trace_up(value: ir.Value, depth: int = 12) -> ir.Value:
    """Walk up through data-movement ops (Concat: the one operand that is not a graph input)."""
    for _ in range(depth):
        p = value.producer()
        if p is None or p.op_type not in DATA_MOVEMENT:
            return value
        if p.op_type == "Slice" and not is_token_slice(p):
            return value
        if p.op_type == "Concat":
            computed = [i for i in p.inputs if i is not None and not i.is_graph_input() and i.const_value is None]
            if len(computed) != 1:
                return value
            value = computed[0]
        else:
            value = p.inputs[0]
    return value
