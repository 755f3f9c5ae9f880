"""The validation report of a quantized export: where accuracy is lost, and what to change in the recipe.

It gathers, on evaluation text (never the calibration half):
- per-site error of each quantized linear (:mod:`qexport.report.sites`) against the FP32 export with the
  recipe's lossless passes applied (:mod:`qexport.report.reference`), worst first;
- the quantization-difficulty metric of each stage of the recipe, from the manifest;
- perplexity, logits and greedy agreement against PyTorch FP32 (:func:`qexport.evaluation.perplexity.evaluate`);
- optionally, recipe changes proposed from these figures (:mod:`qexport.report.suggest`).
Plots and the HTML page are in :mod:`qexport.report.plots` and :mod:`qexport.report.html`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import numpy as np
import onnx_ir as ir

from qexport.artifact.folder import Artifact
from qexport.errors import QexportError
from qexport.report.texts import text_agreement, texts_line

log = logging.getLogger(__name__)

ROLE_ORDER = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down", "lm_head")


@dataclasses.dataclass(frozen=True)
class ReportSettings:
    """What `qexport report` measures. Sites and perplexity use the same evaluation windows."""

    windows: int = 2
    seq_len: int = 256
    greedy_tokens: int = 16
    profiles: int = 4  # channel-magnitude profiles for this many worst sites
    threads: int | None = None
    reference: str | None = None  # an FP32 export of the same source (skips exporting it again)
    suggest: bool = False

    def __post_init__(self) -> None:
        if self.windows < 1 or self.seq_len < 2 or self.greedy_tokens < 0 or self.profiles < 0:
            raise QexportError(f"report needs --windows >= 1, --seq-len >= 2 and --greedy-tokens >= 0 (got {self.windows}, "
                               f"{self.seq_len}, {self.greedy_tokens}) and profiles >= 0 (got {self.profiles})")


def build_report(folder: str | os.PathLike, text: str | None = None, dataset: str | None = None,
                 settings: ReportSettings = ReportSettings()) -> dict[str, Any]:
    """Measure the report of the quantized export in ``folder``; returns a JSON-ready dict."""
    from qexport.evaluation.perplexity import EvalSettings, evaluate
    from qexport.report.reference import pair_linears, reference_model
    from qexport.report.sites import site_errors
    from qexport.exporter.text import load_text, text_source, token_windows

    start = time.perf_counter()
    artifact = Artifact.open(folder)
    source = text_source(text, dataset)
    reference = reference_model(artifact, settings.reference, settings.threads)  # errors early if not quantized
    quantized = ir.load(artifact.model_path)
    linears = pair_linears(quantized, reference, settings.threads)
    windows = token_windows(artifact.tokenizer(), load_text(source, "evaluation"), settings.seq_len, settings.windows,
                            source.describe())
    rows = site_errors(quantized, reference, linears, windows, settings.threads)
    del reference, quantized
    evaluation = evaluate(folder, text=text, dataset=dataset, settings=EvalSettings(
        windows=settings.windows, seq_len=settings.seq_len, greedy_tokens=settings.greedy_tokens,
        prompt_tokens=min(32, settings.seq_len), threads=settings.threads))
    recipe_report = artifact.manifest["recipe"]
    report = {
        "model": str(folder),
        "recipe": recipe_report["name"],
        "text_source": f"{source.describe()} (evaluation half)" if source.kind == "pydoc" else source.describe(),
        "windows": len(windows),
        "seq_len": settings.seq_len,
        "tokens": int(sum(len(w) for w in windows)),
        "sites": [{k: v for k, v in row.items() if k != "channel_absmax"} for row in rows],
        "profiles": {row["site"]: {"channel_absmax": row["channel_absmax"], "clip": row["clip"]}
                     for row in rows[: settings.profiles]},
        "roles": role_summary(rows),
        "difficulty": recipe_report.get("difficulty") or [],
        "evaluation": evaluation,
        "texts": text_agreement(artifact.manifest.get("calibration") or {}, source, rows),
    }
    if settings.suggest:
        from qexport.report.suggest import suggest

        report["suggestions"] = suggest(report, recipe_report["recipe"])
    report["seconds"] = round(time.perf_counter() - start, 2)
    return report


def role_of(site: str) -> str:
    """``layers.3.mlp.down`` -> ``mlp.down``; ``lm_head`` -> ``lm_head``."""
    parts = site.split(".")
    return ".".join(parts[2:]) if parts[0] == "layers" and len(parts) > 2 else site


def layer_of(site: str) -> int | None:
    parts = site.split(".")
    return int(parts[1]) if parts[0] == "layers" and len(parts) > 1 and parts[1].isdigit() else None


def role_summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per role (mlp.down, attn.q, ...): median and worst local SQNR, worst output SQNR, site count."""
    roles: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        roles.setdefault(role_of(row["site"]), []).append(row)
    order = sorted(roles, key=lambda r: ROLE_ORDER.index(r) if r in ROLE_ORDER else len(ROLE_ORDER))
    return {role: {"sites": len(roles[role]),
                   "median_local_sqnr_db": float(np.median([r["local_sqnr_db"] for r in roles[role]])),
                   "min_local_sqnr_db": float(min(r["local_sqnr_db"] for r in roles[role])),
                   "min_output_sqnr_db": float(min(r["output_sqnr_db"] for r in roles[role]))} for role in order}


