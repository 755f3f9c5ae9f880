"""GPTQ: int8 per-channel or int4/dINT4 per-group weights with Hessian-based error compensation, emitted as
the same dequantized weights ``quantize`` writes."""

from __future__ import annotations

import dataclasses
import enum
import logging
import re
import time
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from qexport.errors import RecipeError
from qexport.passes.discovery import sites as site_matching
from qexport.calibration.calibrator import Calibrator
from qexport.passes.discovery.linear_select import linear_names, selected_linears
from qexport.passes.discovery.names import NameFilter, check_glob_fields
from qexport.passes._settings import coerce_enums
from qexport.passes.metadata import Meta
from qexport.passes.quantize.act_qdq import SharedConsts, per_block_qdq, per_token_qdq
from qexport.passes.quantize.precision import choose_precision, hessian_trace
from qexport.passes.quantize.weight_quant import WeightClip, WeightFormat, WeightQuant, write_quantized_weight

log = logging.getLogger(__name__)


class UpstreamActivations(str, enum.Enum):
    """What the quantized layers before a sequential stage feed forward while its Hessians are measured."""

    FLOAT = "float"  # their activations stay float (weights only quantized)
    PER_TOKEN = "per_token"  # their inputs pass through per-token symmetric int8 Q/DQ, removed after the pass
    PER_GROUP = "per_group"  # the same with one scale per token and group_size channels


