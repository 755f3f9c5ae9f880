"""Run a recipe's passes on an exported graph: calibrate where a pass needs it, check equivalence, measure."""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from typing import Any

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from qexport import numerics
from qexport.calibration.calibrator import Calibrator
from qexport.calibration.stats import CalibrationStats, collect_stats
from qexport.errors import QexportError
from qexport.passes._ir import copy_model
from qexport.passes.discovery import sites as site_matching
from qexport.passes.discovery.linear_select import linear_names
from qexport.passes.metadata import Meta
from qexport.recipes.registry import RuntimeInput, is_lossless, runtime_inputs
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


class _Graph:
    """The graph under the recipe and what has been measured on it since it last changed (statistics on the
    calibration windows, logits on the verification tokens): each is computed at most once per graph state."""

    def __init__(self, model: ir.Model, windows: list[np.ndarray], settings: PipelineSettings) -> None:
        self.model, self.windows, self.settings = model, windows, settings
        self.verify_ids = windows[0][: settings.verify_tokens]
        self.stats: CalibrationStats | None = None
        self._logits: np.ndarray | None = None

    def changed(self) -> None:
        self.stats, self._logits = None, None

    def logits(self) -> np.ndarray:
        if self._logits is None:
            self._logits = _run_logits(self.model, self.verify_ids, self.settings.threads)
        return self._logits

    def observe(self, full_stats: bool) -> dict[str, dict[str, float]]:
        """One session: statistics (on all windows if ``full_stats``, else the difficulty sample), the per-site
        difficulty metric on the first ``difficulty_windows`` windows, and the logits. Returns the metric."""
        windows = self.windows if full_stats else self.windows[: self.settings.difficulty_windows]
        observed = _observe(self.model, windows, self.verify_ids, self.settings)
        self.stats = observed["stats"] if full_stats else None
        self._logits = observed["logits"]
        return observed["difficulty"]

    def calibration_stats(self) -> CalibrationStats:
        if self.stats is None:
            self.stats = collect_stats(self.model, self.windows, threads=self.settings.threads)
        return self.stats


class _Difficulty:
    """Observer: the difficulty metric at the export and after each lossless pass that changed the graph."""

    def __init__(self, enabled: bool) -> None:
        self.stages: list[dict[str, Any]] = []
        self.pending = "export" if enabled else None  # a stage not measured yet
        self.enabled = enabled

    def measure(self, graph: _Graph, full_stats: bool) -> None:
        if self.pending is not None:
            self.stages.append({"stage": self.pending, "sites": graph.observe(full_stats)})
            self.pending = None

    def changed(self, stage: str) -> None:
        if self.enabled:
            self.pending = stage


class _Equivalence:
    """Observer: the lossless prefix ends with the graph's FP32 logits compared with the untransformed export's."""

    def __init__(self, recipe: str, settings: PipelineSettings) -> None:
        self.recipe, self.settings = recipe, settings
        self.expected: np.ndarray | None = None
        self.result: dict[str, Any] | None = None

    def start(self, graph: _Graph) -> None:
        if self.expected is None:
            self.expected = graph.logits()

    def check(self, graph: _Graph) -> None:
        self.result = _verify(self.expected, graph.logits(), len(graph.verify_ids), self.recipe, self.settings)


class _SiteStats:
    """Observer: per quantized linear (by the role names of the float graph), its activation and weight scales."""

    def __init__(self) -> None:
        self.names: dict[ir.Node, str] = {}
        self.sites: dict[str, dict[str, Any]] = {}

    def start(self, model: ir.Model) -> None:
        self.names = linear_names(model)

    def changed(self, model: ir.Model) -> None:
        if self.names:
            self.sites.update(quantized_site_stats(model, self.names))


