"""Shared IR helpers for the graph passes: constants, copy-on-write initializers, graph walking.

Every write goes through onnx_ir operations (``register_initializer``, ``replace_input_with``,
``replace_all_uses_with``). Initializers shared between several uses (the exporter deduplicates equal
tensors, e.g. all-ones norm weights or a tied embedding) are copied before a write, never changed under
another user's feet.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterable

import numpy as np
import onnx_ir as ir

from qexport.tensors import weights_as_stubs

if TYPE_CHECKING:  # sites imports this module
    from qexport.passes.discovery.sites import Linear

log = logging.getLogger(__name__)

# Ops that only move data around: a per-channel scale on their input reaches their output unchanged
# in value (possibly at another position), so site tracing may walk through them.
DATA_MOVEMENT = frozenset({"Reshape", "Transpose", "Expand", "Unsqueeze", "Squeeze", "Cast", "Identity", "Concat", "Slice"})


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant held by ``value`` (an initializer), or ``None`` when it is computed."""
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def const_f64(value: ir.Value) -> np.ndarray:
    """The constant held by ``value`` as a float64 array; raises if ``value`` is not a constant."""
    array = const_array(value)
    if array is None:
        raise ValueError(f"{value.name} is not a constant")
    return np.asarray(array, dtype=np.float64)


def unique_name(graph: ir.Graph, base: str) -> str:
    """A value name not used by any initializer of ``graph``."""
    name, k = base, 1
    while name in graph.initializers:
        name, k = f"{base}_{k}", k + 1
    return name


