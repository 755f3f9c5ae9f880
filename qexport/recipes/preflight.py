"""Check a recipe against the exported graph before any calibration, so a pass that cannot apply fails in seconds.

The lossless passes that need no calibration (untie, fold-norm, the rotations, layernorm-to-rms, ...) are run in
order on a copy of the graph; the calibrated lossless passes (smooth, aqas, affine) only rescale weights, so the
structure the later passes match is the same without them, and they are skipped here. The check stops at the
first quantization pass: what follows reads the quantized graph, which calibration produces.
"""

from __future__ import annotations

import gc
import logging
import time

import onnx_ir as ir

from qexport.errors import QexportError, RecipeError
from qexport.passes._ir import trial_copy
from qexport.recipes.registry import is_lossless, runtime_fields
from qexport.recipes.schema import Recipe, pass_class

log = logging.getLogger(__name__)


def check_recipe_applies(model: ir.Model, recipe: Recipe) -> None:
    """Raise :class:`RecipeError` naming the pass, the reason and what to do if ``recipe`` cannot apply to
    ``model``; ``model`` itself is not changed."""
    start = time.perf_counter()
    trial: ir.Model | None = None
    for index, entry in enumerate(recipe.passes, start=1):
        klass = pass_class(entry.name)
        if not is_lossless(klass):
            break
        if runtime_fields(klass):
            continue
        if trial is None:
            trial = trial_copy(model)  # the weights shared read-only: nothing copied
        try:
            entry.build()(trial)
        except QexportError as exc:
            raise RecipeError(
                f"recipe {recipe.name!r} cannot apply to this model: pass {index} ({entry.name}) fails on its graph "
                f"before any calibration: {exc}. Use a recipe without {entry.name} for this model (copy the preset "
                f"from samples/recipes/ and remove the pass, or choose another preset with --recipe)"
            ) from None
    del trial
    gc.collect()  # an IR graph is full of reference cycles: without this its weights outlive the check for a while
    log.info("recipe %s: its structural passes apply to this graph (checked in %.1f s)", recipe.name,
             time.perf_counter() - start)