def apply_recipe(
    model: ir.Model,
    recipe: Recipe,
    windows: list[np.ndarray],
    settings: PipelineSettings = PipelineSettings(),
) -> dict[str, Any]:
    """Apply ``recipe`` to ``model`` in place; returns the report stored in the manifest.

    The passes run in two segments: the lossless prefix (ending before the first pass whose class says
    ``lossless = False``), then quantization and lowering. Observers watch each step: the difficulty metric
    after each lossless change, the equivalence check at the end of the prefix (FP32 logits against the
    untransformed graph's; past the tolerance it is an error), and the scales of each quantized linear.
    Passes get their run-time inputs by the types of their fields (:func:`runtime_inputs`): calibration
    statistics of the graph as it is when they run, one :class:`Calibrator` on ``windows`` (which runs the graph
    as it is when a pass asks), and the ``reference`` graph (a copy of the graph at the end of the prefix).
    """
    if not windows:
        raise QexportError("the recipe needs calibration text, but no calibration windows were given")
    graph = _Graph(model, windows, settings)
    difficulty = _Difficulty(settings.measure_difficulty)
    equivalence = _Equivalence(recipe.name, settings)
    sites = _SiteStats()
    calibrator = Calibrator(tuple(windows), settings.threads)
    wants_reference = any(RuntimeInput.REFERENCE in runtime_inputs(pass_class(e.name)).values() for e in recipe.passes)
    reference: ir.Model | None = None
    steps: list[dict[str, Any]] = []
    for index, entry in enumerate(tqdm(recipe.passes, desc=f"recipe {recipe.name}", disable=None)):
        klass = pass_class(entry.name)
        needs, lossless = runtime_inputs(klass), is_lossless(klass)
        difficulty.measure(graph, full_stats=RuntimeInput.STATS in needs.values())
        equivalence.start(graph)
        if equivalence.result is None and not lossless:  # the lossless prefix ends here
            equivalence.check(graph)
            sites.start(model)
            reference = copy_model(model) if wants_reference else None
        inputs = {RuntimeInput.STATS: graph.calibration_stats, RuntimeInput.CALIBRATOR: lambda: calibrator,
                  RuntimeInput.REFERENCE: lambda: reference}
        start = time.perf_counter()
        result = entry.build(**{name: inputs[kind]() for name, kind in needs.items()})(model)
        seconds = time.perf_counter() - start
        steps.append({"pass": entry.name, "settings": entry.to_dict(), "modified": bool(result.modified),
                      "lossless": bool(lossless), "seconds": round(seconds, 3)})
        log.info("pass %s: %s in %.2f s", entry.name, "modified" if result.modified else "no change", seconds)
        if result.modified:
            gc.collect()  # the weights the pass replaced sit in reference cycles of the IR: free them now
            graph.changed()
            sites.changed(model)
            if equivalence.result is None:  # lossless stages only: quantized linears are no sites
                difficulty.changed(f"{index}:{entry.name}")
    difficulty.measure(graph, full_stats=False)
    if equivalence.result is None:
        equivalence.check(graph)
    report = {"name": recipe.name, "recipe": recipe.to_dict(), "steps": steps, "verify": equivalence.result,
              "difficulty": difficulty.stages, "sites": sites.sites, "checks": _run_checks(model, recipe)}
    alphas = {k: float(v) for k, v in Meta.AQAS_ALPHA.under(model.metadata_props).items()}
    if alphas:
        report["aqas_alphas"] = alphas  # the smoothing exponent AQAS chose per site
    precision = Meta.PRECISION.under(model.metadata_props)
    if precision:  # quantize-gptq's w4_fraction: each linear's weight bits, and the 4-bit error that chose them
        report["weight_precision"] = {role: {"bits": int(bits), "relative_error_4bit": float(err)}
                                      for role, (bits, _, err) in ((r, v.partition(":")) for r, v in precision.items())}
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
    diff = numerics.max_abs_diff(got, expected)
    log.info("recipe %s: max |logit difference| of the lossless passes vs the untransformed export %.3g", name, diff)
    if not diff <= settings.max_abs_logit_diff:
        raise QexportError(
            f"recipe {name!r} changed the model's outputs (max |logit difference| {diff:.3g} > "
            f"{settings.max_abs_logit_diff}); its lossless passes should not, so this is a bug: please report it"
        )
    return {"tokens": int(tokens), "max_abs_logit_diff": diff, "tolerance": settings.max_abs_logit_diff}
