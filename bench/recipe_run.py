"""Apply a recipe to an FP32 export folder as `qexport export --recipe` does, for the bench scripts beside this one."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from qexport.artifact.folder import MODEL_FILE


def apply_to_export(fp32: Path, out: Path, recipe, windows: list) -> float:
    """``recipe`` applied to the FP32 export and saved beside a copy of its other files; returns seconds.

    The passes run as the export runs them, less the per-pass difficulty measurement (a report metric, not part
    of quantizing), so the time is loading, calibration and passes."""
    import onnx_ir as ir

    from qexport.api import save_model
    from qexport.recipes.pipeline import PipelineSettings, apply_recipe

    shutil.copytree(fp32, out, ignore=shutil.ignore_patterns(MODEL_FILE))
    start = time.perf_counter()
    model = ir.load(fp32 / MODEL_FILE)
    apply_recipe(model, recipe, windows, PipelineSettings(measure_difficulty=False))
    save_model(model, out)
    return time.perf_counter() - start
