"""Quantization difficulty of one linear layer (Czakó et al., 2025).

For activations X [tokens, in] and a weight W [out, in] (torch layout, Y = X Wᵀ):

- channel magnitude c_j = ‖X[:, j]‖₂ and difficulty D(X) = std_j c_j; likewise D(W) = std_j ‖W[:, j]‖₂;
- layer error ‖X Wᵀ − Q(X) Q(W)ᵀ‖²_F with symmetric RTN, per token for X and per output channel for W;
- estimate E ≈ (1/12)(‖W‖²_F Σ_t Δ_t² + ‖X‖²_F Σ_o Δ_o²), the rounding-noise model of that error.

With Q(X) = X + e_X, the error is ≈ e_X Wᵀ + X e_Wᵀ; uniform rounding noise has variance Δ²/12, hence E.
Smoothing by s_j = sqrt(a_j / w_j) (a, w the channel L2 norms of X and W) minimises ‖X S⁻¹‖²_F ‖W S‖²_F,
and a rotation flattens each row so that its step Δ_t tends to κ‖x_t‖₂/√n.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np


def _as_2d(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {array.shape}")
    return array


def channel_magnitudes(x: np.ndarray) -> np.ndarray:
    """c_j = ‖X[:, j]‖₂: the L2 norm of each input channel over tokens (or over output rows for a weight)."""
    return np.linalg.norm(_as_2d(x, "x"), axis=0)


def activation_difficulty(x: np.ndarray) -> float:
    """D(X) = std_j ‖X[:, j]‖₂ (population std)."""
    return float(np.std(channel_magnitudes(x)))


def weight_difficulty(w: np.ndarray) -> float:
    """D(W) = std_j ‖W[:, j]‖₂ over input channels j of a [out, in] weight."""
    return float(np.std(channel_magnitudes(w)))


def rtn_rows(a: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric round-to-nearest per row; returns (dequantized rows, step Δ per row). All-zero rows stay zero."""
    a = _as_2d(a, "a")
    if bits < 2:
        raise ValueError(f"bits must be at least 2, got {bits}")
    qmax = 2 ** (bits - 1) - 1
    step = np.abs(a).max(axis=1) / qmax
    safe = np.where(step > 0, step, 1.0)[:, None]
    return np.clip(np.round(a / safe), -qmax, qmax) * safe * (step > 0)[:, None], step


def layer_error(x: np.ndarray, w: np.ndarray, bits: int = 4) -> float:
    """‖X Wᵀ − Q(X) Q(W)ᵀ‖²_F with per-token Q(X) and per-output-channel Q(W), both ``bits``-bit symmetric."""
    x, w = _as_2d(x, "x"), _as_2d(w, "w")
    qx, _ = rtn_rows(x, bits)
    qw, _ = rtn_rows(w, bits)
    return float(np.sum((x @ w.T - qx @ qw.T) ** 2))


def error_estimate(x: np.ndarray, w: np.ndarray, bits: int = 4) -> float:
    """E = (1/12)(‖W‖²_F Σ_t Δ_t² + ‖X‖²_F Σ_o Δ_o²)."""
    x, w = _as_2d(x, "x"), _as_2d(w, "w")
    _, step_x = rtn_rows(x, bits)
    _, step_w = rtn_rows(w, bits)
    return float((np.sum(w**2) * np.sum(step_x**2) + np.sum(x**2) * np.sum(step_w**2)) / 12.0)


def norm_product(x: np.ndarray, w: np.ndarray) -> float:
    """‖X‖²_F ‖W‖²_F: what the estimate becomes, up to κ²/(6n), once rotation has flattened every row."""
    return float(np.sum(_as_2d(x, "x") ** 2) * np.sum(_as_2d(w, "w") ** 2))


def l2_smoothing_scales(x: np.ndarray, w: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """s_j = sqrt(a_j / w_j): the scales minimising ‖X S⁻¹‖²_F ‖W S‖²_F (Cauchy-Schwarz), to (Σ a_j w_j)²."""
    a, b = channel_magnitudes(x), channel_magnitudes(w)
    return np.sqrt(np.maximum(a, eps) / np.maximum(b, eps))


@dataclasses.dataclass(frozen=True)
class Difficulty:
    """The difficulty metrics of one layer (see the module docstring)."""

    activation: float
    weight: float
    error: float
    estimate: float
    bits: int


def measure(x: np.ndarray, w: np.ndarray, bits: int = 4) -> Difficulty:
    """All metrics of one layer with ``bits``-bit RTN on both sides."""
    return Difficulty(activation_difficulty(x), weight_difficulty(w), layer_error(x, w, bits),
                      error_estimate(x, w, bits), bits)


def format_table(rows: Mapping[str, Difficulty]) -> str:
    """A plain-text table, one line per layer, in insertion order."""
    header = ("layer", "D(X)", "D(W)", "error", "estimate", "bits")
    lines = [(name, f"{d.activation:.4g}", f"{d.weight:.4g}", f"{d.error:.4g}", f"{d.estimate:.4g}", str(d.bits))
             for name, d in rows.items()]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]

    def fmt(row: tuple[str, ...]) -> str:
        return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, lines)])
