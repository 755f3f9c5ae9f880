"""Per-channel smoothing: move activation range into the weights, folded offline into the producer."""

from __future__ import annotations

import dataclasses
import enum
import logging
from typing import Mapping

import numpy as np
import onnx_ir as ir

from qexport.calibration.calibrator import CalibrationStats
from qexport.errors import RecipeError
from qexport.passes.discovery import sites as site_matching
from qexport.passes.discovery.names import NameFilter, check_glob_fields
from qexport.passes._ir import const_f64, set_const_input, write_bias, write_weight
from qexport.passes._settings import coerce_enums
from qexport.passes.metadata import Meta

log = logging.getLogger(__name__)


class SmoothMethod(str, enum.Enum):
    SMOOTHQUANT = "smoothquant"  # s_j = max|X_j|^a / max|W_j|^(1-a)
    AWEQ = "aweq"  # s_j = sqrt(max|X_j| / max|W_j|): equalised ranges
    ATQ = "atq"  # s_j = max(1, max|X_j| / tau), tau a percentile of the channel absmax: outliers only


@dataclasses.dataclass(frozen=True)
class SmoothPass(ir.passes.InPlacePass):
    """Scale activation channels down by s and the weights reading them up by s; nothing is added online.

    Rewrite cases (sites selected by the globs ``sites``, a list; X' = X / s, W[:, j] *= s_j in torch layout):

    1. norm site (``layers.i.attn_norm`` / ``mlp_norm``): gamma_j /= s_j (and beta_j /= s_j); q/k/v or gate/up
       or fc1 input rows scaled by s. A norm without gamma is skipped with a warning.
    2. ``layers.i.v_o``: v_proj output channel c (and bias) divided by s_c; o_proj input channel j multiplied by
       s_(map j), where map sends query head h to KV head h // group (GQA). One scale per KV channel, shared
       by its query group: its ranges are the max over the group. The KV cache then stores V / s.
    3. ``layers.i.up_down``: up_proj (fc1) output channel c and bias divided by s_c, down_proj (fc2) input row
       multiplied by s_c. Never gate (SiLU/GELU are not homogeneous); through ReLU only (OPT fc1 -> fc2).

    Statistics must describe the graph being rewritten (collect after FoldNormPass if it runs first).
    max|W_j| is over all consumer rows (q, k, v together). Channels with a zero range keep s = 1.
    ``alphas`` maps site-name globs to alpha (first match wins; SmoothQuant only). ``percentile`` sets ATQ's tau.
    Each smoothed site is recorded in the model's metadata (``qexport.smoothed.<site>`` = stats fingerprint):
    a second run with the same statistics skips those sites and reports ``modified`` False, since the
    statistics no longer describe them; recollect statistics to smooth again.
    """

    stats: CalibrationStats
    method: SmoothMethod = SmoothMethod.SMOOTHQUANT
    alpha: float = 0.5
    alphas: Mapping[str, float] = dataclasses.field(default_factory=dict)
    percentile: float = 50.0
    sites: tuple[str, ...] = ("layers.*",)
    head_dim: int | None = None

    def __post_init__(self) -> None:
        check_glob_fields(self, "smooth", "sites")
        coerce_enums(self, "smooth", method=SmoothMethod)
        for key, a in {"alpha": self.alpha, **{f"alphas[{k!r}]": v for k, v in self.alphas.items()}}.items():
            if not 0.0 <= a <= 1.0:
                raise RecipeError(f"smooth {key} must be within [0, 1], got {a}")
        if not 0.0 < self.percentile <= 100.0:
            raise RecipeError(f"smooth percentile must be within (0, 100], got {self.percentile}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for site, scales in self.scales_for(model).items():
            if np.all(scales == 1.0):
                continue
            fold_scales(model.graph, site, scales)
            model.metadata_props[Meta.SMOOTHED.key(site.name)] = self.stats.fingerprint
            modified = True
            log.debug("smoothed %s: scales in [%.3g, %.3g]", site.name, scales.min(), scales.max())
        return ir.passes.PassResult(model, modified)

    def scales_for(self, model: ir.Model) -> dict[site_matching.Site, np.ndarray]:
        """The scales this pass would apply, per selected site not yet smoothed with these statistics (pure)."""
        found = site_matching.find_sites(model, head_dim=self.head_dim)
        result = {}
        for site in found.select(NameFilter(self.sites)):
            if isinstance(site, site_matching.NormSite) and site.role == "lm_head":
                continue
            if model.metadata_props.get(Meta.SMOOTHED.key(site.name)) == self.stats.fingerprint:
                log.debug("%s already smoothed with these statistics; skipped", site.name)
                continue
            if isinstance(site, site_matching.NormSite) and site.norm.gamma is None:
                log.warning("%s has no gamma to absorb a scale; skipped", site.name)
                continue
            act, weight = site_ranges(site, self.stats[site.name].absmax)
            result[site] = self._scales(site.name, act, weight)
        return result

    def _scales(self, name: str, act: np.ndarray, weight: np.ndarray) -> np.ndarray:
        valid = (act > 0) & (weight > 0)
        a, w = np.where(valid, act, 1.0), np.where(valid, weight, 1.0)
        if self.method is SmoothMethod.SMOOTHQUANT:
            alpha = next((v for k, v in self.alphas.items() if NameFilter((k,)).matches(name)), self.alpha)
            return smoothquant_scales(act, weight, alpha)
        elif self.method is SmoothMethod.AWEQ:
            s = np.sqrt(a / w)
        else:
            tau = np.percentile(act[valid], self.percentile) if valid.any() else 1.0
            s = np.maximum(1.0, a / tau)
        return np.where(valid, np.maximum(s, 1e-5), 1.0)


def site_ranges(site: site_matching.Site, act_absmax: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(max|X_c|, max|W_c|) per scaled channel c; ``act_absmax`` is per channel of the site's activation (for
    ``v_o``, per o_proj input channel: reduced here to the V channels, max over each query group)."""
    act = act_absmax
    if isinstance(site, site_matching.NormSite):
        weight = np.max([np.abs(lin.weight_in_out()).max(axis=1) for lin in site.linears], axis=0)
    elif isinstance(site, site_matching.UpDownSite):
        weight = np.abs(site.down.weight_in_out()).max(axis=1)
    else:
        index = site.o_to_v_channel()
        per_o = np.abs(site.o.weight_in_out()).max(axis=1)
        act_v, weight_v = np.zeros(site.v.out_features), np.zeros(site.v.out_features)
        np.maximum.at(act_v, index, act)
        np.maximum.at(weight_v, index, per_o)
        act, weight = act_v, weight_v
    if act.shape != weight.shape:
        raise RecipeError(f"statistics for {site.name} have {act.shape[0]} channels, the graph {weight.shape[0]}")
    return act, weight


def smoothquant_scales(act: np.ndarray, weight: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha); 1 where either range is zero."""
    valid = (act > 0) & (weight > 0)
    a, w = np.where(valid, act, 1.0), np.where(valid, weight, 1.0)
    s = np.maximum(a, 1e-5) ** alpha / np.maximum(w, 1e-5) ** (1.0 - alpha)
    return np.where(valid, np.maximum(s, 1e-5), 1.0)


def fold_scales(graph: ir.Graph, site: site_matching.Site, s: np.ndarray) -> None:
    """Fold ``s`` into the producer (divide) and the consumers (multiply) of the site's activation."""
    if isinstance(site, site_matching.NormSite):
        norm = site.norm
        set_const_input(graph, norm.gamma_node, norm.gamma_index, const_f64(norm.gamma) / s, f"{site.name}.gamma")
        if norm.beta is not None:
            set_const_input(graph, norm.beta_node, norm.beta_index, const_f64(norm.beta) / s, f"{site.name}.beta")
        for linear in site.linears:
            write_weight(graph, linear, s[:, None] * linear.weight_in_out())
        return
    producer, consumer, rows = (site.up, site.down, s) if isinstance(site, site_matching.UpDownSite) else (
        site.v, site.o, s[site.o_to_v_channel()])
    write_weight(graph, producer, producer.weight_in_out() / s[None, :])
    if producer.bias is not None:
        write_bias(graph, producer, producer.bias_array() / s)
    write_weight(graph, consumer, rows[:, None] * consumer.weight_in_out())
