"""LayerNorm -> RMSNorm on the residual stream, exactly, by keeping every residual vector mean-free (QuaRot, OPT)."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from qexport.errors import PatternNotFoundError, QexportError
from qexport.passes.discovery import sites
from qexport.passes._ir import const_array, const_f64, drop_if_unused, new_initializer, set_const_input, write_bias, write_weight

log = logging.getLogger(__name__)

_NAME = "layernorm-to-rms"
_FLOATS = (ir.DataType.FLOAT, ir.DataType.DOUBLE)  # other dtypes are normalized in float32, as LayerNorm's stash_type


@dataclasses.dataclass(frozen=True)
class Conversion:
    """What the pass rewrites: the Gathers whose tables feed the stream, its writers and its LayerNorms."""

    tables: tuple[ir.Node, ...]  # token embedding Gather, then learned position Gathers
    writers: tuple[sites.Linear, ...]  # out_proj / fc2 (o_proj / down_proj)
    norms: tuple[sites.Norm, ...]  # every residual norm, all LayerNormalization with gamma = 1, beta = 0


@dataclasses.dataclass(frozen=True)
class LayerNormToRmsPass(ir.passes.InPlacePass):
    """Make every residual-stream LayerNorm an RMSNorm with the same eps, keeping the model's outputs.

    With gamma = 1 and beta = 0, LayerNorm(x) = (x - mean(x)) / sqrt(var(x) + eps), which equals
    RMSNorm(x) = x / sqrt(mean(x²) + eps) whenever mean(x) = 0. The residual stream is a sum of the
    embedding rows, the position rows and the writers' outputs, so making each of those mean-free over the
    channels makes every residual vector mean-free. Rewrite cases (float64 arithmetic, W in [in, out] layout):

    1. token and learned position embedding tables: every row minus its mean (copy-on-write, so a tied
       lm_head keeps the original table);
    2. writers (out_proj, fc2): W <- W - mean of W over the output axis (row mean), b <- b - mean(b);
    3. each ``LayerNormalization`` -> ``Pow(x, 2) -> ReduceMean(-1) -> Add(eps) -> Sqrt -> Reciprocal ->
       Mul(x, .) -> Mul(gamma = ones, .)``, the exporter's Llama spelling (``passes.sites`` matches it). The
       unit-gamma Mul is kept, as fold-norm keeps it, so smoothing after a rotation has a gamma to scale.

    Requires gamma and beta already folded: put ``fold-norm`` first (the pass does not fold itself, so
    that folding stays in one place and the precondition is checked like rotate-residual's).
    Refused with a clear error, before any change: unfolded gamma/beta, a residual branch that does not end
    in a weight linear or whose output is read elsewhere, anything else added into the stream, a direct
    reader of the stream that is not a LayerNorm, a norm between a writer and its residual add.
    ``modified`` is False when the residual stream has no LayerNorm (RMSNorm models, a second run).
    Only the fused ``LayerNormalization`` op is matched: that is what the dynamo export of OPT contains.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        conversion = plan_conversion(model)
        if conversion is None:
            return ir.passes.PassResult(model, False)
        graph = model.graph
        for gather in conversion.tables:
            table = const_f64(gather.inputs[0])
            set_const_input(graph, gather, 0, table - table.mean(axis=1, keepdims=True), f"{gather.inputs[0].name}.centred")
        for linear in conversion.writers:
            w = linear.weight_in_out()
            write_weight(graph, linear, w - w.mean(axis=1, keepdims=True))
            bias = linear.bias_array()
            if bias is not None:
                write_bias(graph, linear, bias - bias.mean())
        for norm in conversion.norms:
            _replace_with_rms(graph, norm)
        log.info("converted %d LayerNorms to RMSNorm: centred %d embedding tables and %d writers",
                 len(conversion.norms), len(conversion.tables), len(conversion.writers))
        return ir.passes.PassResult(model, True)


def plan_conversion(model: ir.Model) -> Conversion | None:
    """What to rewrite, or ``None`` when the residual stream has no LayerNorm; raises if it cannot be exact."""
    graph = model.graph
    if not any(node.op_type == "LayerNormalization" for node in graph):
        return None
    try:
        stream = sites.find_residual_stream(model)
    except PatternNotFoundError as exc:
        raise QexportError(f"{_NAME}: cannot trace the residual stream, so cannot centre its writers: {exc}") from exc
    kinds = {norm.kind for norm in stream.norms}
    if sites.NormKind.LAYER_NORM not in kinds:
        log.info("%s: the residual stream has no LayerNorm; nothing to do", _NAME)
        return None
    for norm in stream.norms:
        _check_layer_norm(norm)
    tables, end = _embedding_tables(stream)
    for block in stream.blocks:
        _check_writer(block)
    _check_readers(stream, [end, *(block.add.outputs[0] for block in stream.blocks)])
    return Conversion(tuple(tables), stream.writers, stream.norms)


def _check_layer_norm(norm: sites.Norm) -> None:
    node = norm.nodes[-1]
    if norm.kind is not sites.NormKind.LAYER_NORM:
        raise QexportError(f"{_NAME}: the residual stream mixes LayerNorm with {norm.kind.value} ({node.name})")
    gamma, beta = const_array(norm.gamma), const_array(norm.beta) if norm.beta is not None else None
    if gamma is None or not np.all(gamma == 1.0) or (norm.beta is not None and (beta is None or np.any(beta != 0.0))):
        raise QexportError(f"{_NAME} needs gamma = 1 and beta = 0 on every residual LayerNorm ({node.name} has "
                           "others): put the fold-norm pass before it")
    axis = node.attributes["axis"].value if "axis" in node.attributes else -1
    rank = len(norm.input.shape) if norm.input.shape is not None else None
    if axis != -1 and (rank is None or axis != rank - 1):
        raise QexportError(f"{_NAME}: {node.name} normalizes axis {axis}, not the channel axis")
    if any(out.uses() or out.is_graph_output() for out in node.outputs[1:]):
        raise QexportError(f"{_NAME}: {node.name} has its Mean/InvStdDev outputs read")
    if norm.output.is_graph_output():
        raise QexportError(f"{_NAME}: {node.name}'s output is a graph output")


def _embedding_tables(stream: sites.ResidualStream) -> tuple[list[ir.Node], ir.Value]:
    """The Gathers summed into the stream before the first norm (token, positions) and the first residual value."""
    tables, current = [stream.embedding], stream.embedding.outputs[0]
    first = stream.norms[0].input
    while first not in _with_reshapes(current):
        users = current.consumers()
        if len(users) != 1 or current.is_graph_output():
            raise QexportError(f"{_NAME}: the embedding value {current.name} is read by {len(users)} nodes before the first norm")
        node = users[0]
        other = next(i for i in node.inputs if i is not current)
        gather = other.producer() if other is not None else None
        if node.op_type == "Add" and gather is not None and gather.op_type == "Gather" and _is_table(gather):
            if len(other.consumers()) != 1 or other.is_graph_output():
                raise QexportError(f"{_NAME}: the position embedding {other.name} is also read outside the stream")
            tables.append(gather)
        elif not (node.op_type == "Mul" and (scale := const_array(other)) is not None and scale.size == 1):
            raise QexportError(f"{_NAME} cannot centre {node.op_type} {node.name}, which writes {other.name} into "
                               "the residual stream (only embedding Gathers, a scalar scale and linears are handled)")
        current = node.outputs[0]
    return tables, current


def _is_table(gather: ir.Node) -> bool:
    table = const_array(gather.inputs[0])
    return table is not None and table.ndim == 2


def _check_writer(block: sites.ResidualBlock) -> None:
    writer = block.writer
    if block.post_norm is not None:
        raise QexportError(f"{_NAME}: a norm sits between the writer {writer.node.name} and the residual add "
                           f"{block.add.name}; its output cannot be centred")
    readers = writer.output.consumers()
    if list(readers) != [block.add] or writer.output.is_graph_output():
        names = ", ".join(n.name for n in readers if n is not block.add) or "a graph output"
        raise QexportError(f"{_NAME} cannot centre the residual writer {writer.node.name}: its output is also read "
                           f"by {names}, which would see the change")


def _check_readers(stream: sites.ResidualStream, residuals: list[ir.Value]) -> None:
    """Every node reading a residual value must be a LayerNorm, a residual add or a Reshape of it."""
    allowed = {norm.nodes[0] for norm in stream.norms} | {block.add for block in stream.blocks}
    for residual in residuals:
        for value in _with_reshapes(residual):
            if value.is_graph_output():
                raise QexportError(f"{_NAME}: the residual value {value.name} is a graph output; centring would change it")
            for node in value.consumers():
                if node not in allowed and not (node.op_type == "Reshape" and node.inputs[0] is value):
                    raise QexportError(f"{_NAME}: {node.op_type} {node.name} reads the residual stream ({value.name}) "
                                       "without a LayerNorm, so it would see the removed mean")


def _with_reshapes(value: ir.Value) -> list[ir.Value]:
    """``value`` and the Reshapes of it (OPT flattens the residual for the MLP). passes.sites has the same walk."""
    found = [value]
    for v in found:
        found += [c.outputs[0] for c in v.consumers() if c.op_type == "Reshape" and c.inputs[0] is v]
    return found


def _replace_with_rms(graph: ir.Graph, norm: sites.Norm) -> None:
    """Swap one LayerNormalization (gamma = 1, beta = 0) for the decomposed RMSNorm with the same eps."""
    ln = norm.nodes[0]
    x, out = norm.input, norm.output
    gamma_value, beta_value = norm.gamma, norm.beta
    eps = ln.attributes["epsilon"].value if "epsilon" in ln.attributes else 1e-5
    dtype = gamma_value.const_value.numpy().dtype
    compute = dtype if np.dtype(dtype) in (np.float32, np.float64) else np.dtype(np.float32)
    width = gamma_value.const_value.numpy().shape[0]
    name = ln.name
    nodes: list[ir.Node] = []

    def add(op: str, inputs: list[ir.Value], suffix: str, **attributes: int) -> ir.Value:
        node = ir.node(op, inputs, attributes=attributes or None, name=f"{name}.rms_{suffix}")
        node.outputs[0].name = f"{out.name}.rms_{suffix}"
        nodes.append(node)
        return node.outputs[0]

    xc = x if compute == dtype else add("Cast", [x], "cast_in", to=ir.DataType.from_numpy(compute).value)
    square = add("Pow", [xc, new_initializer(graph, f"{name}.rms_two", np.array(2.0, dtype=compute))], "pow")
    mean = add("ReduceMean", [square, new_initializer(graph, f"{name}.rms_axes", np.array([-1], dtype=np.int64))],
               "mean", keepdims=1)
    std = add("Sqrt", [add("Add", [mean, new_initializer(graph, f"{name}.rms_eps", np.array(eps, dtype=compute))], "add_eps")],
              "sqrt")
    scaled = add("Mul", [xc, add("Reciprocal", [std], "reciprocal")], "scaled")
    if compute != dtype:
        scaled = add("Cast", [scaled], "cast_out", to=ir.DataType.from_numpy(dtype).value)
    result = add("Mul", [new_initializer(graph, f"{name}.rms_gamma", np.ones(width, dtype=dtype)), scaled], "gamma")
    stored, computed = ir.DataType.from_numpy(np.dtype(dtype)), ir.DataType.from_numpy(np.dtype(compute))
    for node in nodes:
        node.outputs[0].dtype = stored if node.outputs[0] in (scaled, result) else computed
    for value in (xc, square, scaled, result):
        if value is not x:
            value.shape = x.shape
    graph.insert_before(ln, nodes)
    out.replace_all_uses_with(result)
    old_name = out.name
    out.name, result.name = f"{old_name}.layernorm", old_name
    graph.remove(ln, safe=True)
    for value in (gamma_value, beta_value):
        if value is not None:
            drop_if_unused(graph, value)
    log.debug("replaced %s by an RMSNorm (eps %g, width %d)", name, eps, width)
