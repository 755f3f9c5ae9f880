"""Presets are intents: fit a preset recipe to the exported graph, and say what changed and why.

A preset names what the user wants (W8A8 per-token for ONNX Runtime, W8A8 static for TensorRT, W4A8); its
passes are written for the Llama-style graph. :func:`adapt_recipe` reads the exported graph (never the family
name) and returns the recipe that runs the equivalent transforms on it, with one :class:`Adaptation` per change:

1. LayerNormalization on the residual stream (OPT): R1 (``rotate-residual``) needs RMSNorm, so
   ``layernorm-to-rms`` (exact: mean-centred embeddings, positions and writers) is inserted after ``fold-norm``,
   as the ``rotate-opt`` preset has it;
2. norms between a residual branch and its add (Gemma3's post-norms): their gamma cannot be folded into a
   linear, but R1 stays exact with ``post_norm: online`` (each post-norm's gamma carries the rotation as a small
   online Hadamard transform before the add), so R1 runs with that setting, as on the other families; R2
   (``rotate-heads``) and R4 (``online-hadamard``) do not touch the residual stream and run as written.
   An R1 whose rotation has no Hadamard structure (``orthogonal``) would cost a dense hidden x hidden MatMul per
   post-norm instead: it is removed, and when the recipe quantizes activations and nothing smooths the norm sites
   yet, SmoothQuant at the norm sites (alpha 0.5, as the ``smoothquant`` preset) is inserted in its place.

Only presets loaded by name adapt (:func:`is_preset_name`); a recipe file runs exactly as written, and the
preflight check names the pass that cannot apply. A graph whose residual stream is not recognised is left to
that check too.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import onnx_ir as ir

from qexport.errors import PatternNotFoundError
from qexport.passes.discovery import sites as site_matching
from qexport.passes.discovery.linear_select import linear_names
from qexport.passes.discovery.names import NameFilter
from qexport.recipes.schema import PassEntry, Recipe, pass_class, preset_names

log = logging.getLogger(__name__)

R1 = "rotate-residual"
_SMOOTHERS = ("smooth", "aqas", "affine")  # passes that scale the norm sites' channels
_NORM_SMOOTHING = {"pass": "smooth", "method": "smoothquant", "alpha": 0.5}  # the smoothquant preset's setting


class Action(str, enum.Enum):
    INSERTED = "inserted"
    REMOVED = "removed"
    CHANGED = "changed"  # kept, with a setting changed (named in the reason)


@dataclasses.dataclass(frozen=True)
class Adaptation:
    """One change to a preset: ``pass_name`` was inserted or removed, for the graph feature found at ``sites``."""

    pass_name: str
    action: Action
    sites: tuple[str, ...]
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"pass": self.pass_name, "action": self.action.value, "sites": list(self.sites), "reason": self.reason}

    def describe(self) -> str:
        return describe(self.to_json())


def describe(change: Mapping[str, Any]) -> str:
    """One line for an adaptation's JSON form (the manifest's ``recipe_adaptations``): what changed, where, why."""
    sites = list(change["sites"])
    shown = ", ".join(sites[:2] + (["...", sites[-1]] if len(sites) > 3 else sites[2:]))
    return f"{change['action']} {change['pass']} at {len(sites)} sites ({shown}): {change['reason']}"


@dataclasses.dataclass(frozen=True)
class StreamNeeds:
    """What the residual stream needs before R1: its LayerNorm sites and its post-norms (named after their
    branch); ``norm_sites`` names every norm that feeds only linears."""

    layer_norms: tuple[str, ...]
    post_norms: tuple[str, ...]
    norm_sites: tuple[str, ...]


def is_preset_name(path_or_name: str | os.PathLike) -> bool:
    """Whether ``load_recipe(path_or_name)`` reads a preset by name (a file of that name takes precedence there)."""
    return not Path(path_or_name).is_file() and str(path_or_name) in preset_names()


def stream_needs(model: ir.Model) -> StreamNeeds | None:
    """The residual stream's LayerNorms and post-norms; ``None`` when the stream is not recognised."""
    try:
        stream = site_matching.find_residual_stream(model)
    except PatternNotFoundError as exc:
        log.debug("no residual stream to adapt a preset to: %s", exc)
        return None
    site_names = {site.norm.output: site.name for site in site_matching.find_norm_sites(model.graph)}
    layer_norms = tuple(site_names.get(norm.output, norm.nodes[-1].name) for norm in stream.norms
                        if norm.kind is site_matching.NormKind.LAYER_NORM)
    roles = linear_names(model)
    post_norms = tuple(f"{roles[b.writer.node].rsplit('.', 1)[0]}.post_norm" if b.writer.node in roles
                       else b.post_norm.nodes[-1].name for b in stream.blocks if b.post_norm is not None)
    return StreamNeeds(layer_norms, post_norms, tuple(site_names.values()))


