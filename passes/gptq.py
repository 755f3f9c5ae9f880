"""GPTQ: int8 per-channel weights with Hessian-based error compensation, emitted as int8 + DequantizeLinear."""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar, Sequence

import numpy as np
import onnx_ir as ir

from qexport.errors import RecipeError
from qexport.passes.linear_select import selected_linears
from qexport.passes.weight_quant import quantize_weight, write_quantized_weight

log = logging.getLogger(__name__)


def gptq_quantize(w_in_out: np.ndarray, hessian: np.ndarray, damp: float = 0.01, block_size: int = 128,
                  act_order: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ (Frantar et al.; IST-DASLab/gptq) of one [in, out] weight for the input Hessian H ~ X^T X / N.

    Returns (q int8 [in, out], scale [out]) on the symmetric per-output-channel int8 grid of the original
    weight (scale = column absmax / 127, as in round-to-nearest), chosen column by column (input channel
    order, or descending diag(H) with ``act_order``) so each rounding error is compensated on the
    channels not yet quantized: e = (w_i - q_i) / U_ii, W[:, j>i] -= e U[i, j>i], U = chol(H^-1) upper.
    Dead inputs (H_ii = 0) get H_ii = 1 and zero weight; H += damp * mean(diag H) * I.
    """
    w = np.array(w_in_out, dtype=np.float64).T  # torch layout [out, in]
    h = np.array(hessian, dtype=np.float64)
    _, scale = quantize_weight(w_in_out)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(h.shape[0])
    w, h = w[:, perm], h[np.ix_(perm, perm)]
    h[np.diag_indices_from(h)] += damp * np.mean(np.diag(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper Cholesky factor of H^-1
    q = np.zeros_like(w)
    inv_scale = 1.0 / scale
    for start in range(0, w.shape[1], block_size):
        end = min(start + block_size, w.shape[1])
        block, errors = w[:, start:end].copy(), np.zeros((w.shape[0], end - start))
        for i in range(end - start):
            col = block[:, i]
            q[:, start + i] = np.clip(np.round(col * inv_scale), -127, 127)
            err = (col - q[:, start + i] * scale) / u[start + i, start + i]
            block[:, i:] -= np.outer(err, u[start + i, start + i:end])
            errors[:, i] = err
        w[:, end:] -= errors @ u[start:end, end:]
    q = q[:, np.argsort(perm)]
    return q.T.astype(np.int8), scale


@dataclasses.dataclass(frozen=True)
class GptqPass(ir.passes.InPlacePass):
    """Quantize weight linears' weights with GPTQ; activations are left to a following ``quantize`` pass (recipe name ``quantize-gptq``).

    Rewrite cases, for each linear selected as :class:`~qexport.passes.insert_qdq.QuantizePass` selects them
    (``linears`` glob, lm_head only with ``include_lm_head``):

    1. H = X^T X / N of the linear's input over the calibration ``windows``, run through the graph as it is
       (so after any rotation or smoothing: the basis the weights are in), one H shared by q/k/v and gate/up;
    2. the weight becomes an int8 initializer from :func:`gptq_quantize` feeding DequantizeLinear, exactly
       the weight form ``quantize`` writes, which then adds only the activation quantizers.

    All Hessians come from one run of the float graph (not layer-sequential: later layers see float inputs,
    not the already-quantized ones). Quantized linears no longer match, so a second run changes nothing.
    """

    lossless: ClassVar[bool] = False

    windows: tuple[np.ndarray, ...] = ()
    linears: str = "*"
    include_lm_head: bool = False
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    threads: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.damp < 1.0:
            raise RecipeError(f"gptq damp must be within (0, 1), got {self.damp}")
        if self.block_size < 1:
            raise RecipeError(f"gptq block_size must be positive, got {self.block_size}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        chosen = selected_linears(model, self.linears, self.include_lm_head)
        if not chosen:
            return ir.passes.PassResult(model, False)
        if not self.windows:
            raise RecipeError("gptq needs calibration windows")
        hessians = self._hessians(model, list(dict.fromkeys(lin.input for lin in chosen)))
        for linear in chosen:
            w = linear.weight_in_out()
            q, scale = gptq_quantize(w, hessians[linear.input], self.damp, self.block_size, self.act_order)
            write_quantized_weight(model.graph, linear, q, scale)
            if log.isEnabledFor(logging.DEBUG):
                h = hessians[linear.input]
                log.debug("gptq %s: output error %.3g (round-to-nearest %.3g)", linear.node.name,
                          _output_error(w, q * scale, h), _output_error(w, _rtn(w), h))
        log.info("gptq: quantized %d linears", len(chosen))
        return ir.passes.PassResult(model, True)

    def _hessians(self, model: ir.Model, values: Sequence[ir.Value]) -> dict[ir.Value, np.ndarray]:
        from qexport.calibration import prefill_feeds, session_with_outputs

        names = [v.name for v in values]
        session = session_with_outputs(model, names, self.threads)
        inputs = {i.name: i for i in session.get_inputs()}
        sums: dict[str, np.ndarray] = {}
        tokens = 0
        for window in self.windows:
            outs = session.run(names, prefill_feeds(np.asarray(window, dtype=np.int64), inputs, model))
            for name, out in zip(names, outs):
                x = out.astype(np.float64).reshape(-1, out.shape[-1])
                sums[name] = sums.get(name, 0.0) + x.T @ x
            tokens += outs[0].reshape(-1, outs[0].shape[-1]).shape[0]
        return {v: sums[v.name] / tokens for v in values}


def _rtn(w: np.ndarray) -> np.ndarray:
    q, scale = quantize_weight(w)
    return q * scale


def _output_error(w: np.ndarray, w_hat: np.ndarray, hessian: np.ndarray) -> float:
    """Mean squared output error per token, trace((W - W_hat)^T H (W - W_hat)) for H = X^T X / N."""
    d = w - w_hat
    return float(np.einsum("io,ij,jo->", d, hessian, d))
