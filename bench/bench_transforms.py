"""Benchmark the lossless graph transforms on one model: equivalence, perplexity, run time, difficulty.

Exports the model once, then applies each recipe to a fresh copy of the graph, calibrated on the
calibration half of the default text, and evaluates on the evaluation half. Prints one table.
    python bench/bench_transforms.py [MODEL] [--recipes fold-norm,smoothquant,...] [--calib-windows 8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

import qexport
from qexport import numerics
from qexport.artifact.folder import Artifact
from qexport.evaluation.perplexity import token_nll
from qexport.recipes.pipeline import PipelineSettings, apply_recipe
from qexport.recipes.schema import Recipe, load_recipe
from qexport.runtimes.causal_lm import CausalLM
from qexport.runtimes.ort import OrtRunner
from qexport.analysis.difficulty import summary_table
from qexport.exporter.text import TextSource, load_text, token_windows
from table import markdown_table  # bench/table.py, beside this script

VARIANTS = {  # smoothing methods that have no preset of their own
    "aweq": {"name": "aweq", "passes": [{"pass": "smooth", "method": "aweq", "sites": ["layers.*"]}]},
    "atq": {"name": "atq", "passes": [{"pass": "smooth", "method": "atq", "percentile": 90.0, "sites": ["layers.*"]}]},
}
DEFAULT = "fold-norm,smoothquant,aweq,atq,rotate,smooth-rotate,smooth-affine"


def _recipe(name: str) -> Recipe:
    return Recipe.from_dict(VARIANTS[name], source=name) if name in VARIANTS else load_recipe(name)


def _eval(path: Path, signature, windows) -> tuple[float, list[np.ndarray]]:
    lm = CausalLM(OrtRunner(path, threads=2), signature)
    logits = [lm.forward(w[None])[0][0] for w in windows]
    nll = np.concatenate([token_nll(l, w) for l, w in zip(logits, windows)])
    return float(np.exp(nll.mean())), logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--recipes", default=DEFAULT)
    parser.add_argument("--calib-windows", type=int, default=8)
    parser.add_argument("--eval-windows", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        base = Artifact.open(qexport.export(args.model, Path(tmp) / "fp32"))
        tokenizer = base.tokenizer()
        calib = token_windows(tokenizer, load_text(TextSource(), "calibration"), args.seq_len, args.calib_windows)
        evals = token_windows(tokenizer, load_text(TextSource(), "evaluation"), args.seq_len, args.eval_windows)
        base_ppl, base_logits = _eval(base.model_path, base.signature, evals)
        rows, difficulty = [], {}
        for name in args.recipes.split(","):
            model = ir.load(base.model_path)
            start = time.perf_counter()
            report = apply_recipe(model, _recipe(name), calib, PipelineSettings(threads=2))
            seconds = time.perf_counter() - start
            path = Path(tmp) / f"{name}.onnx"
            ir.save(model, path)
            ppl, logits = _eval(path, base.signature, evals)
            diff = max(numerics.max_abs_diff(a, b) for a, b in zip(logits, base_logits))
            pass_s = sum(step["seconds"] for step in report["steps"])
            rows.append({"recipe": name, "max_abs_logit_diff": diff, "ppl": ppl, "ppl_ratio": ppl / base_ppl,
                         "pass_seconds": pass_s, "total_seconds": seconds})
            difficulty[name] = report["difficulty"]
            path.unlink()
    if args.json:
        print(json.dumps({"base_ppl": base_ppl, "rows": rows, "difficulty": difficulty}, indent=2))
        return
    print(f"untransformed FP32 export: ppl {base_ppl:.4f} on {len(evals)} x {args.seq_len} evaluation tokens; "
          f"recipes calibrated on {len(calib)} x {args.seq_len} tokens of the other half\n")
    print(_table(rows))
    for name, stages in difficulty.items():
        print(f"\ndifficulty, {name}:\n{summary_table(stages)}")


def _table(rows: list[dict]) -> str:
    header = ["recipe", "max abs logit diff vs export", "ppl", "ppl ratio vs export", "passes (s)",
              "with calibration and checks (s)"]
    return markdown_table(header, [[r["recipe"], f"{r['max_abs_logit_diff']:.2e}", f"{r['ppl']:.4f}",
                                    f"{r['ppl_ratio']:.6f}", f"{r['pass_seconds']:.1f}", f"{r['total_seconds']:.1f}"]
                                   for r in rows])


if __name__ == "__main__":
    main()
