"""R1: rotate the residual stream by an orthogonal Q folded into its writers and readers (QuaRot, SpinQuant)."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from qexport.errors import PatternNotFoundError, QexportError
from qexport.passes.discovery import sites
from qexport.passes._ir import channel_readers, const_array, const_f64, set_const_input, write_bias, write_weight
from qexport.passes.metadata import Meta
from qexport.passes.transforms.hadamard import Rotation, rotation_matrix

log = logging.getLogger(__name__)

_RMS_KINDS = (sites.NormKind.RMS_DECOMPOSED, sites.NormKind.SIMPLIFIED_LAYER_NORM, sites.NormKind.RMS_NORMALIZATION)


@dataclasses.dataclass(frozen=True)
class RotateResidualPass(ir.passes.InPlacePass):
    """Rotate the residual stream: every residual value x becomes x Q, with the model's outputs unchanged.

    Rewrite cases (W in [in, out] layout, y = x W + b; all arithmetic in float64):

    1. token embedding table E [vocab, hidden]: E <- E Q, and a learned position table P (OPT): P <- P Q;
    2. readers, the linears fed by a residual norm (q/k/v, gate/up, lm_head): W <- Qᵀ W. RMSNorm commutes
       with Q only with unit gamma, so every residual norm must be an RMSNorm with gamma = 1: run
       ``untie-embeddings`` and ``fold-norm`` first;
    3. writers, the linears ending a residual branch (o_proj, down_proj): W <- W Q and b <- b Q.

    Refused with a clear error (nothing changed): tied embeddings, a LayerNorm stream (OPT: put
    ``layernorm-to-rms`` before it), norms between a writer and its residual add (Gemma3's post-norms,
    whose gamma cannot be folded), unfolded gamma.
    The model is tagged in ``metadata_props`` so a second run reports no change.
    """

    rotation: Rotation = Rotation.RANDOM_HADAMARD
    seed: int = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if Meta.ROTATE_RESIDUAL in model.metadata_props:
            log.info("residual stream already rotated (%s); nothing to do", model.metadata_props[Meta.ROTATE_RESIDUAL])
            return ir.passes.PassResult(model, False)
        graph = model.graph
        stream = sites.find_residual_stream(model)
        readers = residual_readers(stream)
        hidden = const_f64(stream.embedding_weight).shape[1]
        q = rotation_matrix(self.rotation, hidden, self.seed)

        table = stream.embedding_weight
        set_const_input(graph, stream.embedding, 0, const_f64(table) @ q, f"{table.name}.rotated")
        if (positions := stream.position_embedding) is not None:
            set_const_input(graph, positions, 0, const_f64(positions.inputs[0]) @ q, f"{positions.inputs[0].name}.rotated")
        for linear in readers:
            write_weight(graph, linear, q.T @ linear.weight_in_out())
        for linear in stream.writers:
            write_weight(graph, linear, linear.weight_in_out() @ q)
            bias = linear.bias_array()
            if bias is not None:
                write_bias(graph, linear, bias @ q)
        model.metadata_props[Meta.ROTATE_RESIDUAL] = f"{self.rotation.value}:{self.seed}"
        log.info("rotated the residual stream (%s, hidden %d): %d readers, %d writers",
                 self.rotation.value, hidden, len(readers), len(stream.writers))
        return ir.passes.PassResult(model, True)


def residual_readers(stream: sites.ResidualStream) -> list[sites.Linear]:
    """The linears reading the residual norms, after checking that a rotation is exact on this stream."""
    for norm in stream.norms:
        if norm.kind not in _RMS_KINDS:
            raise QexportError(
                f"rotate-residual needs RMSNorm on the residual stream, found {norm.kind.value}; "
                "for LayerNorm models (OPT) put the layernorm-to-rms pass (after fold-norm) before it"
            )
    if stream.tied:
        raise QexportError("rotate-residual needs untied embeddings: put the untie-embeddings pass before it")
    if stream.embed_scale is not None and const_f64(_scale_const(stream.embed_scale)).size != 1:
        raise QexportError("rotate-residual needs a scalar embedding scale")
    if any(block.post_norm is not None for block in stream.blocks):
        raise QexportError(
            "rotate-residual cannot rotate a stream with norms between a branch and its residual add "
            "(Gemma3 post-norms): their gamma cannot be folded, so RMSNorm would not commute with the rotation"
        )
    if any(block.pre_norm is None for block in stream.blocks):
        raise PatternNotFoundError("rotate-residual: a residual branch reads the stream without a norm")
    if stream.position_embedding is not None and (
            (table := const_array(stream.position_embedding.inputs[0])) is None or table.ndim != 2):
        raise PatternNotFoundError("rotate-residual: the learned position embedding is not a constant 2-D table")
    readers: list[sites.Linear] = []
    for norm in stream.norms:
        if norm.gamma is not None and not np.all(const_f64(norm.gamma) == 1.0):
            raise QexportError(
                f"rotate-residual needs gamma = 1 on every residual norm (norm ending at {norm.nodes[-1].name} "
                "has another gamma): put the fold-norm pass before it"
            )
        readers_here = channel_readers(norm.output)  # token slices (lm_head on the last position) commute with Q
        linears = [sites.match_linear(c) for c, _ in readers_here]
        pairs = zip(linears, readers_here)
        if not readers_here or any(lin is None or lin.input is not read for lin, (_, read) in pairs):
            raise PatternNotFoundError(
                f"rotate-residual: the norm ending at {norm.nodes[-1].name} feeds something other than weight linears"
            )
        readers += linears
    return readers


def _scale_const(node: ir.Node) -> ir.Value:
    return next(i for i in node.inputs if i is not None and i.const_value is not None)
