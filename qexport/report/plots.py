"""PNG plots of a validation report (matplotlib, Agg backend: no display needed).

- ``site_error.png``: local and output SQNR of every quantized linear, by layer, one colour per role;
- ``channel_profiles.png``: absmax per input channel of the activation feeding each of the worst sites,
  with the per-tensor clip where there is one;
- ``difficulty.png``: the difficulty metric (outlier ratio, channel RMS spread) per layer and site kind,
  at the export and after each lossless stage of the recipe.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from qexport.report.build import ROLE_ORDER, layer_of, role_of

log = logging.getLogger(__name__)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def render_plots(report: dict[str, Any]) -> dict[str, bytes]:
    """File name -> PNG bytes for each plot the report has data for."""
    plots = {"site_error.png": site_error_png(report["sites"])}
    if report.get("profiles"):
        plots["channel_profiles.png"] = channel_profiles_png(report["profiles"])
    if len(report.get("difficulty") or []) > 0:
        plots["difficulty.png"] = difficulty_png(report["difficulty"])
    return plots


def write_plots(plots: dict[str, bytes], folder: str | os.PathLike) -> list[Path]:
    """Write the PNGs into ``folder`` (each through a temporary file and a rename)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in plots.items():
        tmp = folder / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, folder / name)
        written.append(folder / name)
    return written


def _png(fig) -> bytes:
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _roles(rows: list[dict[str, Any]]) -> list[str]:
    found = {role_of(r["site"]) for r in rows}
    return sorted(found, key=lambda r: (ROLE_ORDER.index(r) if r in ROLE_ORDER else len(ROLE_ORDER), r))


def site_error_png(rows: list[dict[str, Any]]) -> bytes:
    plt = _pyplot()
    roles = _roles(rows)
    layers = sorted({layer_of(r["site"]) for r in rows if layer_of(r["site"]) is not None})
    extra = [r for r in rows if layer_of(r["site"]) is None]  # lm_head
    slots = len(layers) + (1 if extra else 0)
    width = 0.8 / max(len(roles), 1)
    fig, axes = plt.subplots(2, 1, figsize=(min(16.0, max(8.0, 0.5 * slots)), 7), sharex=True)
    for ax, key, title in ((axes[0], "local_sqnr_db", "local SQNR (error this linear adds), dB"),
                           (axes[1], "output_sqnr_db", "output SQNR (error accumulated up to this output), dB")):
        for j, role in enumerate(roles):
            xs, ys = [], []
            for r in rows:
                if role_of(r["site"]) != role:
                    continue
                layer = layer_of(r["site"])
                xs.append((layers.index(layer) if layer is not None else len(layers)) + (j - len(roles) / 2 + 0.5) * width)
                ys.append(r[key] if np.isfinite(r[key]) else 0.0)
            ax.bar(xs, ys, width=width, label=role)
        ax.set_ylabel("dB")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    ticks = [str(layer) for layer in layers] + (["head"] if extra else [])
    axes[1].set_xticks(range(slots), ticks, fontsize=7)
    axes[1].set_xlabel("layer")
    axes[1].set_xlim(-0.6, slots - 0.4)
    axes[0].legend(ncol=min(len(roles), 8), fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.08))
    return _png(fig)


def channel_profiles_png(profiles: dict[str, dict[str, Any]]) -> bytes:
    plt = _pyplot()
    fig, axes = plt.subplots(len(profiles), 1, figsize=(9, 2.2 * len(profiles)), squeeze=False)
    for ax, (site, profile) in zip(axes[:, 0], profiles.items()):
        absmax = np.asarray(profile["channel_absmax"])
        ax.bar(np.arange(len(absmax)), absmax, width=1.0, color="#4c72b0")
        if profile.get("clip") is not None:
            ax.axhline(profile["clip"], color="#c44e52", linestyle="--", linewidth=1, label="per-tensor clip")
            ax.legend(fontsize=7, loc="upper right")
        median = float(np.median(absmax)) if len(absmax) else 0.0
        ratio = absmax.max() / median if median > 0 else float("inf")
        ax.set_title(f"{site}: input absmax per channel (max/median {ratio:.1f})", fontsize=9)
        ax.set_xlim(-0.5, len(absmax) - 0.5)
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("input channel")
    fig.tight_layout()
    return _png(fig)


def difficulty_png(stages: list[dict[str, Any]], metrics: tuple[str, ...] = ("outlier_ratio", "dx")) -> bytes:
    plt = _pyplot()
    kinds = sorted({name.rsplit(".", 1)[-1] for stage in stages for name in stage["sites"] if name.startswith("layers.")})
    fig, axes = plt.subplots(len(metrics), max(len(kinds), 1), figsize=(3.2 * max(len(kinds), 1), 2.8 * len(metrics)),
                             squeeze=False)
    for i, metric in enumerate(metrics):
        for j, kind in enumerate(kinds):
            ax = axes[i, j]
            series = [(stage["stage"], sorted((int(name.split(".")[1]), row[metric]) for name, row in stage["sites"].items()
                                              if name.startswith("layers.") and name.endswith("." + kind)))
                      for stage in stages]
            series = [(label, points) for label, points in series if points]  # a kind can stop matching after a pass
            for k, (label, points) in enumerate(series):
                ends = k in (0, len(series) - 1)  # the export and the last stage with this kind: bold
                ax.plot(*zip(*points), marker="o" if ends else None, markersize=3, linewidth=1.5 if ends else 0.8,
                        alpha=1.0 if ends else 0.45, label=label, color=f"C{[s['stage'] for s in stages].index(label)}")
            ax.set_yscale("log")
            ax.set_title(f"{kind}: {metric}", fontsize=9)
            ax.tick_params(labelsize=7)
            ax.set_xlabel("layer", fontsize=8)
    handles = {label: handle for ax in axes.flat for handle, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(len(handles), 7), fontsize=7,
               bbox_to_anchor=(0.5, -0.04))
    fig.tight_layout()
    return _png(fig)