def format_text(report: dict[str, Any], worst: int = 12) -> str:
    """The plain-text summary: evaluation, worst sites first, roles, difficulty, suggestions."""
    from qexport.analysis.difficulty import summary_table

    ev = report["evaluation"]
    lines = [f"qexport report: {report['model']} (recipe {report['recipe']}, {len(report['sites'])} quantized linears, "
             f"{report['tokens']} tokens of {report['text_source']})"]
    if "ppl_ratio" in ev:
        lines.append(f"perplexity {ev['ppl']:.4f} vs PyTorch FP32 {ev['ppl_reference']:.4f} (ratio {ev['ppl_ratio']:.4f}); "
                     f"logit cosine {ev['logit_cosine']:.5f} (min {ev['logit_cosine_min']:.4f}); greedy tokens matching "
                     f"PyTorch: {ev['greedy_match']}/{ev['greedy_tokens']}")
    if "texts" in report:
        lines.append(texts_line(report["texts"]))
    lines += ["", f"worst sites (of {len(report['sites'])}): local = the error this linear adds (float weight and activation "
              "on its own input); output = the error accumulated up to its output, against the FP32 graph", _site_table(
                  report["sites"][:worst]), "", "by role", _role_table(report["roles"])]
    if report["difficulty"]:
        lines += ["", "quantization difficulty before/after each lossless stage (mean over sites of each kind)",
                  summary_table(report["difficulty"])]
    for s in report.get("suggestions", []):
        lines += ["", f"suggestion: {s['title']}", f"  why: {s['reason']}", *("  " + y for y in s["yaml"].splitlines())]
    return "\n".join(lines)


def _site_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'site':<22}{'act':>11}{'local SQNR':>12}{'local cos':>11}{'output SQNR':>13}{'output cos':>12}"
            f"{'act SQNR':>10}{'wt SQNR':>9}{'clipped':>9}")
    lines = [head]
    for r in rows:
        clipped = f"{100 * r['clipped_fraction']:.3f}%" if r["clipped_fraction"] is not None else "-"
        lines.append(f"{r['site']:<22}{r['act_quant']:>11}{r['local_sqnr_db']:>10.2f}dB{r['local_cosine']:>11.5f}"
                     f"{r['output_sqnr_db']:>11.2f}dB{r['output_cosine']:>12.5f}{r['activation_sqnr_db']:>8.2f}dB"
                     f"{r['weight_sqnr_db']:>7.2f}dB{clipped:>9}")
    return "\n".join(lines)


def _role_table(roles: dict[str, dict[str, float]]) -> str:
    lines = [f"{'role':<12}{'sites':>6}{'median local SQNR':>19}{'worst local':>13}{'worst output':>14}"]
    for role, v in roles.items():
        lines.append(f"{role:<12}{v['sites']:>6}{v['median_local_sqnr_db']:>17.2f}dB{v['min_local_sqnr_db']:>11.2f}dB"
                     f"{v['min_output_sqnr_db']:>12.2f}dB")
    return "\n".join(lines)
