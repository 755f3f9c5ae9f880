"""Recipe changes proposed from a report's measurements, each a YAML snippet with the measured reason.

Thresholds (a site or role "stands out" when its error power is 4x the typical site's, i.e. 6 dB):
1. A role (``mlp.down``, ``attn.o``, ...) whose median local SQNR is ``ROLE_MARGIN_DB`` below the median site:
   leave that role in float with the quantization passes' ``exclude`` (``layers.*.mlp.down``).
2. Per-tensor activations where simulated per-token int8 scales gain at least ``PER_TOKEN_GAIN_DB`` of
   activation SQNR at the worst sites: ``activations: per_token`` (not TensorRT-deployable: dynamic scales).
3. Sites ``SITE_MARGIN_DB`` below the median local SQNR (at most ``MAX_SITES``, worst first), two alternatives:
   a smoothing pass for the rewrite site feeding them with a larger alpha (more of the activation range moved
   into the weights), added after the recipe's own smoothing (the alpha is a starting point to measure with
   `qexport report` again, not a measured optimum); or leaving exactly those linears in float with ``exclude``.
``exclude`` is set on every quantization pass of the recipe (``quantize-gptq`` and the ``quantize`` after it:
on one alone, the other would still quantize the linear), added to any globs the recipe already excludes.
Globs are written as YAML lists (``exclude: [layers.*.mlp.down]``, ``sites: [layers.1.v_o]``), as recipes take them.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import yaml

from qexport.passes.quantize.insert_qdq import ActQuant
from qexport.passes.discovery.names import NameFilter, glob_tuple
from qexport.report.build import layer_of, role_of

ROLE_MARGIN_DB = 6.0
SITE_MARGIN_DB = 6.0
PER_TOKEN_GAIN_DB = 3.0
MAX_SITES = 3
ALPHA_STEP = 0.15
ALPHA_MAX = 0.9
SMOOTH_SITE = {"attn.q": "attn_norm", "attn.k": "attn_norm", "attn.v": "attn_norm", "mlp.gate": "mlp_norm",
               "mlp.up": "mlp_norm", "attn.o": "v_o", "mlp.down": "up_down"}


def suggest(report: dict[str, Any], recipe: dict[str, Any]) -> list[dict[str, str]]:
    """Suggestions (title, reason, yaml snippet, full recipe yaml) from ``report`` for the manifest's ``recipe``."""
    rows = report["sites"]
    if not rows:
        return []
    median = float(np.median([r["local_sqnr_db"] for r in rows]))
    found = []
    found += _exclude_roles(report, recipe, median)
    found += _per_token(rows, recipe)
    found += _smooth_sites(report, recipe, median)
    found += _exclude_sites(report, recipe, median)
    return found


def _quantize_indices(recipe: dict[str, Any]) -> list[int]:
    return [i for i, p in enumerate(recipe.get("passes", [])) if p.get("pass") in ("quantize", "quantize-gptq")]


def _quantize_index(recipe: dict[str, Any]) -> int | None:
    """The first ``quantize`` pass (the one with activation settings; ``quantize-gptq`` has none)."""
    return next((i for i in _quantize_indices(recipe) if recipe["passes"][i].get("pass") == "quantize"), None)


