"""Calibrated per-tensor activation scales for static quantization.

Each scale comes with what it was chosen from (:class:`ActivationScale`: the method, the calibration absmax, the
clip); ``quantize`` records these on the values it quantizes (``value.meta[Meta.ACT_CALIBRATION]``, in memory, not
saved with the model), and the pipeline reports them per quantized site in the manifest.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from typing import Sequence

import numpy as np
import onnx_ir as ir

from qexport import numerics

log = logging.getLogger(__name__)

HIST_BINS = 8192  # |x| histogram bins for MSE clipping; the range doubles (bins merge pairwise) as absmax grows
MSE_CANDIDATES = 200  # clips searched: absmax * k / MSE_CANDIDATES, k = 1..MSE_CANDIDATES


class ActCalibration(str, enum.Enum):
    MINMAX = "minmax"  # scale = calibration absmax / 127
    PERCENTILE = "percentile"  # scale = percentile of the per-token absmax / 127 (clips rare outlier tokens)
    MSE = "mse"  # scale = c / 127, c minimising E[(x - Q_c(x))^2] over all calibration elements (|x| histogram)


@dataclasses.dataclass(frozen=True)
class ActivationScale:
    """One value's per-tensor symmetric int8 scale, clip / 127, and the calibration it was chosen from."""

    method: ActCalibration
    absmax: float  # over all calibration tokens
    clip: float
    scale: float

    def record(self) -> dict[str, object]:
        """The in-memory record ``quantize`` keeps on the value (``Meta.ACT_CALIBRATION``)."""
        return {"method": self.method.value, "absmax": self.absmax, "clip": self.clip, "scale": self.scale}


@dataclasses.dataclass
class AbsHistogram:
    """Histogram of |x| over [0, top) in ``bins`` equal bins; ``top`` doubles (merging bin pairs) to fit new data."""

    bins: int = HIST_BINS
    top: float = 0.0
    counts: np.ndarray = dataclasses.field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.counts is None:
            self.counts = np.zeros(self.bins, dtype=np.int64)

    def update(self, x: np.ndarray, absolute: bool = False) -> None:
        """Count ``x``'s magnitudes (``absolute``: ``x`` is already |x|)."""
        a = (np.asarray(x) if absolute else np.abs(np.asarray(x))).ravel()  # binned in the data's own precision
        peak = float(a.max()) if a.size else 0.0
        if peak <= 0.0:
            self.counts[0] += a.size
            return
        if self.top == 0.0:
            self.top = peak * (1.0 + 1e-9)
        while peak >= self.top:  # bins i of the doubled range are the old bins 2i and 2i + 1: exact
            self.counts = self.counts.reshape(-1, 2).sum(axis=1)
            self.counts = np.concatenate([self.counts, np.zeros(self.bins - len(self.counts), np.int64)])
            self.top *= 2.0
        index = (a * (self.bins / self.top)).astype(np.intp)
        np.minimum(index, self.bins - 1, out=index)
        self.counts += np.bincount(index, minlength=self.bins)

    def centres(self) -> np.ndarray:
        return (np.arange(self.bins) + 0.5) * (self.top / self.bins)


def quantization_mse(values: np.ndarray, weights: np.ndarray, clips: np.ndarray) -> np.ndarray:
    """Weighted mean of (x - Q_c(x))^2 over ``values`` for each clip c (int8 symmetric, scale c / 127)."""
    quantized = numerics.fake_quant(values[None, :], scale=numerics.absmax_scale(clips[:, None]))
    return ((values[None, :] - quantized) ** 2 * weights[None, :]).sum(axis=1) / max(weights.sum(), 1)


def mse_clip(hist: AbsHistogram, absmax: float, candidates: int = MSE_CANDIDATES) -> float:
    """The clip in {absmax * k / candidates} with the least quantization MSE over the histogram (bin centres)."""
    if absmax <= 0.0:
        return 0.0
    used = hist.counts > 0
    centres, counts = hist.centres()[used], hist.counts[used].astype(np.float64)
    clips = absmax * np.arange(1, candidates + 1) / candidates
    return float(clips[int(np.argmin(quantization_mse(centres, counts, clips)))])


def static_scales(model: ir.Model, values: Sequence[ir.Value], windows: Sequence[np.ndarray],
                  calibration: ActCalibration, percentile: float = 99.9,
                  threads: int | None = None) -> dict[ir.Value, ActivationScale]:
    """Per-tensor symmetric int8 scale of each value, from ``windows`` run through ``model`` as it is (neither is
    changed): calibration absmax / 127 (``minmax``), the ``percentile`` of the per-token absmax / 127, or the
    MSE-optimal clip / 127 (``mse``)."""
    from qexport.calibration.stats import run_values

    calibration = ActCalibration(calibration)
    names = [v.name for v in values]
    token_max: dict[str, list[np.ndarray]] = {n: [] for n in names}
    hists = {n: AbsHistogram() for n in names} if calibration is ActCalibration.MSE else {}
    for outs in run_values(model, names, windows, threads):
        for name, out in outs.items():
            magnitude = np.abs(out)  # once for both statistics
            token_max[name].append(magnitude.reshape(-1, out.shape[-1]).max(axis=1).astype(np.float64))  # exact in fp32
            if name in hists:
                hists[name].update(magnitude, absolute=True)
    result = {}
    for value in values:
        per_token = np.concatenate(token_max[value.name])
        absmax = float(per_token.max())
        if calibration is ActCalibration.MINMAX:
            clip = absmax
        elif calibration is ActCalibration.PERCENTILE:
            clip = float(np.percentile(per_token, percentile))
        else:
            clip = mse_clip(hists[value.name], absmax)
        result[value] = ActivationScale(calibration, absmax, clip, float(numerics.absmax_scale(clip)))
        log.debug("%s: absmax %.4g, clip %.4g", value.name, absmax, clip)
    return result