def inverse_factor(hessian: np.ndarray, damp: float = 0.01, act_order: bool = False
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dead inputs, column order, U = upper Cholesky factor of the damped, permuted H^-1) for :func:`gptq_quantize`;
    linears reading one input (q/k/v, gate/up) share it."""
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(h.shape[0])
    h = h[np.ix_(perm, perm)]
    h[np.diag_indices_from(h)] += damp * np.mean(np.diag(h))
    return dead, perm, np.linalg.cholesky(np.linalg.inv(h)).T


def gptq_quantize(w_in_out: np.ndarray, hessian: np.ndarray, damp: float = 0.01, block_size: int = 128,
                  act_order: bool = False, fmt: WeightFormat = WeightFormat(),
                  factor: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ (Frantar et al.; IST-DASLab/gptq) of one [in, out] weight for the input Hessian H ~ X^T X / N.

    Returns (codes int8 [in, out], scale) on ``fmt``'s grid: int8 per output channel (scale [out], the column
    absmax / 127 of the original weight, as round-to-nearest), or int4/dINT4 per group of input channels (scale
    [in / group, out], fixed from the partly compensated weights when the group's first column is reached, as
    IST-DASLab's ``groupsize``; from the original weights with ``act_order``, their ``static_groups``). Columns
    are quantized in input order (descending diag(H) with ``act_order``), each rounding error compensated on
    the columns not yet quantized: e = (w_i - q_i) / U_ii, W[:, j>i] -= e U[i, j>i], U = chol(H^-1) upper.
    Dead inputs (H_ii = 0) get H_ii = 1 and zero weight; H += damp * mean(diag H) * I. For groups the block of
    columns updated together is rounded to whole groups, so a group's scale sees all earlier compensation.
    """
    rows = fmt.group_rows(w_in_out.shape[0])
    dead, perm, u = factor if factor is not None else inverse_factor(hessian, damp, act_order)
    w = np.array(w_in_out, dtype=np.float64)  # [in, out]: a column of the paper's W is a contiguous row here
    w[dead] = 0.0
    if fmt.grouped:
        block_size = max(rows, block_size // rows * rows)
        scales = np.stack([fmt.scale(w[g:g + rows]) for g in range(0, w.shape[0], rows)]) if act_order else \
            np.zeros((w.shape[0] // rows, w.shape[1]))
    else:
        scales = fmt.scale(np.asarray(w_in_out, dtype=np.float64))[None]  # dead inputs' weights included
    w = w[perm]
    q = np.zeros_like(w)
    update = np.empty((block_size, w.shape[1]))
    for start in range(0, w.shape[0], block_size):
        end = min(start + block_size, w.shape[0])
        block, errors = w[start:end].copy(), np.zeros((w.shape[1], end - start))
        for i in range(end - start):
            column = perm[start + i]
            if fmt.grouped and not act_order and column % rows == 0:  # (Fortran order: the sums of the
                scales[column // rows] = fmt.scale(np.asfortranarray(block[i:i + rows]))  # clip search as before)
            scale = scales[column // rows] if fmt.grouped else scales[0]
            row = block[i]
            q[start + i] = fmt.codes(row / scale)
            err = (row - fmt.levels(q[start + i]) * scale) / u[start + i, start + i]
            rest = update[:end - start - i - 1]
            np.multiply(u[start + i, start + i + 1:end, None], err, out=rest)
            block[i + 1:] -= rest
            errors[:, i] = err
        w[end:] -= (errors @ u[start:end, end:]).T
    return q[np.argsort(perm)].astype(np.int8), (scales if fmt.grouped else scales[0])


@dataclasses.dataclass(frozen=True)
class GptqPass(ir.passes.InPlacePass):
    """Quantize weight linears' weights with GPTQ; activations are left to a following ``quantize`` pass (recipe name ``quantize-gptq``).

    Rewrite cases, for each linear selected as :class:`~qexport.passes.quantize.insert_qdq.QuantizePass` selects them
    (``linears`` globs minus the ``exclude`` globs, which stay float; lm_head only with ``include_lm_head``):

    1. H = X^T X / N of the linear's input over the ``calibrator``'s windows, run through the graph as it is
       (so after any rotation or smoothing: the basis the weights are in), one H shared by q/k/v and gate/up,
       which are quantized as one weight (their output channels side by side: GPTQ treats outputs independently);
    2. the weight becomes the codes of :func:`gptq_quantize` on the ``weights`` grid (int8 per channel, int4 or
       dint4 per ``group_size`` input channels, scales clipped by ``weight_clip``), written exactly as
       ``quantize`` writes weights, which then adds only the activation quantizers.

    One-shot (``sequential: false``): all Hessians from one run of the float graph. Layer-sequential
    (``sequential: true``): the linears of layer 0, 1, ... (by role name, then any others)
    in turn, each layer's Hessians from the graph in which all earlier layers' weights are already quantized;
    activations are still float there (their quantizers come with the later ``quantize`` pass), unless
    ``upstream_activations: per_token`` (or ``per_group``, one scale per token and ``group_size`` channels): then
    each quantized layer's linear inputs also pass through int8 Q/DQ while the later layers' Hessians are measured, so those Hessians see activation rounding as the
    quantized model will (the temporary quantizers are removed before the pass returns). The residual
    stream entering each layer is cached per window (:meth:`~qexport.calibration.calibrator.Calibrator.hessians`),
    so a layer's Hessians come from a session over that layer and the one before it (quantized), not from the
    embedding up; the values are those of the whole graph. Where the graph cannot be cut there (no residual
    stream found, or a layer reading it other than through the cut), that layer runs the whole graph.
    With ``w4_fraction`` below 1 (4-bit ``weights`` only), the linears whose 4-bit weights lose the most, measured
    on the float graph's Hessians (:func:`~qexport.passes.quantize.precision.choose_precision`), get int8
    per-channel GPTQ weights instead, up to ``1 - w4_fraction`` of the weight parameters; each linear's choice
    and measured error are recorded in the model's metadata (``qexport.precision.<role>``) for the manifest.
    Quantized linears no longer match, so a second run changes nothing.
    """

    lossless: ClassVar[bool] = False
    _cached_layers: ClassVar[bool] = True  # False: each sequential stage runs the whole graph (the reference path)

    calibrator: Calibrator | None = None  # the pipeline provides it
    linears: tuple[str, ...] = ("*",)
    include_lm_head: bool = False
    exclude: tuple[str, ...] = ()
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    weights: WeightQuant = WeightQuant.INT8
    group_size: int = 128
    weight_clip: WeightClip = WeightClip.NONE
    sequential: bool = False
    w4_fraction: float = 1.0
    upstream_activations: UpstreamActivations = UpstreamActivations.FLOAT

    def __post_init__(self) -> None:
        check_glob_fields(self, "quantize-gptq", "linears", "exclude")
        if not 0.0 < self.damp < 1.0:
            raise RecipeError(f"gptq damp must be within (0, 1), got {self.damp}")
        if self.block_size < 1:
            raise RecipeError(f"gptq block_size must be positive, got {self.block_size}")
        fmt = WeightFormat(self.weights, self.group_size, self.weight_clip)  # validates the weight settings
        object.__setattr__(self, "weights", fmt.kind)
        object.__setattr__(self, "weight_clip", fmt.clip)
        if not 0.0 < self.w4_fraction <= 1.0:
            raise RecipeError(f"gptq w4_fraction must be within (0, 1], got {self.w4_fraction}")
        if self.w4_fraction < 1.0 and not fmt.grouped:
            raise RecipeError("gptq w4_fraction keeps some linears at 8 bits out of 4-bit weights: set weights "
                              "to int4 or dint4, or leave w4_fraction at 1")
        coerce_enums(self, "quantize-gptq", upstream_activations=UpstreamActivations)
        if self.upstream_activations is not UpstreamActivations.FLOAT and not self.sequential:
            raise RecipeError("gptq upstream_activations quantizes the layers before each sequential stage: set "
                              "sequential: true, or leave upstream_activations at float")
        if self.upstream_activations is UpstreamActivations.PER_GROUP and not fmt.grouped:
            raise RecipeError("gptq upstream_activations: per_group takes its groups from the 4-bit weights' "
                              "group_size: set weights to int4 or dint4, or use per_token")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        chosen = selected_linears(model, NameFilter(self.linears, self.exclude), self.include_lm_head)
        if not chosen:
            return ir.passes.PassResult(model, False)
        if self.calibrator is None:
            raise RecipeError("gptq needs calibration windows (run it through a recipe, or pass "
                              "calibrator=Calibrator(windows))")
        fmt = WeightFormat(self.weights, self.group_size, self.weight_clip)
        for linear in chosen:  # a group size that does not fit is an error before anything changes
            fmt.group_rows(linear.in_features, linear.node.name)
        start = time.perf_counter()
        eight = self._int8_linears(model, chosen) if self.w4_fraction < 1.0 else set()
        formats = (fmt, WeightFormat(WeightQuant.INT8, clip=self.weight_clip))
        stages = _layers(model, chosen) if self.sequential else [chosen]
        inputs = [list(dict.fromkeys(lin.input for lin in stage)) for stage in stages]
        from_cache = 0
        # each stage's Hessians are computed when the loop reaches it: after the stages before it are quantized
        hessians = self.calibrator.hessians(model, inputs, cached=self.sequential and self._cached_layers)
        upstream = _UpstreamQuantizers(model.graph)
        try:
            for stage, found in zip(stages, hessians):
                from_cache += found.from_cache
                # linears reading one input are quantized as one (columns are independent)
                for value, h in found.hessians.items():
                    for form in formats:
                        readers = [lin for lin in stage if lin.input is value and (lin.node in eight) == (form is formats[1])]
                        if readers:
                            self._quantize_group(model.graph, readers, h, form)
                if self.upstream_activations is not UpstreamActivations.FLOAT:
                    upstream.add(stage, fmt.group_size if self.upstream_activations is UpstreamActivations.PER_GROUP
                                 else None)
        finally:
            upstream.remove()
        log.info("gptq: quantized %d linears to %s%s in %d stage(s) (%d run from the cached residual stream, %d "
                 "through the whole graph), %.1f s", len(chosen), fmt.kind.value,
                 f" ({len(eight)} of them to int8)" if eight else "", len(stages), from_cache,
                 len(stages) - from_cache, time.perf_counter() - start)
        return ir.passes.PassResult(model, True)

    def _quantize_group(self, graph: ir.Graph, readers: list[site_matching.Linear], h: np.ndarray,
                        fmt: WeightFormat) -> None:
        """GPTQ of the linears reading one input, as one weight (output channels side by side)."""
        weights = [lin.weight_in_out() for lin in readers]
        q, scale = gptq_quantize(np.concatenate(weights, axis=1), h, self.damp, self.block_size, self.act_order, fmt)
        split = np.cumsum([w.shape[1] for w in weights])[:-1]
        for linear, w, q_part, s_part in zip(readers, weights, np.split(q, split, axis=1), np.split(scale, split, axis=-1)):
            write_quantized_weight(graph, linear, q_part, s_part, fmt)
            if log.isEnabledFor(logging.DEBUG):
                rtn = fmt.dequantize(*fmt.quantize(w))
                log.debug("gptq %s: output error %.3g (round-to-nearest %.3g)", linear.node.name,
                          output_error(w, fmt.dequantize(q_part, np.atleast_2d(s_part)), h), output_error(w, rtn, h))

    def _int8_linears(self, model: ir.Model, chosen: list[site_matching.Linear]) -> set[ir.Node]:
        """The nodes of the linears kept at int8 (measured on the float graph), recorded in the model metadata."""
        assert self.calibrator is not None
        inputs = list(dict.fromkeys(lin.input for lin in chosen))
        float_hessians = next(iter(self.calibrator.hessians(model, [inputs], cached=False))).hessians
        roles = linear_names(model)
        fmt = WeightFormat(self.weights, self.group_size, self.weight_clip)
        choices = choose_precision(chosen, roles, float_hessians, fmt, self.w4_fraction)
        for choice in choices:
            model.metadata_props[Meta.PRECISION.key(choice.role)] = f"{choice.bits}:{choice.relative_error:.6g}"
        return {lin.node for lin, choice in zip(chosen, choices) if choice.bits == 8}


class _UpstreamQuantizers:
    """Int8 Q/DQ (per token, or per token and group) put temporarily on the inputs of already quantized linears
    (``upstream_activations``), and taken off again: the linears read their original inputs and the nodes and
    constants are gone."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.consts = SharedConsts(graph)
        self.nodes: list[ir.Node] = []
        self.rewired: list[tuple[ir.Node, ir.Value]] = []

    def add(self, stage: list[site_matching.Linear], block: int | None) -> None:
        """Quantize the inputs of ``stage``'s linears (one quantizer per input tensor, before its first reader),
        per token, or per token and ``block`` channels."""
        in_stage = {linear.node: linear for linear in stage}
        by_input: dict[ir.Value, list[site_matching.Linear]] = {}
        for node in self.graph:  # graph order
            if node in in_stage:
                by_input.setdefault(in_stage[node].input, []).append(in_stage[node])
        for x, readers in by_input.items():
            width = readers[0].in_features
            xq, nodes = (per_token_qdq(self.graph, x, width, readers[0].node, self.consts) if block is None else
                         per_block_qdq(self.graph, x, width, block, readers[0].node, self.consts))
            self.nodes.extend(nodes)
            for linear in readers:
                self.rewired.append((linear.node, x))
                linear.node.replace_input_with(0, xq)

    def remove(self) -> None:
        for node, x in self.rewired:
            node.replace_input_with(0, x)
        self.graph.remove(self.nodes, safe=True)
        self.consts.remove_unused()
        self.nodes, self.rewired = [], []


def _layers(model: ir.Model, chosen: list[site_matching.Linear]) -> list[list[site_matching.Linear]]:
    """``chosen`` split by decoder layer (``layers.{i}.`` role names) in layer order; the rest last."""
    roles = linear_names(model)
    stages: dict[int, list[site_matching.Linear]] = {}
    for linear in chosen:
        found = re.match(r"layers\.(\d+)\.", roles.get(linear.node, ""))
        stages.setdefault(int(found.group(1)) if found else 1 << 30, []).append(linear)
    return [stages[k] for k in sorted(stages)]


def output_error(w: np.ndarray, w_hat: np.ndarray, hessian: np.ndarray) -> float:
    """Mean squared output error per token, trace((W - W_hat)^T H (W - W_hat)) for H = X^T X / N."""
    return hessian_trace(np.asarray(w, dtype=np.float64) - w_hat, hessian)
