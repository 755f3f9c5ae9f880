"""Calibrated per-tensor activation scales for static quantization."""

from __future__ import annotations

import enum
import logging
from typing import Sequence

import numpy as np
import onnx_ir as ir

log = logging.getLogger(__name__)


class ActCalibration(str, enum.Enum):
    MINMAX = "minmax"  # scale = calibration absmax / 127
    PERCENTILE = "percentile"  # scale = percentile of the per-token absmax / 127 (clips rare outlier tokens)


def static_scales(model: ir.Model, values: Sequence[ir.Value], windows: Sequence[np.ndarray],
                  calibration: ActCalibration, percentile: float = 99.9,
                  threads: int | None = None) -> dict[ir.Value, float]:
    """Per-tensor symmetric int8 scale of each value, from ``windows`` run through ``model`` as it is:
    calibration absmax / 127 (``minmax``) or the ``percentile`` of the per-token absmax / 127."""
    from qexport.calibration import run_values

    names = [v.name for v in values]
    token_max: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for outs in run_values(model, names, windows, threads):
        for name, out in outs.items():
            token_max[name].append(np.abs(out.astype(np.float64)).reshape(-1, out.shape[-1]).max(axis=1))
    result = {}
    for value in values:
        per_token = np.concatenate(token_max[value.name])
        clip = per_token.max() if calibration is ActCalibration.MINMAX else np.percentile(per_token, percentile)
        result[value] = float(clip) / 127.0 if clip > 0 else 1.0
        log.debug("%s: absmax %.4g, clip %.4g", value.name, per_token.max(), clip)
    return result
