"""Names for the exported graph that depend only on its structure, not on how it was traced.

The exporter numbers values and nodes with its own counters (``val_741``, ``node_mul_12``), so a graph built by
stamping layers (:mod:`qexport.exporter.layerwise`) and the whole-model trace would name the same computation
differently. Both paths call :func:`name_by_order` twice: on the raw trace (every generated name unique before
``cleanup`` folds and lifts constants) and after ``cleanup`` (the final names). Graph inputs and outputs keep
their names (``input_ids``, ``present.3.key``), and so do initializers with a source name (the checkpoint's
``model.layers.3.mlp.up_proj.weight``). Every other value is ``val_<k>`` and every node ``node_<Op>_<k>``, ``k`` its
position in graph order; constants lifted from generated values become ``const_<k>`` in the order of their first
use.
"""

from __future__ import annotations

import re

import onnx_ir as ir

_GENERATED = re.compile(r"(val|const)_\d+")


def name_by_order(graph: ir.Graph) -> None:
    """Rename the generated values, nodes and initializers of ``graph`` (the top-level graph) by graph order."""
    keep = {v.name for v in graph.inputs} | {v.name for v in graph.outputs}
    generated = [v for v in graph.initializers.values() if v.name not in keep and _GENERATED.fullmatch(v.name or "")]
    if generated:
        order = {v: k for k, v in enumerate(dict.fromkeys(
            v for node in graph for v in node.inputs if v is not None and v.is_initializer()))}
        generated.sort(key=lambda v: order.get(v, len(order)))
        for value in generated:  # a temporary name first: the final names may be taken by others of the list
            value.name = f"qexport_rename_{id(value)}"
        for k, value in enumerate(generated):
            value.name = f"const_{k}"
    count = 0
    for k, node in enumerate(graph):
        node.name = f"node_{node.op_type}_{k}"
        for value in node.outputs:
            if value.name not in keep:
                value.name = f"val_{count}"
                count += 1
