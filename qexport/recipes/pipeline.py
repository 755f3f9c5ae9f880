"""Run a recipe's passes on an exported graph: calibrate where a pass needs it, check equivalence, measure."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from qexport.calibration.stats import collect_stats
from qexport.errors import QexportError
from qexport.passes.discovery import sites as site_matching
from qexport.passes.discovery.linear_select import linear_names
from qexport.passes.metadata import Meta
from qexport.recipes.registry import runtime_fields
from qexport.recipes.schema import Recipe, RecipeCheck, pass_class
from qexport.analysis.difficulty import site_difficulties
from qexport.analysis.site_stats import quantized_site_stats

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PipelineSettings:
    """How a recipe runs: equivalence tolerance of lossless passes, and whether to measure difficulty."""

    max_abs_logit_diff: float = 1e-2  # lossless passes: FP32 logits must stay this close to the export's
    verify_tokens: int = 128
    measure_difficulty: bool = True
    difficulty_windows: int = 1  # windows used for the per-stage difficulty metric (passes get all windows)
    threads: int | None = None


def _run_logits(model: ir.Model, ids: np.ndarray, threads: int | None) -> np.ndarray:
    """Logits of ``model`` on one window, with an empty KV cache."""
    from qexport.calibration.stats import prefill_feeds, session_with_outputs

    session = session_with_outputs(model, [], threads)
    inputs = {i.name: i for i in session.get_inputs()}
    return session.run(["logits"], prefill_feeds(ids, inputs, model))[0]


def _copy(model: ir.Model) -> ir.Model:
    return ir.from_proto(ir.to_proto(model))


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
    an error, not a warning. Passes with a ``reference`` field (bias correction) get a copy of the graph as it
    was before the first lossy pass. The report lists, per quantized linear (by role name), its activation and
    weight scales (``sites``), and the result of the recipe's ``check`` (TensorRT compatibility; an error fails).
    """
    if not windows:
        raise QexportError("the recipe needs calibration text, but no calibration windows were given")
    verify_ids = windows[0][: settings.verify_tokens]
    steps: list[dict[str, Any]] = []
    difficulty: list[dict[str, Any]] = []  # one entry per stage: before the recipe, after each modifying pass
    stats, logits = None, None  # of the graph as it is now: statistics on all windows, logits on verify_ids
    expected: np.ndarray | None = None  # logits of the untransformed graph
    pending = "export" if settings.measure_difficulty else None  # a stage whose difficulty is not measured yet
    verify: dict[str, Any] | None = None
    wants_reference = any("reference" in runtime_fields(pass_class(e.name)) for e in recipe.passes)
    reference: ir.Model | None = None
    names: dict[ir.Node, str] = {}  # role names of the linears, taken on the float graph before quantization
    quantized: dict[str, dict[str, Any]] = {}
    for index, entry in enumerate(tqdm(recipe.passes, desc=f"recipe {recipe.name}", disable=None)):
        klass = pass_class(entry.name)
        needs, lossless = runtime_fields(klass), getattr(klass, "lossless", True)
        if pending is not None:  # one run: the stage's difficulty, its logits, and the statistics this pass needs
            observed = _observe(model, windows if "stats" in needs else windows[: settings.difficulty_windows],
                                verify_ids, settings)
            difficulty.append({"stage": pending, "sites": observed["difficulty"]})
            logits, pending = observed["logits"], None
            stats = observed["stats"] if "stats" in needs else None
        if expected is None:
            expected = logits if logits is not None else _run_logits(model, verify_ids, settings.threads)
        if verify is None and not lossless:  # the lossless prefix ends here
            got = logits if logits is not None else _run_logits(model, verify_ids, settings.threads)
            verify = _verify(expected, got, len(verify_ids), recipe.name, settings)
            names = linear_names(model)
            reference = _copy(model) if wants_reference else None
        runtime: dict[str, Any] = {}
        if "stats" in needs:
            stats = stats if stats is not None else collect_stats(model, windows, threads=settings.threads)
            runtime["stats"] = stats
        if "windows" in needs:
            runtime["windows"] = tuple(windows)
        if "reference" in needs:
            runtime["reference"] = reference
        start = time.perf_counter()
        result = entry.build(**runtime)(model)
        seconds = time.perf_counter() - start
        steps.append({"pass": entry.name, "settings": entry.to_dict(), "modified": bool(result.modified),
                      "lossless": bool(lossless), "seconds": round(seconds, 3)})
        log.info("pass %s: %s in %.2f s", entry.name, "modified" if result.modified else "no change", seconds)
        if names and result.modified:
            quantized.update(quantized_site_stats(model, names))
        if result.modified:
            stats, logits = None, None  # the graph changed: they no longer describe it
            if settings.measure_difficulty and verify is None:  # lossless stages only: quantized linears are no sites
                pending = f"{index}:{entry.name}"
    if pending is not None:
        observed = _observe(model, windows[: settings.difficulty_windows], verify_ids, settings)
        difficulty.append({"stage": pending, "sites": observed["difficulty"]})
        logits = observed["logits"]
    if verify is None:
        got = logits if logits is not None else _run_logits(model, verify_ids, settings.threads)
        verify = _verify(expected, got, len(verify_ids), recipe.name, settings)
    report = {"name": recipe.name, "recipe": recipe.to_dict(), "steps": steps, "verify": verify, "difficulty": difficulty,
              "sites": quantized, "checks": _run_checks(model, recipe)}
    alphas = {k: float(v) for k, v in Meta.AQAS_ALPHA.under(model.metadata_props).items()}
    if alphas:
        report["aqas_alphas"] = alphas  # the smoothing exponent AQAS chose per site
    return report


def _observe(model: ir.Model, windows: list[np.ndarray], verify_ids: np.ndarray, settings: PipelineSettings) -> dict[str, Any]:
    """One session on the graph as it is: statistics on ``windows``, the difficulty metric on the first
    ``difficulty_windows`` of them (the same sample at every stage), and the logits on ``verify_ids``."""
    site_map = site_matching.find_sites(model)
    stats = collect_stats(model, windows, site_map=site_map, threads=settings.threads,
                          head_windows=settings.difficulty_windows, probe=verify_ids)
    return {"stats": stats, "difficulty": site_difficulties(site_map, stats.head), "logits": stats.probe_logits}


def _run_checks(model: ir.Model, recipe: Recipe) -> dict[str, Any]:
    """The recipe's output checks; a violation raises (the export then writes nothing)."""
    results: dict[str, Any] = {}
    for check in recipe.checks:
        if check is RecipeCheck.TENSORRT:
            from qexport.runtimes.tensorrt.check import require_compatible

            warnings = require_compatible(model)
            results[check.value] = {"passed": True, "warnings": [f"{w.rule.value} at {w.node}" for w in warnings]}
    return results


def _verify(expected: np.ndarray, got: np.ndarray, tokens: int, name: str, settings: PipelineSettings) -> dict[str, Any]:
    """Compare the graph's FP32 logits with the untransformed export's; an error past the tolerance."""
    diff = float(np.abs(got - expected).max())
    log.info("recipe %s: max |logit difference| of the lossless passes vs the untransformed export %.3g", name, diff)
    if not diff <= settings.max_abs_logit_diff:
        raise QexportError(
            f"recipe {name!r} changed the model's outputs (max |logit difference| {diff:.3g} > "
            f"{settings.max_abs_logit_diff}); its lossless passes should not, so this is a bug: please report it"
        )
    return {"tokens": int(tokens), "max_abs_logit_diff": diff, "tolerance": settings.max_abs_logit_diff}
