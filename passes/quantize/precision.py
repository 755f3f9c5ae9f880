"""Per-linear weight precision by measured sensitivity: which linears keep 8-bit weights within a 4-bit budget.

A linear's sensitivity is the relative output error its weight takes from the 4-bit format, on the calibration
text: trace(ΔWᵀ H ΔW) / trace(Wᵀ H W), with ΔW the round-to-nearest error on the format's grid (its groups and
clip) and H = XᵀX / N of the linear's input in the float graph as the quantizer will see it (after rotations and
smoothing). Like Olive's selective mixed precision, but chosen by measurement on the graph rather than by layer
name: the most sensitive linears get int8 per-channel weights until the budget of 8-bit parameters is spent.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

import numpy as np

from qexport.passes.discovery import sites as site_matching
from qexport.passes.quantize.weight_quant import WeightFormat

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Choice:
    """One linear's measured sensitivity and the weight format it was given."""

    role: str
    params: int
    relative_error: float  # of the 4-bit format, round-to-nearest
    bits: int  # 8 or 4

    def to_json(self) -> dict:
        return {"bits": self.bits, "relative_error_4bit": self.relative_error, "params": self.params}


def hessian_trace(d: np.ndarray, hessian: np.ndarray) -> float:
    """trace(dᵀ H d) for d [in, out]: the summed squared output of d over the tokens H = XᵀX / N was taken on, per
    token. Through one matrix product (BLAS), not a three-operand einsum, which numpy runs as unblocked loops."""
    d = np.asarray(d, dtype=np.float64)
    return float(np.vdot(d, hessian @ d))


def relative_error(w_in_out: np.ndarray, hessian: np.ndarray, fmt: WeightFormat) -> float:
    """trace(ΔWᵀ H ΔW) / trace(Wᵀ H W) of ``fmt``'s round-to-nearest weights (0 for a weight with no output)."""
    w = np.asarray(w_in_out, dtype=np.float64)
    delta = w - fmt.dequantize(*fmt.quantize(w))
    signal = hessian_trace(w, hessian)
    return hessian_trace(delta, hessian) / signal if signal > 0 else 0.0


def choose_precision(linears: Sequence[site_matching.Linear], roles: Mapping[object, str],
                     hessians: Mapping[object, np.ndarray], fmt: WeightFormat, w4_fraction: float) -> list[Choice]:
    """One choice per linear (in order): the most sensitive at 8 bits while their parameters stay within
    ``1 - w4_fraction`` of the total; a linear that would overrun the budget is passed over for a smaller, less
    sensitive one. ``roles`` maps a linear's node to its role name, ``hessians`` its input value to H."""
    errors = [relative_error(lin.weight_in_out(), hessians[lin.input], fmt) for lin in linears]
    sizes = [int(np.prod(lin.weight_in_out().shape)) for lin in linears]
    budget = (1.0 - w4_fraction) * sum(sizes)
    spent, eight = 0, set()
    for i in sorted(range(len(linears)), key=lambda i: -errors[i]):
        if spent + sizes[i] <= budget:
            eight.add(i)
            spent += sizes[i]
    log.info("precision: %d of %d linears at int8 (%.1f%% of the weights), by 4-bit relative output error",
             len(eight), len(linears), 100.0 * spent / max(1, sum(sizes)))
    return [Choice(roles.get(lin.node, lin.node.name), sizes[i], errors[i], 8 if i in eight else 4)
            for i, lin in enumerate(linears)]
