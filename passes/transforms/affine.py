"""AffineQuant (Ma et al., ICLR 2024): a learned invertible matrix per site, folded offline."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from qexport.calibration.calibrator import Calibrator
from qexport.errors import QexportError, RecipeError
from qexport.passes.discovery import sites as site_matching
from qexport.passes.discovery.names import NameFilter, check_glob_fields
from qexport.passes._ir import write_bias, write_weight
from qexport.passes.metadata import Meta
from qexport.calibration.affine_fit import FitProblem, FitSettings, fit
from qexport.passes.transforms.smooth import fold_scales

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AffinePass(ir.passes.InPlacePass):
    """Fit A per site to minimise its W/A fake-quantized output error, and fold X' = X A⁻¹, B' = A B offline.

    ONNX layout: a site's consumers compute X B with B = Wᵀ [in, out]; X A⁻¹ (A B) = X B exactly. Rewrite
    cases (sites selected by the globs ``sites``; nothing is added online):

    1. ``layers.i.v_o``: A is block diagonal, one full head_dim × head_dim block A_k per KV head k, shared by
       the query heads that read it (GQA). v_proj columns (and bias) of KV head k become B_v[:, k] A_k⁻¹, so
       attention outputs X A⁻¹ (it mixes values only across tokens), and o_proj rows of query head h become
       A_(h // group) B_o[h]. The KV cache stores the transformed values V A⁻¹.
    2. norm site (``layers.i.attn_norm`` / ``mlp_norm``): A = diag(s) only, as in the paper's weight-activation
       mode: gamma (and beta) / s, consumer rows (q/k/v, gate/up, fc1) * s.
    3. ``layers.i.up_down`` (not selected by default; the paper excludes it): diag(s) only, through up_proj
       (fc1) columns and bias / s, down_proj rows * s; s > 0, so it passes a ReLU.

    A starts at SmoothQuant's diag(s) (alpha 0.5, from the samples) and is fitted by :func:`affine_fit.fit`
    (AdamW, gradual mask, strict diagonal dominance). Samples (at most ``max_tokens`` rows per site) of each
    site's activation are drawn from the ``calibrator``'s windows (the pipeline provides it) on the graph being
    rewritten; v_o sites are fitted first, so the norm-site fits see the transformed v_proj weight. Folding
    is float64. Each fitted site is recorded in ``metadata_props`` (``qexport.affine.<site>`` = fingerprint of
    the windows): a second run with the same windows skips it and reports ``modified`` False.
    """

    calibrator: Calibrator | None = None
    sites: tuple[str, ...] = ("layers.*_norm", "layers.*.v_o")
    weight_bits: int = 8
    act_bits: int = 8
    epochs: int = 8
    lr: float = 5e-3
    mask_scale: float = 1.0
    batch_tokens: int = 512
    max_tokens: int = 2048
    dominance_margin: float = 0.01
    seed: int = 0
    head_dim: int | None = None

    def __post_init__(self) -> None:
        check_glob_fields(self, "affine", "sites")
        checks = {
            "weight_bits": 2 <= self.weight_bits <= 16, "act_bits": 2 <= self.act_bits <= 16,
            "epochs": self.epochs >= 1, "lr": self.lr > 0, "mask_scale": 0 < self.mask_scale <= 1,
            "batch_tokens": self.batch_tokens >= 1, "max_tokens": self.max_tokens >= 1,
            "dominance_margin": 0 <= self.dominance_margin < 1,
        }
        for key, ok in checks.items():
            if not ok:
                raise RecipeError(f"affine {key} is out of range: {getattr(self, key)!r}")

    @property
    def settings(self) -> FitSettings:
        return FitSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(FitSettings)})

    def pending(self, model: ir.Model) -> list[site_matching.Site]:
        """The selected sites not yet fitted on these windows (pure)."""
        found, result = site_matching.find_sites(model, head_dim=self.head_dim), []
        mark = self.calibrator.fingerprint() if self.calibrator is not None else None
        for site in found.select(NameFilter(self.sites)):
            if isinstance(site, site_matching.NormSite) and (site.role == "lm_head" or site.norm.gamma is None):
                log.warning("%s cannot absorb a scale (lm_head norm or no gamma); skipped", site.name)
            elif mark is not None and model.metadata_props.get(Meta.AFFINE.key(site.name)) == mark:
                log.debug("%s already fitted on these windows; skipped", site.name)
            else:
                result.append(site)
        return result

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        pending = self.pending(model)
        todo = {site.name for site in pending}
        if not todo:
            return ir.passes.PassResult(model, False)
        if self.calibrator is None:
            raise RecipeError("the affine pass needs calibration windows (run it through a recipe, or pass "
                              "calibrator=Calibrator(windows))")
        names = [site.activation.name for site in pending]
        rows = self.calibrator.sample_rows(model, names, self.max_tokens, self.seed)
        samples = {site.name: rows[site.activation.name].astype(np.float32) for site in pending}
        modified, mark = False, self.calibrator.fingerprint()
        # one phase per kind, sites found again after each: a phase may have rewritten weights the next reads
        for kind in (site_matching.VOSite, site_matching.NormSite, site_matching.UpDownSite):
            for site in site_matching.find_sites(model, head_dim=self.head_dim).all:
                if not isinstance(site, kind) or site.name not in todo:
                    continue
                result = fit(problem_for(site, samples[site.name]), self.settings)
                log.info("affine %s: quantized loss %.4g -> %.4g (%d rows shrunk for dominance)", site.name,
                         result.loss_init, result.loss_final, result.shrunk_rows)
                if np.array_equal(result.matrix, np.broadcast_to(np.eye(result.matrix.shape[-1]), result.matrix.shape)):
                    continue
                apply_site(model.graph, site, result.matrix)
                model.metadata_props[Meta.AFFINE.key(site.name)] = mark
                modified = True
        return ir.passes.PassResult(model, modified)


def _smoothquant_start(act: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """SmoothQuant alpha 0.5: s = sqrt(max|X_j| / max|B_j,:|), 1 where a range is zero."""
    valid = (act > 0) & (weight > 0)
    s = np.sqrt(np.maximum(np.where(valid, act, 1.0), 1e-5) / np.maximum(np.where(valid, weight, 1.0), 1e-5))
    return np.where(valid, np.maximum(s, 1e-5), 1.0)


def problem_for(site: site_matching.Site, x: np.ndarray) -> FitProblem:
    """The fitting problem of one site: its samples, consumer weight [n, out], and SmoothQuant start."""
    if isinstance(site, site_matching.NormSite):
        w = np.concatenate([lin.weight_in_out() for lin in site.linears], axis=1)
    else:
        w = (site.o if isinstance(site, site_matching.VOSite) else site.down).weight_in_out()
    if x.shape[1] != w.shape[0]:
        raise QexportError(f"samples for {site.name} have {x.shape[1]} channels, the graph {w.shape[0]}")
    act, weight = np.abs(x).max(axis=0).astype(np.float64), np.abs(w).max(axis=1)
    if not isinstance(site, site_matching.VOSite):
        return FitProblem(x, w, _smoothquant_start(act, weight)[:, None], np.arange(w.shape[0]))
    index = site.o_to_v_channel()  # one start per KV channel: the max over its query group
    act_v, weight_v = np.zeros(site.v.out_features), np.zeros(site.v.out_features)
    np.maximum.at(act_v, index, act)
    np.maximum.at(weight_v, index, weight)
    group = site.num_heads // site.num_kv_heads
    init = _smoothquant_start(act_v, weight_v).reshape(site.num_kv_heads, site.head_dim)
    return FitProblem(x, w, init, np.arange(site.num_heads) // group)


def apply_site(graph: ir.Graph, site: site_matching.Site, matrix: np.ndarray) -> None:
    """Fold a fitted A ([blocks, d, d], float64) into the site's producer (A⁻¹ side) and consumers (A side)."""
    if isinstance(site, site_matching.VOSite):
        _apply_v_o(graph, site, matrix)
        return
    s = matrix[:, 0, 0]
    if isinstance(site, site_matching.UpDownSite) and np.any(s <= 0):
        raise QexportError(f"{site.name}: a diagonal through the MLP activation must be positive")
    fold_scales(graph, site, s)  # norm and up->down sites are diagonal: the same fold as smoothing


def _apply_v_o(graph: ir.Graph, site: site_matching.VOSite, a: np.ndarray) -> None:
    """v_proj: B_v[:, k] A_k⁻¹ per KV head k (and its bias); o_proj: A_(h // group) B_o[h] per query head h."""
    hd, kv = site.head_dim, site.num_kv_heads
    inverse = np.linalg.inv(a)
    w_v = site.v.weight_in_out()
    write_weight(graph, site.v, np.einsum("rkd,kde->rke", w_v.reshape(-1, kv, hd), inverse).reshape(w_v.shape))
    b_v = site.v.bias_array()
    if b_v is not None:
        write_bias(graph, site.v, np.einsum("kd,kde->ke", b_v.reshape(kv, hd), inverse).reshape(-1))
    w_o = site.o.weight_in_out()
    per_head = a[np.arange(site.num_heads) // (site.num_heads // kv)]
    write_weight(graph, site.o, np.einsum("hde,heo->hdo", per_head, w_o.reshape(site.num_heads, hd, -1)).reshape(w_o.shape))
    log.debug("folded %s: %d KV blocks of %d x %d, off-diagonal max %.3g", site.name, kv, hd, hd,
              np.abs(a - np.einsum("kii->ki", a)[:, :, None] * np.eye(hd)).max())
