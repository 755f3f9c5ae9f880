"""The shared numerics: symmetric fake quantization and the distances between two tensors.

numpy only, so that every area (passes, calibration, report, evaluation) can use the one definition.

- Symmetric int-b round-to-nearest: scale Δ = absmax / q_max (q_max = 2^(b-1) - 1, 127 for int8), codes
  q = clip(round(x / Δ), -q_max, q_max), fake-quantized value q·Δ. Where the absmax is 0 the scale is 1 (or,
  with ``eps``, floored at ``eps``, as the graph's per-token ``Max(eps)``), so all-zero rows stay zero.
- SQNR in dB: 10 log10(Σ ref² / Σ (cand - ref)²); +inf without noise, -inf with noise but no signal.
- Cosine of the whole arrays, or of each row (the last axis); max-abs difference.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

INT8_QMAX = 127  # int8 symmetric: codes -127..127 (-128 unused)
SCALE_EPS = 1e-12  # floor of a scale computed at run time (the per-token quantizer's Max(absmax / 127, eps))


def int_qmax(bits: int) -> int:
    """q_max = 2^(bits-1) - 1 of a symmetric ``bits``-bit grid (127 for int8, 7 for int4)."""
    if bits < 2:
        raise ValueError(f"bits must be at least 2, got {bits}")
    return 2 ** (bits - 1) - 1


def absmax_scale(absmax: np.ndarray | float, qmax: float = INT8_QMAX, eps: float | None = None) -> np.ndarray:
    """Δ = absmax / ``qmax``; where that is 0, 1 (default) or, given ``eps``, max(Δ, eps) everywhere."""
    step = np.asarray(absmax) / qmax
    if eps is not None:
        return np.maximum(step, eps)
    return np.where(step > 0, step, 1.0)


def round_codes(y: np.ndarray, qmax: float = INT8_QMAX) -> np.ndarray:
    """Integer codes (as floats) of ``y`` = x / Δ: round half to even, clipped to [-qmax, qmax]."""
    return np.clip(np.round(y), -qmax, qmax)


def fake_quant(x: np.ndarray, axis: int | tuple[int, ...] | None = -1, *, scale: np.ndarray | float | None = None,
               qmax: float = INT8_QMAX, eps: float | None = None) -> np.ndarray:
    """Symmetric round-to-nearest q·Δ of ``x``: Δ given as ``scale``, else the absmax over ``axis`` (kept as
    a size-1 axis; ``None``: one scale for the whole array) / ``qmax``, see :func:`absmax_scale`.

    ``axis=-1`` is per row (per token), ``axis=0`` of an [in, out] weight per output channel."""
    if scale is None:
        scale = absmax_scale(np.abs(x).max(axis=axis, keepdims=True), qmax, eps)
    return round_codes(x / scale, qmax) * scale


def signal_noise(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """(Σ ref², Σ (cand - ref)²) summed in float64: the two energies of :func:`sqnr_db`, to accumulate."""
    ref = np.asarray(reference, dtype=np.float64)
    diff = np.asarray(candidate, dtype=np.float64) - ref
    return float(np.sum(ref * ref)), float(np.sum(diff * diff))


def sqnr_db_from_sums(signal: float, noise: float) -> float:
    """10 log10(signal / noise) in dB from summed energies; +inf when ``noise`` is 0, -inf when only it is."""
    if noise == 0:
        return math.inf
    if not signal > 0:
        return -math.inf
    return 10.0 * float(np.log10(float(signal) / float(noise)))


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of ``candidate`` against ``reference`` in dB, over all entries."""
    return sqnr_db_from_sums(*signal_noise(reference, candidate))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of the two arrays as flat vectors, in float64; 1 when both are zero, 0 when only one is."""
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    norm_a, norm_b = float(np.linalg.norm(a64)), float(np.linalg.norm(b64))
    if norm_a == 0 or norm_b == 0:
        return 1.0 if norm_a == norm_b else 0.0
    return float(np.dot(a64.ravel(), b64.ravel()) / (norm_a * norm_b))


def row_cosines(a: np.ndarray, b: np.ndarray, eps: float = 1e-30,
                floor: Literal["max", "add"] = "max") -> np.ndarray:
    """Cosine of each row (last axis) of ``a`` and ``b``, in float64. The norm product is guarded by ``eps``:
    ``max(norms, eps)`` (``floor="max"``) or ``norms + eps`` (``"add"``); either way an all-zero row gives 0."""
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    norms = np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1)
    if floor == "max":
        denominator = np.maximum(norms, eps)
    elif floor == "add":
        denominator = norms + eps
    else:
        raise ValueError(f"floor must be 'max' or 'add', got {floor!r}")
    return (a64 * b64).sum(axis=-1) / denominator


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| in the arrays' own precision (float32 logits stay float32); 0 for empty arrays."""
    diff = np.asarray(a) - np.asarray(b)
    return float(np.max(np.abs(diff))) if diff.size else 0.0
