"""The quantization-difficulty metric (Czakó et al., 2025), per rewrite site, from streamed calibration statistics.

For the activation X feeding a site and the weight W reading it (all consumer linears, concatenated):
- ``dx``: std over channels of the channel RMS ‖X[:, j]‖₂ / √tokens (D(X), normalised by the token count);
- ``dw``: std over input channels of ‖W[:, j]‖₂ (D(W), torch layout);
- ``norm_product``: (‖X‖_F / √tokens) · ‖W‖_F, the quantity the rounding-noise estimate of the per-token /
  per-channel layer error, (1/12)(‖W‖²_F Σ_t Δ_t² + ‖X‖²_F Σ_o Δ_o²) with Δ the row steps, is proportional to
  once rows are flat (smoothing lowers it to its Cauchy–Schwarz bound);
- ``outlier_ratio``: largest channel absmax over the median channel absmax.
"""

from __future__ import annotations

import numpy as np

from qexport.calibration.stats import CalibrationStats, TensorStats
from qexport.passes.discovery import sites as site_matching
from qexport.passes.discovery.sites import consumer_weight


def difficulty(stats: TensorStats, weight_in_out: np.ndarray) -> dict[str, float]:
    tokens = max(stats.tokens, 1)
    channel_rms = np.sqrt(stats.sum_squares / tokens)
    weight_norms = np.linalg.norm(weight_in_out, axis=1)
    median = float(np.median(stats.absmax))
    return {
        "dx": float(channel_rms.std()),
        "dw": float(weight_norms.std()),
        "norm_product": float(np.sqrt(stats.sum_squares.sum() / tokens) * np.linalg.norm(weight_in_out)),
        "outlier_ratio": float(stats.absmax.max() / median) if median > 0 else float("inf"),
    }


def site_difficulties(site_map: site_matching.SiteMap, stats: CalibrationStats) -> dict[str, dict[str, float]]:
    """The metric for every site that has statistics."""
    return {
        site.name: difficulty(stats[site.name], consumer_weight(site))
        for site in site_map.all
        if site.name in stats
    }


def _kind(site_name: str) -> str:
    return site_name.rsplit(".", 1)[-1]


def summary_table(stages: list[dict], metrics: tuple[str, ...] = ("dx", "norm_product", "outlier_ratio")) -> str:
    """Mean of each metric per site kind (attn_norm, mlp_norm, v_o, up_down, ...): a row per kind and metric,
    a column per stage (the export, then each pass that changed the graph)."""
    kinds = sorted({_kind(name) for stage in stages for name in stage["sites"]})
    width = max(12, *(len(stage["stage"]) + 2 for stage in stages))
    lines = [f"{'site kind / metric':<26}" + "".join(f"{stage['stage']:>{width}}" for stage in stages)]
    for kind in kinds:
        for metric in metrics:
            cells = []
            for stage in stages:
                values = [row[metric] for name, row in stage["sites"].items() if _kind(name) == kind]
                cells.append(f"{np.mean(values):>{width}.4g}" if values else f"{'-':>{width}}")
            lines.append(f"{kind + ' ' + metric:<26}" + "".join(cells))
    return "\n".join(lines)