def _with_quantize(recipe: dict[str, Any], **changes: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The recipe with ``changes`` set on its first ``quantize`` pass; returns (recipe, changed pass)."""
    new = copy.deepcopy(recipe)
    entry = new["passes"][_quantize_index(recipe)]
    entry.update(changes)
    return new, entry


def _suggestion(title: str, reason: str, snippet: Any, recipe: dict[str, Any]) -> dict[str, str]:
    return {"title": title, "reason": reason, "yaml": yaml.safe_dump(_ordered(snippet), sort_keys=False).rstrip(),
            "recipe": yaml.safe_dump(_ordered(recipe), sort_keys=False)}


def _ordered(recipe: dict[str, Any]) -> dict[str, Any]:
    """Name and description first, ``pass`` first in each entry (the manifest stores keys sorted)."""
    head = {k: recipe[k] for k in ("name", "description") if k in recipe}
    passes = [{"pass": e["pass"], **{k: v for k, v in e.items() if k != "pass"}} for e in recipe.get("passes", [])]
    return {**head, "passes": passes, **{k: v for k, v in recipe.items() if k not in head and k != "passes"}}


def _with_exclude(recipe: dict[str, Any], globs: dict[str, list[str]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The recipe with each glob (-> the site names it stands for) added to ``exclude`` of every quantization
    pass that selects one of its sites (the pass rejects a glob that matches nothing it selects); returns
    (recipe, changed passes)."""
    new = copy.deepcopy(recipe)
    entries = []
    for entry in (new["passes"][i] for i in _quantize_indices(recipe)):
        current = list(glob_tuple(entry.get("exclude", ()), "exclude", f"{entry['pass']} exclude"))
        added = [g for g, sites in globs.items() if g not in current and any(_selects(entry, s) for s in sites)]
        if added:
            entry["exclude"] = current + added
            entries.append(entry)
    return new, entries


def _selects(entry: dict[str, Any], site: str) -> bool:
    if site == "lm_head" and not entry.get("include_lm_head", False):
        return False
    return NameFilter(entry.get("linears", ("*",))).matches(site)


def _exclude_roles(report: dict[str, Any], recipe: dict[str, Any], median: float) -> list[dict[str, str]]:
    bad = [role for role, v in report["roles"].items() if role != "lm_head"
           and v["median_local_sqnr_db"] <= median - ROLE_MARGIN_DB and v["sites"] < len(report["sites"])]
    sites = [r["site"] for r in report["sites"]]
    new, entries = _with_exclude(recipe, {f"layers.*.{role}": [s for s in sites if role_of(s) == role] for role in bad})
    if not entries:
        return []
    reason = "; ".join(f"{role}: median local SQNR {report['roles'][role]['median_local_sqnr_db']:.1f} dB over "
                       f"{report['roles'][role]['sites']} sites" for role in bad)
    return [_suggestion(f"leave {', '.join(bad)} in float", f"{reason}, against {median:.1f} dB for the median site "
                        f"(at least {ROLE_MARGIN_DB:.0f} dB worse: 4x the error power); costs int8 speed and size there",
                        {"passes": entries}, new)]


def _per_token(rows: list[dict[str, Any]], recipe: dict[str, Any]) -> list[dict[str, str]]:
    index = _quantize_index(recipe)
    static = [r for r in rows if r["act_quant"] == ActQuant.PER_TENSOR and r["per_token_act_sqnr_db"] is not None]
    if index is None or not static:
        return []
    worst = sorted(static, key=lambda r: r["activation_sqnr_db"])[:MAX_SITES]
    gains = [r["per_token_act_sqnr_db"] - r["activation_sqnr_db"] for r in worst]
    if min(gains) < PER_TOKEN_GAIN_DB:
        return []
    new, entry = _with_quantize(recipe, activations=ActQuant.PER_TOKEN.value)
    entry.pop("calibration", None)
    entry.pop("percentile", None)
    detail = ", ".join(f"{r['site']} {r['activation_sqnr_db']:.1f} -> {r['per_token_act_sqnr_db']:.1f} dB" for r in worst)
    return [_suggestion("per-token instead of per-tensor activations",
                        f"activation SQNR at the worst per-tensor sites, per-tensor -> per-token (simulated on the same "
                        f"tokens): {detail}. Per-token scales are computed at run time, so the model no longer passes "
                        "`qexport check --target tensorrt`", {"passes": [entry]}, new)]


def _smooth_sites(report: dict[str, Any], recipe: dict[str, Any], median: float) -> list[dict[str, str]]:
    worst = [r for r in _worst_sites(report, median) if role_of(r["site"]) in SMOOTH_SITE and layer_of(r["site"]) is not None]
    passes = recipe.get("passes", [])
    smooth = [i for i, p in enumerate(passes) if p.get("pass") == "smooth"]
    entries: list[dict[str, Any]] = []
    reasons = []
    for row in worst:
        site = f"layers.{layer_of(row['site'])}.{SMOOTH_SITE[role_of(row['site'])]}"
        if any(e["sites"] == [site] for e in entries):
            continue
        covering = [passes[i] for i in smooth if NameFilter(passes[i].get("sites", ("*",))).matches(site)]
        alpha = min(ALPHA_MAX, max((p.get("alpha", 0.5) for p in covering), default=0.35) + ALPHA_STEP)
        entries.append({"pass": "smooth", "method": "smoothquant", "alpha": round(alpha, 2), "sites": [site]})
        profile = report.get("profiles", {}).get(row["site"])
        spread = ""
        if profile:
            absmax = np.asarray(profile["channel_absmax"])
            spread = f", largest input channel absmax {absmax.max() / max(np.median(absmax), 1e-30):.1f}x the median"
        where = f"smoothed at alpha {covering[-1].get('alpha', 0.5)} so far" if covering else "not smoothed so far"
        reasons.append(f"{row['site']}: local SQNR {row['local_sqnr_db']:.1f} dB (activation {row['activation_sqnr_db']:.1f}"
                       f" dB, weight {row['weight_sqnr_db']:.1f} dB){spread}; {site} is {where}")
    if not entries:
        return []
    new = copy.deepcopy(recipe)
    at = smooth[-1] + 1 if smooth else 0  # after the recipe's own smoothing, before its rotations
    new["passes"][at:at] = entries
    return [_suggestion(f"smooth {', '.join(e['sites'][0] for e in entries)} (alpha {', '.join(str(e['alpha']) for e in entries)})",
                        f"{'; '.join(reasons)}. The median site is at {median:.1f} dB: these are {SITE_MARGIN_DB:.0f} dB or "
                        "more below it. Insert the passes after the recipe's smoothing (the alternative: leave these linears "
                        "in float with exclude)", {"passes": entries}, new)]


def _worst_sites(report: dict[str, Any], median: float) -> list[dict[str, Any]]:
    return [r for r in report["sites"] if r["local_sqnr_db"] <= median - SITE_MARGIN_DB][:MAX_SITES]


def _exclude_sites(report: dict[str, Any], recipe: dict[str, Any], median: float) -> list[dict[str, str]]:
    """Leave the worst linears (at most ``MAX_SITES``) in float: their role names as ``exclude`` globs."""
    worst = _worst_sites(report, median)
    if not worst or len(worst) == len(report["sites"]):
        return []
    names = [r["site"] for r in worst]
    new, entries = _with_exclude(recipe, {name: [name] for name in names})
    if not entries:
        return []
    detail = "; ".join(f"{r['site']}: local SQNR {r['local_sqnr_db']:.1f} dB (activation {r['activation_sqnr_db']:.1f} dB, "
                       f"weight {r['weight_sqnr_db']:.1f} dB)" for r in worst)
    return [_suggestion(f"leave {', '.join(names)} in float", f"{detail}, against {median:.1f} dB for the median site "
                        f"(at least {SITE_MARGIN_DB:.0f} dB worse: 4x the error power); costs int8 speed and size on "
                        f"{len(names)} of {len(report['sites'])} quantized linears", {"passes": entries}, new)]
