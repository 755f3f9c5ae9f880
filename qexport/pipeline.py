"""Run a recipe's passes on an exported graph: calibrate where a pass needs it, check equivalence, measure."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from qexport.calibration import collect_stats
from qexport.errors import QexportError
from qexport.passes import sites as site_matching
from qexport.recipe import Recipe, pass_class
from qexport.site_difficulty import site_difficulties

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PipelineSettings:
    """How a recipe runs: equivalence tolerance of lossless passes, and whether to measure difficulty."""

    max_abs_logit_diff: float = 1e-2  # lossless passes: FP32 logits must stay this close to the export's
    verify_tokens: int = 128
    measure_difficulty: bool = True
    difficulty_windows: int = 2  # windows used for the per-stage difficulty metric (passes get all windows)
    threads: int | None = None


def _run_logits(model: ir.Model, ids: np.ndarray, threads: int | None) -> np.ndarray:
    """Logits of ``model`` on one window, with an empty KV cache."""
    from qexport.calibration import prefill_feeds, session_with_outputs

    session = session_with_outputs(model, [], threads)
    inputs = {i.name: i for i in session.get_inputs()}
    return session.run(["logits"], prefill_feeds(ids, inputs, model))[0]


def _stats_fields(klass: type) -> set[str]:
    return {f.name for f in dataclasses.fields(klass)} & {"stats", "windows"}


def apply_recipe(
    model: ir.Model,
    recipe: Recipe,
    windows: list[np.ndarray],
    settings: PipelineSettings = PipelineSettings(),
) -> dict[str, Any]:
    """Apply ``recipe`` to ``model`` in place; returns the report stored in the manifest.

    Passes that take calibration statistics get them collected on the graph as it is when they run.
    Passes are lossless unless their class says ``lossless = False`` (quantization). Once the lossless
    passes have run (before the first lossy one, or at the end), the graph's FP32 logits are compared with
    the untransformed graph's on ``verify_tokens`` calibration tokens; a difference over the tolerance is
    an error, not a warning.
    """
    if not windows:
        raise QexportError("the recipe needs calibration text, but no calibration windows were given")
    verify_ids = windows[0][: settings.verify_tokens]
    expected = _run_logits(model, verify_ids, settings.threads)
    steps: list[dict[str, Any]] = []
    stats = None  # statistics of the graph as it is now, on all windows, collected when a pass needs them
    difficulty: list[dict[str, Any]] = []  # one entry per stage: before the recipe, after each modifying pass
    if settings.measure_difficulty:
        difficulty.append({"stage": "export", "sites": _difficulty(model, windows, settings)})
    verify: dict[str, Any] | None = None
    for index, entry in enumerate(tqdm(recipe.passes, desc=f"recipe {recipe.name}", disable=None)):
        klass = pass_class(entry.name)
        if verify is None and not getattr(klass, "lossless", True):
            verify = _verify(model, expected, verify_ids, recipe.name, settings)  # lossless prefix ends here
        runtime: dict[str, Any] = {}
        needs = _stats_fields(klass)
        if "stats" in needs:
            stats = stats if stats is not None else collect_stats(model, windows, threads=settings.threads)
            runtime["stats"] = stats
        if "windows" in needs:
            runtime["windows"] = tuple(windows)
        start = time.perf_counter()
        result = entry.build(**runtime)(model)
        seconds = time.perf_counter() - start
        steps.append({"pass": entry.name, "settings": entry.to_dict(), "modified": bool(result.modified),
                      "lossless": bool(getattr(klass, "lossless", True)), "seconds": round(seconds, 3)})
        log.info("pass %s: %s in %.2f s", entry.name, "modified" if result.modified else "no change", seconds)
        if result.modified:
            stats = None  # the graph changed: statistics no longer describe it
            if settings.measure_difficulty and verify is None:  # lossless stages only: quantized linears are no sites
                difficulty.append({"stage": f"{index}:{entry.name}", "sites": _difficulty(model, windows, settings)})
    if verify is None:
        verify = _verify(model, expected, verify_ids, recipe.name, settings)
    return {"name": recipe.name, "recipe": recipe.to_dict(), "steps": steps, "verify": verify, "difficulty": difficulty}


def _difficulty(model: ir.Model, windows: list[np.ndarray], settings: PipelineSettings) -> dict[str, Any]:
    site_map = site_matching.find_sites(model)
    stats = collect_stats(model, windows[: settings.difficulty_windows], site_map=site_map, threads=settings.threads)
    return site_difficulties(site_map, stats)


def _verify(model: ir.Model, expected: np.ndarray, ids: np.ndarray, name: str, settings: PipelineSettings) -> dict[str, Any]:
    """Compare the graph's FP32 logits with the untransformed export's; an error past the tolerance."""
    got = _run_logits(model, ids, settings.threads)
    diff = float(np.abs(got - expected).max())
    log.info("recipe %s: max |logit difference| of the lossless passes vs the untransformed export %.3g", name, diff)
    if not diff <= settings.max_abs_logit_diff:
        raise QexportError(
            f"recipe {name!r} changed the model's outputs (max |logit difference| {diff:.3g} > "
            f"{settings.max_abs_logit_diff}); its lossless passes should not, so this is a bug: please report it"
        )
    return {"tokens": int(len(ids)), "max_abs_logit_diff": diff, "tolerance": settings.max_abs_logit_diff}
