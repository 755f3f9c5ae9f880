"""Helpers for the preset tests: a preset exported end to end on the tiny model, its logits against FP32, and a
preset applied to the SmolLM2 FP32 export and evaluated (the slow tests)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import onnx_ir as ir

import qexport
from qexport import numerics
from pass_testing import load, make_feeds, run
from qexport.passes.metadata import Meta
from qexport.recipes import schema as rc

Runner = Callable[[ir.Model, dict[str, np.ndarray]], dict[str, np.ndarray]]


def sqnr_db(got: np.ndarray, expected: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of ``got`` against ``expected``, in dB (computed in float64)."""
    return numerics.sqnr_db(expected, got)


def export_tiny_preset(source: Path, out: Path, preset: str) -> tuple[list[dict], ir.Model]:
    """Export the tiny model at ``source`` with ``preset`` through `qexport.export` (2 x 64 calibration tokens) and
    check the recipe report: the steps are the preset's passes in order, every lossy step changed the graph, and
    the lossless prefix stayed exact. Returns the report's steps and the quantized model."""
    out = qexport.export(str(source), out, recipe=preset, calib_windows=2, calib_seq_len=64)
    manifest = json.loads((out / "qexport.json").read_text())
    steps = manifest["recipe"]["steps"]
    assert [s["pass"] for s in steps] == [e.name for e in rc.load_recipe(preset).passes]
    assert all(s["modified"] for s in steps if not s["lossless"])  # (fold-norm has nothing to fold: gamma = 1)
    assert manifest["recipe"]["verify"]["max_abs_logit_diff"] < 1e-3  # the lossless prefix stayed exact
    return steps, ir.load(out / "model.onnx")


def linears_merged_away(model: ir.Model) -> int:
    """How many linears merged nodes (``ort-merge-linears``) hold beyond one each: add it to a count of kernels to
    count linears."""
    return sum(len(n.metadata_props[Meta.MERGED_LINEARS].split(",")) - 1 for n in model.graph
               if Meta.MERGED_LINEARS in n.metadata_props)


def logits_sqnr_db(model: ir.Model, fp32_folder: Path, runner: Runner = run) -> float:
    """SQNR in dB of ``model``'s logits against the FP32 export's, on the same random feeds from an empty cache
    (rotations change the KV cache basis, so random past key/values would not mean the same to both)."""
    feeds = make_feeds(model, past=0)
    return sqnr_db(runner(model, feeds)["logits"], runner(load(fp32_folder), feeds)["logits"])


def quantize_smollm2(fp32_folder: Path, preset: str) -> ir.Model:
    """The FP32 SmolLM2 export with ``preset`` applied, calibrated on 16 x 512 tokens of the preset's calibration text
    (its ``calibration.text``, else the default), as ``qexport export --recipe`` would."""
    from qexport.artifact.folder import Artifact
    from qexport.recipes.pipeline import PipelineSettings, apply_recipe
    from qexport.exporter.text import load_text, parse_source, token_windows

    recipe = rc.load_recipe(preset)
    tokenizer = Artifact.open(fp32_folder).tokenizer()
    windows = token_windows(tokenizer, load_text(parse_source(recipe.calibration.text), "calibration"), 512, 16)
    model = ir.load(fp32_folder / "model.onnx")
    apply_recipe(model, recipe, windows, PipelineSettings(measure_difficulty=False))
    return model


def evaluate_quantized(fp32_folder: Path, model: ir.Model, out: Path, windows: int = 4, text: str | None = None) -> dict:
    """Save ``model`` beside a copy of the FP32 export's other files in ``out`` and evaluate it on ``windows`` x 512
    tokens of the evaluation text (``text``, a built-in domain, else the default; never the calibration text);
    returns `qexport.evaluation.perplexity.evaluate`'s result."""
    from qexport.evaluation.perplexity import EvalSettings, evaluate

    shutil.copytree(fp32_folder, out, ignore=shutil.ignore_patterns("model.onnx"))
    ir.save(model, out / "model.onnx")
    return evaluate(out, text=text, settings=EvalSettings(windows=windows, seq_len=512, greedy_tokens=8))