def new_initializer(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a new initializer named after ``base``."""
    name = unique_name(graph, base)
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.shape = ir.Shape(array.shape)
    value.dtype = ir.DataType.from_numpy(array.dtype)
    graph.register_initializer(value)
    return value


def set_const_input(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray, base: str | None = None) -> ir.Value:
    """Make input ``index`` of ``node`` hold ``array`` (cast to the old dtype), copying a shared initializer.

    An initializer used only here is overwritten in place (its name stays); one with other uses, or one
    that is a graph input or output, is left alone and this use is rewired to a new initializer.
    """
    old = node.inputs[index]
    if old is None or old.const_value is None:
        raise ValueError(f"input {index} of {node.name} is not a constant")
    array = np.asarray(array, dtype=old.const_value.numpy().dtype)
    if len(old.uses()) == 1 and not old.is_graph_input() and not old.is_graph_output() and old.is_initializer():
        old.const_value = ir.tensor(array, name=old.name)
        old.shape = ir.Shape(array.shape)
        return old
    new = new_initializer(graph, base or f"{old.name}.{node.name}", array)
    node.replace_input_with(index, new)
    drop_if_unused(graph, old)
    return new


def drop_if_unused(graph: ir.Graph, value: ir.Value) -> None:
    """Remove an initializer nothing reads any more."""
    if value.is_initializer() and not value.uses() and not value.is_graph_output() and value.name in graph.initializers:
        del graph.initializers[value.name]


def skip_casts_up(value: ir.Value) -> ir.Value:
    """Walk up through Cast/Identity producers (an FP16 export casts around norms)."""
    while (p := value.producer()) is not None and p.op_type in ("Cast", "Identity") and p.inputs[0] is not None:
        value = p.inputs[0]
    return value


def reaches(value: ir.Value, op_types: Iterable[str], depth: int) -> bool:
    """Whether a producer within ``depth`` steps upstream of ``value`` has one of ``op_types``."""
    wanted, frontier = set(op_types), [value]
    for _ in range(depth):
        next_frontier = []
        for v in frontier:
            p = v.producer()
            if p is None:
                continue
            if p.op_type in wanted:
                return True
            next_frontier += [i for i in p.inputs if i is not None and i.const_value is None]
        frontier = next_frontier
    return False


def is_token_slice(node: ir.Node) -> bool:
    """A Slice of its data input that never cuts the last (channel) axis: per-channel scales commute with it.

    The exporter leaves full slices (``x[:, -k:, :]`` with k = 0, repeat_kv's ``[:, :, None]``) unsimplified.
    """
    if node.op_type != "Slice" or len(node.inputs) < 3:
        return False
    starts, ends = const_array(node.inputs[1]), const_array(node.inputs[2])
    axes = const_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    steps = const_array(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
    if starts is None or ends is None:
        return False
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    axes = np.arange(len(starts)) if axes is None else axes
    for axis, start, end, step in zip(axes, starts, ends, steps if steps is not None else np.ones_like(starts)):
        last = axis == -1 or (rank is not None and axis == rank - 1)
        if (last or axes is None and rank is None) and not (start == 0 and end >= 2**31 - 1 and step == 1):
            return False
    return True


def channel_readers(value: ir.Value) -> list[tuple[ir.Node, ir.Value]]:
    """(consumer, the value it reads) for the consumers of ``value``, looking through token slices."""
    found = []
    for node in value.consumers():
        if is_token_slice(node) and node.inputs[0] is value and not node.outputs[0].is_graph_output():
            found += channel_readers(node.outputs[0])
        else:
            found.append((node, value))
    return found


def node_order(graph: ir.Graph) -> dict[ir.Node, int]:
    """Position of each top-level node (graphs are topologically sorted)."""
    return {node: i for i, node in enumerate(graph)}


def set_graph_output(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Replace graph output ``old`` by ``new``, moving the output name over so the signature is unchanged."""
    for i, out in enumerate(graph.outputs):
        if out is old:
            name = old.name
            old.name = f"{name}_pre"
            new.name = name
            new.shape, new.type = old.shape, old.type
            graph.outputs[i] = new


def replace_node_output(graph: ir.Graph, old_node: ir.Node, new_node: ir.Node, name: str) -> None:
    """Put ``new_node`` (already built) before ``old_node`` and in its place: its first output, named ``name``, takes
    the old output's type, shape, readers and graph-output name (logits); ``old_node`` is removed."""
    out, old = new_node.outputs[0], old_node.outputs[0]
    out.name, out.dtype, out.shape = name, old.dtype, old.shape
    graph.insert_before(old_node, new_node)
    if old.is_graph_output():
        set_graph_output(graph, old, out)
    old.replace_all_uses_with(out)
    graph.remove(old_node, safe=True)


def write_weight(graph: ir.Graph, linear: "Linear", w_in_out: np.ndarray) -> None:
    """Store the [in, out] float64 matrix ``w_in_out`` as ``linear``'s weight, in its own layout and dtype."""
    stored = w_in_out if linear.layout == "in_out" else w_in_out.T
    node, index = (linear.transpose, 0) if linear.transpose is not None else (linear.node, 1)
    set_const_input(graph, node, index, np.ascontiguousarray(stored))


def write_bias(graph: ir.Graph, linear: "Linear", bias: np.ndarray) -> None:
    """Store ``bias`` (length out) as ``linear``'s bias; adds a Gemm C or an Add after a MatMul if it has none."""
    dtype = linear.weight.const_value.numpy().dtype
    if linear.bias is not None:
        index = next(i for i, v in enumerate(linear.bias_node.inputs) if v is linear.bias)
        set_const_input(graph, linear.bias_node, index, bias)
        return
    value = new_initializer(graph, f"{linear.node.name}.bias", np.asarray(bias, dtype=dtype))
    if linear.node.op_type == "Gemm":
        linear.node.resize_inputs(3)
        linear.node.replace_input_with(2, value)
        return
    out = linear.node.outputs[0]
    add = ir.node("Add", [out, value], name=f"{linear.node.name}.bias_add")
    add.outputs[0].name = f"{out.name}.biased"
    add.outputs[0].dtype, add.outputs[0].shape = out.dtype, out.shape
    graph.insert_after(linear.node, add)
    for use in list(out.uses()):
        if use.node is not add:
            use.node.replace_input_with(use.idx, add.outputs[0])
    if out.is_graph_output():
        set_graph_output(graph, out, add.outputs[0])


def raise_default_opset(graph: ir.Graph, version: int) -> None:
    """Make the graph's default-domain opset at least ``version`` (for an op the pass inserts)."""
    if graph.opset_imports.get("", 1) < version:
        graph.opset_imports[""] = version


def remove_if_unused(graph: ir.Graph, node: ir.Node) -> bool:
    """Remove ``node`` if none of its outputs is used or a graph output, and the initializers only it read;
    returns whether it was removed."""
    if any(o.uses() or o.is_graph_output() for o in node.outputs):
        return False
    inputs = [v for v in node.inputs if v is not None]
    graph.remove(node, safe=True)
    for value in inputs:
        drop_if_unused(graph, value)
    return True


def remove_dead_nodes(graph: ir.Graph) -> int:
    """Remove the nodes none of whose outputs is used or a graph output (in reverse order, so chains go too),
    and the initializers only they read; returns how many nodes."""
    return sum(remove_if_unused(graph, node) for node in reversed(list(graph)))


def plain_linear(node: ir.Node) -> tuple[bool, ir.Value | None] | None:
    """(transposed, bias) of a MatMul, or of a Gemm with no transA, alpha or beta and a constant 1-D bias or none
    (transposed: transB = 1, B stored [out, in]); None for anything else."""
    if node.domain != "" or node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
        return None
    if node.op_type == "MatMul":
        return False, None
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        return None
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None and (const_array(bias) is None or const_array(bias).ndim != 1):
        return None
    return bool(attrs.get("transB", 0)), bias


def producer_of(value: ir.Value | None, op_type: str) -> ir.Node | None:
    """The node computing ``value`` when it is a default-domain ``op_type``, else None."""
    node = value.producer() if value is not None else None
    return node if node is not None and node.domain == "" and node.op_type == op_type else None


def append_node(nodes: list[ir.Node], op: str, inputs: list, name: str, **attributes) -> ir.Value:
    """Append a one-output default-domain node named ``name`` (its output too) to ``nodes``; returns the output."""
    node = ir.node(op, inputs, attributes=attributes, name=name)
    node.outputs[0].name = name
    nodes.append(node)
    return node.outputs[0]


def copy_model(model: ir.Model) -> ir.Model:
    """An independent deep copy of ``model`` (through its proto), for trial runs and reference graphs."""
    return ir.from_proto(ir.to_proto(model))


_SHARED = "qexport-shared"  # the external-data location of trial_copy's stubs; nothing ever reads it


def trial_copy(model: ir.Model) -> ir.Model:
    """A copy of ``model`` for a trial run whose large initializers are read-only views of ``model``'s arrays.

    No weight is copied (the graph structure and small constants are, through the proto). Passes replace
    initializers rather than write into them; one that wrote into a weight in place would raise on the view
    instead of changing ``model``.
    """
    with weights_as_stubs(model, _SHARED) as shared:
        proto = ir.to_proto(model)
    trial = ir.from_proto(proto)
    for name, tensor in shared.items():
        view = tensor.numpy().view()
        view.flags.writeable = False
        trial.graph.initializers[name].const_value = ir.Tensor(view, dtype=tensor.dtype, name=name)
    return trial
