"""R1: rotate the residual stream by an orthogonal Q folded into its writers and readers (QuaRot, SpinQuant)."""

from __future__ import annotations

import dataclasses
import enum
import logging

import numpy as np
import onnx_ir as ir

from qexport.errors import PatternNotFoundError, QexportError, RecipeError
from qexport.passes.discovery import sites
from qexport.passes._ir import channel_readers, const_array, const_f64, set_const_input, write_bias, write_weight
from qexport.passes._settings import coerce_enums
from qexport.passes.metadata import Meta
from qexport.passes.transforms.hadamard import (
    Rotation, block_hadamard_nodes, hadamard_factors, hadamard_matrix, online_hadamard_nodes, rotation_matrix,
)

log = logging.getLogger(__name__)

_RMS_KINDS = (sites.NormKind.RMS_DECOMPOSED, sites.NormKind.SIMPLIFIED_LAYER_NORM, sites.NormKind.RMS_NORMALIZATION)


class PostNorm(str, enum.Enum):
    """What R1 does with norms between a residual branch and its add (Gemma3's post-norms)."""

    REFUSE = "refuse"  # a clear error, nothing changed
    ONLINE = "online"  # the post-norm's gamma times Q, applied online (case 4)


@dataclasses.dataclass(frozen=True)
class RotateResidualPass(ir.passes.InPlacePass):
    """Rotate the residual stream: every residual value x becomes x Q, with the model's outputs unchanged.

    Rewrite cases (W in [in, out] layout, y = x W + b; all arithmetic in float64):

    1. token embedding table E [vocab, hidden]: E <- E Q, and a learned position table P (OPT): P <- P Q;
       a scalar embedding scale (Gemma3) commutes with Q;
    2. readers, the linears fed by a residual norm (q/k/v, gate/up, lm_head): W <- Qᵀ W. RMSNorm commutes
       with Q only with unit gamma, so every residual norm must be an RMSNorm with gamma = 1: run
       ``untie-embeddings`` and ``fold-norm`` first;
    3. writers, the linears ending a residual branch (o_proj, down_proj): W <- W Q and b <- b Q;
    4. a post-norm y = RMSNorm(b) * g between a writer and its add (Gemma3), with ``post_norm: online``: the
       writer stays, RMS commutes with nothing to fold, and the add needs y Q = RMSNorm(b) diag(g) Q. With
       Q = diag(s) H (random signs s on the rows, H a Hadamard matrix), g becomes g * s and ``x -> x H`` is
       inserted before the add: the full H (one MatMul up to ``max_dense``, else two small ones, n (a + b)
       multiply-adds per token) or, with ``block`` = B, I ⊗ H_B (one MatMul, n B multiply-adds; outliers
       spread within each B-wide block only).

    ``block`` = B > 0 makes Q block-diagonal on any stream (Q = diag(s) (I ⊗ H_B)); 0 is the full Q. On a
    stream with post-norms the random signs are on Q's rows (so they fold into g); elsewhere the full Q is
    :func:`~qexport.passes.transforms.hadamard.rotation_matrix`'s, as before.
    Refused with a clear error (nothing changed): tied embeddings, a LayerNorm stream (OPT: put
    ``layernorm-to-rms`` before it), post-norms with ``post_norm: refuse`` or an ``orthogonal`` Q, unfolded
    gamma on a norm that feeds linears. The model is tagged in ``metadata_props`` so a second run reports no change.
    """

    rotation: Rotation = Rotation.RANDOM_HADAMARD
    seed: int = 0
    post_norm: PostNorm = PostNorm.REFUSE
    block: int = 0  # 0: the full Q; B > 0: I ⊗ H_B with random row signs
    max_dense: int = 256  # post-norms, full Q: one dense MatMul up to this width

    def __post_init__(self) -> None:
        coerce_enums(self, "rotate-residual", rotation=Rotation, post_norm=PostNorm)
        if self.block and (self.block < 2 or self.block & (self.block - 1)):
            raise RecipeError(f"rotate-residual block {self.block} is not a power of two >= 2; use e.g. 128, or 0 (full)")
        if self.block and self.rotation is Rotation.ORTHOGONAL:
            raise RecipeError("rotate-residual block needs rotation hadamard or random_hadamard, not orthogonal")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if Meta.ROTATE_RESIDUAL in model.metadata_props:
            log.info("residual stream already rotated (%s); nothing to do", model.metadata_props[Meta.ROTATE_RESIDUAL])
            return ir.passes.PassResult(model, False)
        graph = model.graph
        stream = sites.find_residual_stream(model)
        readers = residual_readers(stream, self.post_norm)
        hidden = const_f64(stream.embedding_weight).shape[1]
        posts = [b for b in stream.blocks if b.post_norm is not None]
        if posts and self.rotation is Rotation.ORTHOGONAL:
            raise QexportError("rotate-residual on post-norms needs rotation hadamard or random_hadamard (applied "
                               "online as a Hadamard transform); orthogonal would cost a dense hidden x hidden MatMul")
        if self.block and hidden % self.block:
            raise RecipeError(f"rotate-residual block {self.block} does not divide the hidden size {hidden}; "
                              "choose a power of two that does, or 0 (full)")
        if not self.block and self.rotation is not Rotation.ORTHOGONAL:
            hadamard_factors(hidden)  # fail before the first rewrite
        signs, q = self._rotation(hidden, signed_rows=bool(posts))

        table = stream.embedding_weight
        set_const_input(graph, stream.embedding, 0, const_f64(table) @ q, f"{table.name}.rotated")
        if (positions := stream.position_embedding) is not None:
            set_const_input(graph, positions, 0, const_f64(positions.inputs[0]) @ q, f"{positions.inputs[0].name}.rotated")
        for linear in readers:
            write_weight(graph, linear, q.T @ linear.weight_in_out())
        for block in stream.blocks:
            if block.post_norm is not None:
                self._rotate_post_norm(graph, block, signs, hidden)
                continue
            linear = block.writer
            write_weight(graph, linear, linear.weight_in_out() @ q)
            bias = linear.bias_array()
            if bias is not None:
                write_bias(graph, linear, bias @ q)
        model.metadata_props[Meta.ROTATE_RESIDUAL] = f"{self.rotation.value}:{self.seed}" + (
            f":block={self.block}" if self.block else "") + (":post_norm=online" if posts else "")
        log.info("rotated the residual stream (%s, hidden %d, block %d): %d readers, %d writers, %d online post-norms",
                 self.rotation.value, hidden, self.block, len(readers), len(stream.blocks) - len(posts), len(posts))
        return ir.passes.PassResult(model, True)

    def _rotation(self, n: int, signed_rows: bool) -> tuple[np.ndarray, np.ndarray]:
        """(s, Q): Q = diag(s) H for a block or post-norm stream, else ``rotation_matrix``'s Q (s all ones)."""
        if not (self.block or signed_rows):
            return np.ones(n), rotation_matrix(self.rotation, n, self.seed)
        h = np.kron(np.eye(n // self.block), hadamard_matrix(self.block)) if self.block else hadamard_matrix(n)
        signs = np.ones(n)
        if self.rotation is Rotation.RANDOM_HADAMARD:
            signs = np.random.default_rng(self.seed).choice([-1.0, 1.0], size=n)
        return signs, signs[:, None] * h

    def _rotate_post_norm(self, graph: ir.Graph, block: sites.ResidualBlock, signs: np.ndarray, n: int) -> None:
        """Case 4: g <- g * s on the post-norm, then ``x -> x H`` between it and the residual add."""
        norm = block.post_norm
        if np.any(signs != 1.0):
            gamma = const_f64(norm.gamma)
            set_const_input(graph, norm.gamma_node, norm.gamma_index, gamma * signs, f"{norm.nodes[-1].name}.gamma_signed")
        out, producer = norm.output, norm.output.producer()
        dtype = np.dtype(out.dtype.numpy()) if out.dtype is not None else np.dtype(np.float32)
        prefix = f"{norm.nodes[-1].name}.r1"
        if self.block:
            nodes, rotated = block_hadamard_nodes(graph, out, n, self.block, dtype, prefix)
        else:
            nodes, rotated = online_hadamard_nodes(graph, out, n, dtype, prefix, self.max_dense)
        rotated.type, rotated.shape = out.type, out.shape
        graph.insert_after(producer, nodes)
        block.add.replace_input_with(next(i for i, v in enumerate(block.add.inputs) if v is out), rotated)


def residual_readers(stream: sites.ResidualStream, post_norm: PostNorm = PostNorm.REFUSE) -> list[sites.Linear]:
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
    posts = [block.post_norm for block in stream.blocks if block.post_norm is not None]
    if posts and post_norm is PostNorm.REFUSE:
        raise QexportError(
            "rotate-residual cannot fold a rotation through norms between a branch and its residual add "
            "(Gemma3 post-norms): set post_norm: online to apply their gamma times Q online"
        )
    for norm in posts:
        uses = norm.output.uses()
        if norm.gamma is None or const_array(norm.gamma) is None or len(uses) != 1 or norm.output.is_graph_output():
            raise PatternNotFoundError(
                f"rotate-residual: the post-norm ending at {norm.nodes[-1].name} needs a constant gamma and to feed "
                "only its residual add"
            )
    if any(block.pre_norm is None for block in stream.blocks):
        raise PatternNotFoundError("rotate-residual: a residual branch reads the stream without a norm")
    if stream.position_embedding is not None and (
            (table := const_array(stream.position_embedding.inputs[0])) is None or table.ndim != 2):
        raise PatternNotFoundError("rotate-residual: the learned position embedding is not a constant 2-D table")
    readers: list[sites.Linear] = []
    for norm in (n for n in stream.norms if not any(n is p for p in posts)):
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
