"""Give lm_head its own weight when it shares the token embedding's initializer."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from qexport.passes.discovery import sites
from qexport.passes._ir import drop_if_unused, new_initializer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class UntieEmbeddingsPass(ir.passes.InPlacePass):
    """Duplicate a tied embedding so lm_head and the embedding can be transformed independently.

    Rewrite cases:

    1. ``MatMul(x, Transpose(E))`` (tied or not): B becomes a new constant [hidden, vocab] initializer
       holding E transposed; the Transpose is removed when nothing else reads it.
    2. ``MatMul(x, E)`` or ``Gemm(x, E)`` whose B is the embedding's own initializer: B becomes a copy.

    ``modified`` is False when lm_head already has a plain weight of its own (a second run is a no-op).
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        stream = sites.find_residual_stream(model)
        head = stream.lm_head
        if head.transpose is None and not stream.tied:
            return ir.passes.PassResult(model, False)
        array = head.weight.const_value.numpy()
        if head.transpose is not None:
            array = array.T
        value = new_initializer(graph, f"{head.weight.name}.lm_head", np.ascontiguousarray(array))
        head.node.replace_input_with(1, value)
        if head.transpose is not None and not head.transpose.outputs[0].uses():
            graph.remove(head.transpose, safe=True)
        drop_if_unused(graph, head.weight)
        log.info("untied lm_head from %s (new initializer %s)", stream.embedding_weight.name, value.name)
        return ir.passes.PassResult(model, True)
