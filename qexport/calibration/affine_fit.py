"""AffineQuant's optimisation of one site's invertible matrix (Ma et al., ICLR 2024), in torch on the CPU.

Layout is the graph's (ONNX): X [tokens, n] is the activation a site's consumers read, B = Wᵀ [n, out] their
weight (several consumers side by side), Y = X B. The transform X' = X A⁻¹, B' = A B is exact in floating
point (torch layout: W' = W Aᵀ), and the loss is the site's output error with both operands fake-quantized::

    L(A) = mean((Q_tok(X A⁻¹) · Q_col(A B) − X B)²)

Q_tok is symmetric per token (row of X'), Q_col symmetric per output channel (column of B', a row of torch W');
rounding passes gradients straight through (STE). A is block diagonal: ``block_of[k]`` names the parameter
block acting on input channels [k d, (k + 1) d), so a KV head's block is shared by its query group (GQA);
d = 1 is a plain diagonal (norm sites). The forward pass uses A∘GM, the gradual mask: epoch e keeps the band
|i − j| ≤ floor((d − 1) e / (E − 1)) at ``mask_scale`` (diagonal only at epoch 0, full at the last epoch).
After every optimiser step each row is made strictly diagonally dominant (Levy–Desplanques, so A∘GM stays
invertible) by shrinking its off-diagonal entries, and the diagonal keeps the sign of its SmoothQuant start
and at least 1 % of its magnitude (so a diagonal A stays positive: it can pass through a ReLU).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch

log = logging.getLogger(__name__)

_DIAG_FLOOR = 0.01  # |A_ii| >= 1 % of its initial value


@dataclasses.dataclass(frozen=True)
class FitSettings:
    weight_bits: int = 8
    act_bits: int = 8
    epochs: int = 8
    lr: float = 5e-3
    mask_scale: float = 1.0
    batch_tokens: int = 512
    dominance_margin: float = 0.01  # off-diagonal row sum <= (1 - margin) |A_ii|
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class FitProblem:
    """One site: samples ``x`` [tokens, n], weight ``w`` [n, out], starting diagonal ``init`` [blocks, d]."""

    x: np.ndarray
    w: np.ndarray
    init: np.ndarray
    block_of: np.ndarray  # [n // d] parameter block of each input-channel block

    def __post_init__(self) -> None:
        blocks, d = self.init.shape
        if self.x.shape[1] != self.w.shape[0] or self.w.shape[0] != d * len(self.block_of):
            raise ValueError(f"shapes disagree: x {self.x.shape}, w {self.w.shape}, {len(self.block_of)} blocks of {d}")
        if self.block_of.min() < 0 or self.block_of.max() >= blocks:
            raise ValueError(f"block_of must index the {blocks} parameter blocks")


@dataclasses.dataclass(frozen=True)
class FitResult:
    """The exported matrix A∘GM per parameter block ([blocks, d, d], float64) and the loss it reached."""

    matrix: np.ndarray
    loss_init: float
    loss_final: float
    shrunk_rows: int  # rows whose off-diagonals were shrunk to keep strict diagonal dominance (all steps)


def fake_quant_rows(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric round-to-nearest per row (last axis), with a straight-through estimator for the rounding."""
    qmax = 2 ** (bits - 1) - 1
    step = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / qmax
    scaled = x / step
    rounded = scaled + (torch.round(scaled) - scaled).detach()
    return torch.clamp(rounded, -qmax, qmax) * step


def band_mask(d: int, epoch: int, epochs: int, scale: float) -> torch.Tensor:
    """The gradual mask GM for ``epoch`` of ``epochs``: 1 on the diagonal, ``scale`` within the band, 0 outside."""
    width = (d - 1) * epoch // (epochs - 1) if epochs > 1 else 0
    i = torch.arange(d)
    mask = torch.where((i[:, None] - i[None, :]).abs() <= width, scale, 0.0)
    mask.fill_diagonal_(1.0)
    return mask


