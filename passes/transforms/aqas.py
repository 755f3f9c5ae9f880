"""AQAS: per-site search of the smoothing exponent with both quantizers in the loss, folded like SmoothQuant."""

from __future__ import annotations

import dataclasses
import enum
import logging

import numpy as np
import onnx_ir as ir

from qexport import numerics
from qexport.calibration.calibrator import CalibrationStats, Calibrator
from qexport.errors import RecipeError
from qexport.passes._settings import coerce_enums
from qexport.passes.discovery import sites as site_matching
from qexport.passes.discovery.names import NameFilter, check_glob_fields
from qexport.passes.metadata import Meta
from qexport.passes.transforms.smooth import SmoothMethod, SmoothPass, site_ranges, smoothquant_scales

log = logging.getLogger(__name__)


class AqasActivations(str, enum.Enum):
    PER_TOKEN = "per_token"  # as the quantize pass's dynamic activations: one scale per row
    PER_TENSOR = "per_tensor"  # as its static activations: one scale, the calibration absmax of X / s


def _grid() -> tuple[float, ...]:
    return tuple(round(0.05 * k, 2) for k in range(21))


@dataclasses.dataclass(frozen=True)
class AqasPass(ir.passes.InPlacePass):
    """Per site, the alpha of ``alphas_grid`` minimising ||Q_A(X diag(1/s)) Q_W(diag(s) W) - X W||_F^2 (W in
    [in, out] layout, s = max|X_j|^alpha / max|W_j|^(1 - alpha) as in SmoothQuant), then SmoothQuant's fold with
    that alpha per site (:class:`SmoothPass`, so the rewrite cases and the lossless guarantee are the same).

    Q_W: symmetric int8 per output channel (column of W). Q_A: symmetric int8 ``per_token`` (row absmax) or
    ``per_tensor`` (the calibration absmax of X / s over all windows, from ``stats``). X: ``tokens`` rows of the
    site's activation sampled uniformly (``seed``) from the ``calibrator``'s windows run through the graph as it
    is (the pipeline provides ``stats`` and ``calibrator``); for ``v_o`` the scales live on the V channels and
    reach o_proj's input through each query head's KV head. The chosen alphas are recorded in the model metadata
    (``qexport.aqas.<site>``).
    """

    stats: CalibrationStats
    calibrator: Calibrator | None = None
    sites: tuple[str, ...] = ("layers.*",)  # site-name globs, as smooth's
    activations: AqasActivations = AqasActivations.PER_TOKEN
    alphas_grid: tuple[float, ...] = dataclasses.field(default_factory=_grid)
    tokens: int = 256
    seed: int = 0
    head_dim: int | None = None

    def __post_init__(self) -> None:
        check_glob_fields(self, "aqas", "sites")
        coerce_enums(self, "aqas", activations=AqasActivations)
        if not self.alphas_grid or any(not 0.0 <= a <= 1.0 for a in self.alphas_grid):
            raise RecipeError(f"aqas alphas_grid must be a non-empty list within [0, 1], got {list(self.alphas_grid)}")
        if self.tokens < 1:
            raise RecipeError(f"aqas tokens must be at least 1, got {self.tokens}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.calibrator is None:
            raise RecipeError("aqas needs calibration windows (run it through a recipe, or pass "
                              "calibrator=Calibrator(windows))")
        found = site_matching.find_sites(model, head_dim=self.head_dim)
        selected = [site for site in found.select(NameFilter(self.sites)) if _eligible(site)
                    and model.metadata_props.get(Meta.SMOOTHED.key(site.name)) != self.stats.fingerprint]
        if not selected:
            return ir.passes.PassResult(model, False)
        rows = self.calibrator.sample_rows(model, [site.activation.name for site in selected], self.tokens, self.seed)
        chosen = {}
        for site in selected:
            losses = self.losses(site, rows[site.activation.name])
            chosen[site.name] = self.alphas_grid[int(np.argmin(losses))]
            log.debug("%s: alpha %.2f (loss %.4g; alpha 0.5: %.4g)", site.name, chosen[site.name], min(losses),
                      losses[self.alphas_grid.index(0.5)] if 0.5 in self.alphas_grid else float("nan"))
        result = SmoothPass(stats=self.stats, method=SmoothMethod.SMOOTHQUANT, alphas=chosen,
                            sites=self.sites, head_dim=self.head_dim)(model)
        for name, alpha in chosen.items():
            model.metadata_props[Meta.AQAS_ALPHA.key(name)] = f"{alpha:g}"
        log.info("aqas alphas: %s", ", ".join(f"{k} {v:g}" for k, v in chosen.items()))
        return ir.passes.PassResult(model, result.modified)

    def losses(self, site: site_matching.Site, x: np.ndarray) -> list[float]:
        """The loss for each alpha of the grid, on the sampled rows ``x`` of the site's activation."""
        absmax = self.stats[site.name].absmax
        act, weight_range = site_ranges(site, absmax)
        w = site_matching.consumer_weight(site)
        to_x = site.o_to_v_channel() if isinstance(site, site_matching.VOSite) else np.arange(len(act))
        reference = x.astype(np.float64) @ w
        out = []
        for alpha in self.alphas_grid:
            s = smoothquant_scales(act, weight_range, alpha)[to_x]
            if self.activations is AqasActivations.PER_TOKEN:
                xq = numerics.fake_quant(x / s, axis=1)  # a scale per row
            else:
                xq = numerics.fake_quant(x / s, scale=float((absmax / s).max()) / numerics.INT8_QMAX)
            wq = numerics.fake_quant(s[:, None] * w, axis=0)  # a scale per output channel
            product = xq.astype(np.float32) @ wq.astype(np.float32)
            out.append(float(np.square(product - reference).sum()))
        return out


def _eligible(site: site_matching.Site) -> bool:
    if isinstance(site, site_matching.NormSite):
        return site.role != "lm_head" and site.norm.gamma is not None
    return True

