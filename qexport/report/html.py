"""One self-contained HTML page for a validation report: inline CSS, PNG plots as base64 data URIs, no scripts
and no external resources, written atomically (a temporary file in the same folder, then a rename)."""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Any

from qexport.report.texts import texts_line

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; } td, th { padding: 2px 8px; border-bottom: 1px solid #eee; }
th { text-align: left; background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.bad td { background: #fde2e1; } tr.warn td { background: #fff3cd; }
pre { background: #f6f8fa; padding: 0.6em; overflow-x: auto; } img { max-width: 100%; }
.note { color: #555; font-size: 0.9em; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def render_html(report: dict[str, Any], plots: dict[str, bytes]) -> str:
    """The page as a string."""
    ev = report["evaluation"]
    parts = [f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>qexport report: {_e(report['model'])}"
             f"</title><style>{_CSS}</style></head><body>",
             f"<h1>qexport report: {_e(report['model'])}</h1>",
             f"<p>recipe <b>{_e(report['recipe'])}</b>, {len(report['sites'])} quantized linears, {report['tokens']} tokens "
             f"of {_e(report['text_source'])} ({report['windows']} windows of {report['seq_len']}).</p>"]
    if "texts" in report:
        parts.append(f"<p>{_e(texts_line(report['texts']))}.</p>")
    if "ppl_ratio" in ev:
        parts.append("<h2>End to end, against PyTorch FP32</h2><table>" + "".join(
            f"<tr><th>{_e(k)}</th><td class='num'>{_e(v)}</td></tr>" for k, v in (
                ("perplexity", f"{ev['ppl']:.4f}"), ("PyTorch FP32 perplexity", f"{ev['ppl_reference']:.4f}"),
                ("ratio", f"{ev['ppl_ratio']:.4f}"), ("logit cosine (mean / min)",
                                                      f"{ev['logit_cosine']:.5f} / {ev['logit_cosine_min']:.4f}"),
                ("greedy tokens matching", f"{ev['greedy_match']} / {ev['greedy_tokens']}"))) + "</table>")
    if "suggestions" in report:
        parts.append("<h2>Suggested recipe changes</h2>")
        if not report["suggestions"]:
            parts.append("<p>None: no site stands out from the others by the report's thresholds.</p>")
        for s in report["suggestions"]:
            parts.append(f"<h3>{_e(s['title'])}</h3><p>{_e(s['reason'])}</p><pre>{_e(s['yaml'])}</pre>")
    parts.append(_roles_section(report))
    for name, title in (("site_error.png", "Error per layer"), ("channel_profiles.png", "Channel magnitude profiles of the "
                        "worst sites' inputs"), ("difficulty.png", "Quantization difficulty before/after each transform")):
        if name in plots:
            data = base64.b64encode(plots[name]).decode("ascii")
            parts.append(f"<h2>{_e(title)}</h2><img alt='{_e(title)}' src='data:image/png;base64,{data}'>")
    parts.append(_sites_section(report))
    if report.get("difficulty"):
        parts.append(_difficulty_section(report["difficulty"]))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _sites_section(report: dict[str, Any]) -> str:
    rows = report["sites"]
    median = sorted(r["local_sqnr_db"] for r in rows)[len(rows) // 2]
    out = ["<h2>Per-site error, worst first</h2><p class='note'>local: the quantized linear against the same linear with "
           "float weight and activation on its own input (the error it adds). output: against the FP32 graph with the "
           "recipe's lossless transforms, on the same tokens (the error accumulated up to this output). SQNR = 10 log10 "
           "(signal power / error power). Rows 6 dB or more below the median local SQNR are red, 3 dB yellow.</p>",
           "<table><tr><th>site</th><th>activations</th><th>local SQNR dB</th><th>local cos</th><th>output SQNR dB</th>"
           "<th>output cos</th><th>act SQNR dB</th><th>weight SQNR dB</th><th>clipped</th></tr>"]
    for r in rows:
        cls = "bad" if r["local_sqnr_db"] <= median - 6 else "warn" if r["local_sqnr_db"] <= median - 3 else ""
        clipped = f"{100 * r['clipped_fraction']:.3f}%" if r["clipped_fraction"] is not None else "-"
        out.append(f"<tr class='{cls}'><td>{_e(r['site'])}</td><td>{_e(r['act_quant'])}</td>"
                   f"<td class='num'>{r['local_sqnr_db']:.2f}</td><td class='num'>{r['local_cosine']:.5f}</td>"
                   f"<td class='num'>{r['output_sqnr_db']:.2f}</td><td class='num'>{r['output_cosine']:.5f}</td>"
                   f"<td class='num'>{r['activation_sqnr_db']:.2f}</td><td class='num'>{r['weight_sqnr_db']:.2f}</td>"
                   f"<td class='num'>{clipped}</td></tr>")
    return "".join(out) + "</table>"


def _roles_section(report: dict[str, Any]) -> str:
    out = ["<h2>By role</h2><table><tr><th>role</th><th>sites</th><th>median local SQNR dB</th><th>worst local</th>"
           "<th>worst output</th></tr>"]
    for role, v in report["roles"].items():
        out.append(f"<tr><td>{_e(role)}</td><td class='num'>{v['sites']}</td><td class='num'>{v['median_local_sqnr_db']:.2f}"
                   f"</td><td class='num'>{v['min_local_sqnr_db']:.2f}</td><td class='num'>{v['min_output_sqnr_db']:.2f}</td></tr>")
    return "".join(out) + "</table>"


def _difficulty_section(stages: list[dict[str, Any]]) -> str:
    first, last = stages[0], stages[-1]
    out = [f"<h2>Difficulty per site: {_e(first['stage'])} → {_e(last['stage'])}</h2><table><tr><th>site</th>"
           "<th>outlier ratio</th><th>after</th><th>dx</th><th>after</th><th>norm product</th><th>after</th></tr>"]
    for name, row in first["sites"].items():
        after = last["sites"].get(name)
        cells = "".join(f"<td class='num'>{row[m]:.4g}</td><td class='num'>{_num(after[m] if after else None, '.4g')}</td>"
                        for m in ("outlier_ratio", "dx", "norm_product"))
        out.append(f"<tr><td>{_e(name)}</td>{cells}</tr>")
    return "".join(out) + "</table>"


def write_html(page: str, path: str | os.PathLike) -> Path:
    """Write ``page`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path