def adapt_recipe(recipe: Recipe, model: ir.Model) -> tuple[Recipe, tuple[Adaptation, ...]]:
    """The preset ``recipe`` fitted to ``model``'s graph, and the changes made (none: ``recipe`` itself)."""
    if not any(e.name == R1 for e in recipe.passes) or (needs := stream_needs(model)) is None:
        return recipe, ()
    if needs.post_norms:
        r1s = [e for e in recipe.passes if e.name == R1]
        if all(_settings(e)["post_norm"].value == "online" for e in r1s):
            return recipe, ()
        if any(_settings(e)["rotation"].value == "orthogonal" for e in r1s):
            passes, changes = _without_r1(list(recipe.passes), needs)
        else:
            passes, changes = _with_online_post_norms(list(recipe.passes), needs)
    elif needs.layer_norms and not _converted_before_r1(recipe.passes):
        passes, changes = _with_layernorm_to_rms(list(recipe.passes), needs.layer_norms)
    else:
        return recipe, ()
    for change in changes:
        log.info("recipe %s: %s", recipe.name, change.describe())
    return dataclasses.replace(recipe, passes=tuple(passes)), tuple(changes)


def _converted_before_r1(passes: tuple[PassEntry, ...]) -> bool:
    names = [e.name for e in passes]
    return "layernorm-to-rms" in names[:names.index(R1)]


def _with_layernorm_to_rms(passes: list[PassEntry], sites: tuple[str, ...]) -> tuple[list[PassEntry], list[Adaptation]]:
    """Insert ``layernorm-to-rms`` after the last ``fold-norm`` before R1 (it needs gamma folded), else before R1."""
    r1 = next(i for i, e in enumerate(passes) if e.name == R1)
    folds = [i for i, e in enumerate(passes[:r1]) if e.name == "fold-norm"]
    passes.insert(folds[-1] + 1 if folds else r1, PassEntry.parse({"pass": "layernorm-to-rms"}, "adaptation"))
    reason = ("the residual stream is normalised by LayerNormalization, and R1 (rotate-residual) commutes only "
              "with RMSNorm; layernorm-to-rms converts it exactly (mean-centred embeddings, positions and "
              "residual writers), as in the rotate-opt preset")
    return passes, [Adaptation("layernorm-to-rms", Action.INSERTED, sites, reason)]


def _with_online_post_norms(passes: list[PassEntry], needs: StreamNeeds) -> tuple[list[PassEntry], list[Adaptation]]:
    """R1 with ``post_norm: online``, its other settings as written."""
    passes = [PassEntry.parse({**e.to_dict(), "post_norm": "online"}, "adaptation") if e.name == R1 else e
              for e in passes]
    return passes, [Adaptation(R1, Action.CHANGED, needs.post_norms, (
        "post_norm: online. Norms sit between each residual branch and its add (post-norms), and their gamma "
        "cannot be folded into a linear; RMS commutes with the rotation, so each post-norm's gamma carries it "
        "instead, as an online Hadamard transform before the residual add (exact; its run-time cost is in "
        "docs/measurements.md)"))]


def _without_r1(passes: list[PassEntry], needs: StreamNeeds) -> tuple[list[PassEntry], list[Adaptation]]:
    """Remove R1 (its rotation cannot be applied online); put SmoothQuant at the norm sites in its place when
    activations are quantized and unsmoothed."""
    first = next(i for i, e in enumerate(passes) if e.name == R1)
    passes = [e for e in passes if e.name != R1]
    changes = [Adaptation(R1, Action.REMOVED, needs.post_norms, (
        "norms sit between each residual branch and its add (post-norms); their gamma cannot be folded, and an "
        "orthogonal rotation has no Hadamard structure to apply online cheaply. R2 (rotate-heads) and R4 "
        "(online-hadamard) do not touch the residual stream and still run"))]
    globs = ("layers.*_norm",) + (("final_norm",) if _quantizes_lm_head(passes) else ())
    if _quantizes_activations(passes) and not _smooths_any(passes, needs.norm_sites):
        passes.insert(first, PassEntry.parse({**_NORM_SMOOTHING, "sites": list(globs)}, "adaptation"))
        sites = tuple(name for name in needs.norm_sites if NameFilter(globs).matches(name))
        changes.append(Adaptation("smooth", Action.INSERTED, sites, (
            "in place of R1, which spreads the norm sites' activation outliers over all channels: SmoothQuant "
            "(alpha 0.5) moves them into the weights that read those norms, exactly; it is safe here because no "
            "residual rotation follows")))
    return passes, changes


def _settings(entry: PassEntry) -> dict[str, Any]:
    """The entry's settings over its pass's defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(pass_class(entry.name))
                if f.default is not dataclasses.MISSING}
    return {**defaults, **dict(entry.settings)}


def _quantizes_activations(passes: list[PassEntry]) -> bool:
    return any(_settings(e)["activations"].value != "none" for e in passes if e.name == "quantize")


def _quantizes_lm_head(passes: list[PassEntry]) -> bool:
    return any(_settings(e).get("include_lm_head", False) for e in passes if e.name in ("quantize", "quantize-gptq"))


def _smooths_any(passes: list[PassEntry], sites: tuple[str, ...]) -> bool:
    """Whether some smoothing pass already selects one of ``sites``."""
    filters = [NameFilter(tuple(_settings(e)["sites"])) for e in passes if e.name in _SMOOTHERS]
    return any(f.matches(site) for f in filters for site in sites)