def transform(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor,
              block_of: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(X A⁻¹, A B) for block-diagonal A given as parameter blocks ``a`` [blocks, d, d]."""
    k, d = block_of.numel(), a.shape[-1]
    inv = torch.linalg.inv(a)[block_of]
    xt = torch.einsum("tkd,kde->tke", x.reshape(-1, k, d), inv).reshape(x.shape)
    wt = torch.einsum("kde,keo->kdo", a[block_of], w.reshape(k, d, -1)).reshape(w.shape)
    return xt, wt


def quantized_loss(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, a: torch.Tensor, block_of: torch.Tensor,
                   settings: FitSettings) -> torch.Tensor:
    """mean((Q_tok(X A⁻¹) Q_col(A B) − X B)²); ``y`` is X B."""
    xt, wt = transform(x, w, a, block_of)
    qw = fake_quant_rows(wt.T, settings.weight_bits).T  # per output channel: a column of B
    return ((fake_quant_rows(xt, settings.act_bits) @ qw - y) ** 2).mean()


def is_strictly_dominant(a: np.ndarray) -> bool:
    """Levy–Desplanques: |a_ii| > Σ_{j≠i} |a_ij| in every row of every block (``a`` [blocks, d, d])."""
    diag = np.abs(np.diagonal(a, axis1=-2, axis2=-1))
    return bool(np.all(diag > np.abs(a).sum(axis=-1) - diag))


@torch.no_grad()
def _keep_dominant(a: torch.Tensor, mask: torch.Tensor, init: torch.Tensor, margin: float) -> int:
    """Clamp the diagonal (sign of ``init``, >= 1 % of it) and shrink off-diagonal rows of A∘GM that violate
    (1 − margin)-strict dominance; returns the number of rows shrunk."""
    sign = torch.sign(init)
    diag = sign * torch.maximum(sign * torch.diagonal(a, dim1=-2, dim2=-1), _DIAG_FLOOR * init.abs())
    torch.diagonal(a, dim1=-2, dim2=-1).copy_(diag)  # mask is 1 on the diagonal
    off = (a * mask).abs().sum(dim=-1) - diag.abs()
    limit = (1.0 - margin) * diag.abs()
    over = off > limit
    factor = torch.where(over, limit / off.clamp_min(1e-30), torch.ones_like(off))
    eye = torch.eye(a.shape[-1], dtype=torch.bool)
    a.mul_(torch.where(eye, torch.ones_like(a), factor[..., None]))
    return int(over.sum())


@torch.no_grad()
def _full_loss(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, a: torch.Tensor, block_of: torch.Tensor,
               settings: FitSettings) -> float:
    total = 0.0
    for rows in torch.arange(x.shape[0]).split(settings.batch_tokens):
        total += float(quantized_loss(x[rows], w, y[rows], a, block_of, settings)) * rows.numel()
    return total / x.shape[0]


def fit(problem: FitProblem, settings: FitSettings) -> FitResult:
    """Optimise A from its diagonal start with AdamW on shuffled token batches; returns A∘GM of the last epoch.

    If the final loss on all samples is not below the initial one, the initial diagonal is returned (and a
    warning logged): the pass never makes a site worse than SmoothQuant on its calibration samples.
    Runs on one torch thread: the small batched inverses are far slower multi-threaded on busy cores.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit(problem, settings)
    finally:
        torch.set_num_threads(threads)


def _fit(problem: FitProblem, settings: FitSettings) -> FitResult:
    generator = torch.Generator().manual_seed(settings.seed)
    x = torch.from_numpy(np.ascontiguousarray(problem.x, dtype=np.float32))
    w = torch.from_numpy(np.ascontiguousarray(problem.w, dtype=np.float32))
    y = x @ w
    block_of = torch.from_numpy(np.asarray(problem.block_of, dtype=np.int64))
    init = torch.from_numpy(np.asarray(problem.init, dtype=np.float32))
    d = init.shape[-1]
    a = torch.diag_embed(init).clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([a], lr=settings.lr, weight_decay=0.0)
    loss_init = _full_loss(x, w, y, a.detach(), block_of, settings)
    shrunk, mask = 0, band_mask(d, 0, settings.epochs, settings.mask_scale)
    for epoch in range(settings.epochs):
        mask = band_mask(d, epoch, settings.epochs, settings.mask_scale)
        for rows in torch.randperm(x.shape[0], generator=generator).split(settings.batch_tokens):
            optimizer.zero_grad()
            quantized_loss(x[rows], w, y[rows], a * mask, block_of, settings).backward()
            optimizer.step()
            shrunk += _keep_dominant(a.data, mask, init, settings.dominance_margin)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("epoch %d: band %d, loss %.4g", epoch, int((mask[0] > 0).sum()) - 1,
                      _full_loss(x, w, y, (a * mask).detach(), block_of, settings))
    final = (a * mask).detach().double()
    loss_final = _full_loss(x, w, y, final.float(), block_of, settings)
    matrix = final.numpy()
    if not is_strictly_dominant(matrix):  # _keep_dominant guarantees it; a float32 tie would land here
        raise ArithmeticError("the fitted matrix lost strict diagonal dominance")
    if not loss_final < loss_init:
        log.warning("affine fit did not improve on its SmoothQuant start (%.4g -> %.4g); keeping the start",
                    loss_init, loss_final)
        return FitResult(np.asarray(torch.diag_embed(init.double())), loss_init, loss_init, shrunk)
    return FitResult(matrix, loss_init, loss_final, shrunk)
