"""W4A8 across text domains: perplexity ratios of preset variants on several evaluation domains, one run.

Every variant is a preset (``w4a8`` by default) with one or two settings changed (``VARIANTS`` below), applied to
one FP32 export of the model and calibrated on ``--calib`` text (default: the default calibration text). Each is evaluated
on the evaluation halves of ``--eval-text`` domains (never calibration text); the PyTorch FP32 reference is run
once per domain and its token losses reused, so a row costs its calibration plus one ONNX Runtime pass per domain.
Columns: quantization seconds (load, calibration, passes), and the ppl ratio to PyTorch FP32 on each domain.
Usage:
    python bench/bench_w4a8_domains.py [MODEL] [--variants preset,g32,...] [--calib pydoc]
        [--eval-text pydoc,manpages,gitnotes] [--windows 40] [--work DIR] [--json]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

import qexport
from qexport.artifact.folder import MODEL_FILE, Artifact
from qexport.evaluation.perplexity import token_nll
from qexport.exporter.text import load_text, parse_source, text_source, token_windows
from recipe_run import apply_to_export  # bench/recipe_run.py, beside this script
from table import markdown_table  # bench/table.py, beside this script

log = logging.getLogger("bench_w4a8_domains")
Edit = Callable[[list[dict[str, Any]]], None]


def _set(pass_name: str, **settings: Any) -> Edit:
    def edit(passes: list[dict[str, Any]]) -> None:
        entries = [p for p in passes if p["pass"] == pass_name]
        if not entries:
            raise SystemExit(f"the preset has no {pass_name} pass to change")
        for entry in entries:
            entry.update(settings)
    return edit


def _replace(pass_name: str, entry: dict[str, Any]) -> Edit:
    def edit(passes: list[dict[str, Any]]) -> None:
        index = next(i for i, p in enumerate(passes) if p["pass"] == pass_name)
        passes[index] = dict(entry)
    return edit


def _insert_before(pass_name: str, entry: dict[str, Any]) -> Edit:
    def edit(passes: list[dict[str, Any]]) -> None:
        index = next(i for i, p in enumerate(passes) if p["pass"] == pass_name)
        passes.insert(index, dict(entry))
    return edit


VARIANTS: dict[str, list[Edit]] = {
    "preset": [],
    "g32": [_set("quantize-gptq", group_size=32)],
    "dint4": [_set("quantize-gptq", weights="dint4")],
    "lm_head-int8": [_set("quantize", include_lm_head=True)],
    "w4f0.9": [_set("quantize-gptq", w4_fraction=0.9)],
    "w4f0.75": [_set("quantize-gptq", w4_fraction=0.75)],
    "g32-w4f0.9": [_set("quantize-gptq", group_size=32, w4_fraction=0.9)],
    "damp0.1": [_set("quantize-gptq", damp=0.1)],
    "no-mse-clip": [_set("quantize-gptq", weight_clip="none")],
    "aqas-after-rotations": [_insert_before("quantize-gptq", {"pass": "aqas", "sites": ["layers.*.up_down"],
                                                              "activations": "per_tensor"})],
    "affine-w4a8": [_insert_before("quantize-gptq", {"pass": "affine", "sites": ["layers.*.v_o"],
                                                     "weight_bits": 4, "act_bits": 8})],
}


def _recipe(preset: str, variant: str):
    from qexport.recipes.schema import Recipe, load_recipe

    data = copy.deepcopy(load_recipe(preset).to_dict())
    for edit in VARIANTS[variant]:
        edit(data["passes"])
    data["name"] = f"{preset}/{variant}"
    return Recipe.from_dict(data, f"variant {variant}")


def _quantize(fp32: Path, out: Path, recipe, windows: list) -> float:
    return apply_to_export(fp32, out, recipe, windows)


def _nll(lm, windows: list) -> np.ndarray:
    return np.concatenate([token_nll(lm.forward(ids[None])[0][0], ids) for ids in windows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--preset", default="w4a8")
    parser.add_argument("--variants", default="preset", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--calib", default=None,
                        help="calibration text (default: the preset's calibration.text, else the default calibration text)")
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--eval-text", default="pydoc,manpages,gitnotes", help="evaluation domains or files")
    parser.add_argument("--windows", type=int, default=40, help="evaluation windows per domain")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default=None, help="keep the FP32 export and references here between runs")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    if unknown := [v for v in variants if v not in VARIANTS]:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    recipes = {v: _recipe(args.preset, v) for v in variants}  # bad edits fail before the slow steps

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="w4a8-domains-"))
    fp32 = work / "fp32"
    if not (fp32 / MODEL_FILE).exists():
        qexport.export(args.model, fp32)
    artifact = Artifact.open(fp32)
    tokenizer = artifact.tokenizer()
    domains = [d for d in args.eval_text.split(",") if d]
    eval_windows = {d: token_windows(tokenizer, load_text(text_source(d), "evaluation"), args.seq_len, args.windows, d)
                    for d in domains}
    reference = None
    ref_nll: dict[str, np.ndarray] = {}
    for d in domains:
        cached = work / f"reference-{d}-{args.windows}x{args.seq_len}.npy"
        per_window = args.seq_len - 1
        longer = sorted(work.glob(f"reference-{d}-*x{args.seq_len}.npy"), key=lambda f: -int(f.stem.split("-")[-1].split("x")[0]))
        if longer and int(longer[0].stem.split("-")[-1].split("x")[0]) >= len(eval_windows[d]):
            ref_nll[d] = np.load(longer[0])[: len(eval_windows[d]) * per_window]  # the same first windows
            continue
        reference = reference or artifact.reference(threads=args.threads)
        log.info("PyTorch reference on %s", d)
        ref_nll[d] = _nll(reference, eval_windows[d])
        np.save(cached, ref_nll[d])
    calib_source = parse_source(args.calib if args.calib is not None else next(iter(recipes.values())).calibration.text)
    calib = token_windows(tokenizer, load_text(calib_source, "calibration"), args.seq_len, args.calib_windows,
                          calib_source.describe())

    rows: dict[str, dict[str, Any]] = {}
    for variant, recipe in recipes.items():
        out = work / f"{args.preset}-{variant}"
        shutil.rmtree(out, ignore_errors=True)
        log.info("quantizing %s", variant)
        seconds = _quantize(fp32, out, recipe, calib)
        lm = Artifact.open(out).causal_lm(threads=args.threads)
        row: dict[str, Any] = {"quant_seconds": seconds}
        for d in domains:
            nll = _nll(lm, eval_windows[d])
            np.save(work / f"nll-{variant}-{calib_source.describe().replace(':', '_')}-{d}-{len(eval_windows[d])}.npy", nll)
            row[d] = float(np.exp(nll.mean() - ref_nll[d].mean()))
            log.info("%s on %s: ppl ratio %.4f", variant, d, row[d])
        rows[variant] = row
        shutil.rmtree(out, ignore_errors=True)
    if args.json:
        json.dump({"calibration": calib_source.describe(), "rows": rows}, sys.stdout, indent=2)
        return
    print(f"{args.preset} variants calibrated on {calib_source.describe()} ({len(calib)} x {args.seq_len} tokens), "
          f"evaluated on {args.windows} x {args.seq_len} tokens per domain (ppl ratio to PyTorch FP32)\n")
    header = ["variant", "quant s", *domains]
    body = [[v, f"{r['quant_seconds']:.0f}", *(f"{r[d]:.4f}" for d in domains)] for v, r in rows.items()]
    print(markdown_table(header, body))


if __name__ == "__main__":
    main()
