"""Recipes: YAML files naming an ordered list of graph passes and their settings.

A recipe file maps one-to-one onto :class:`Recipe` and :class:`PassEntry`; each entry's settings map onto the
fields of its pass class (a frozen dataclass), with enums given by value::

    name: rotate
    description: QuaRot-style rotations
    passes:
      - pass: untie-embeddings
      - pass: rotate-residual
        rotation: random_hadamard
        seed: 0

Two optional top-level keys apply to the whole recipe: ``calibration`` (:class:`CalibrationSettings`: the window
length and count to calibrate with, e.g. the deployment sequence length, SLAC) and ``check`` (``tensorrt``: the
final graph must pass :func:`qexport.runtimes.tensorrt.check.require_compatible`, or the export fails)::

    calibration:
      seq_len: 2048
      windows: 4
    check: tensorrt

A third, ``kv_cache`` (:class:`KvCache`: ``float``, the default, or ``int8``), is shorthand for the ``quantize-kv`` pass
with its default settings, placed where it must run: after the quantization passes, before the first ORT lowering
(``ort-*``). It is expanded when the recipe is read, so :attr:`Recipe.passes` holds that entry and :meth:`Recipe.to_dict`
writes it; write the pass entry yourself for other settings (``granularity: per_head``, ``margin``)::

    kv_cache: int8

A pass class may refuse its place in a recipe (its ``recipe_conflict`` classmethod: the pass names, its index and
the checks -> a reason or None); the reason is raised when the recipe is read.

An unknown key, value or type raises :class:`RecipeError` naming the key and what is allowed; so does a value that
the pass's own checks reject (its ``__post_init__``, run at load time with the run-time fields empty). The pass names and
the conversion of YAML values to pass fields are in :mod:`qexport.recipes.registry`; pass modules are imported only
when a recipe uses them. Fields whose type cannot be written in YAML (calibration
statistics) are supplied at run time through :meth:`Recipe.build`.

Presets live in ``samples/recipes/*.yaml`` (the one source of truth). An installed wheel ships that same
folder as the package ``qexport.recipes.presets`` (a ``package-dir`` mapping in pyproject), which is looked up first.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.resources
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import yaml

from qexport.errors import RecipeError
# PASSES, pass_class and settable_fields are also imported from here (qexport.recipes.schema.PASSES is the registry itself)
from qexport.recipes.registry import PASSES, check_settings, convert_setting, pass_class, settable_fields

log = logging.getLogger(__name__)

_RECIPE_KEYS = ("name", "description", "calibration", "check", "kv_cache", "passes")
KV_PASS = "quantize-kv"


@dataclasses.dataclass(frozen=True)
class PassEntry:
    """One step of a recipe: a registered pass name and its settings (converted to the field types)."""

    name: str
    settings: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, data: Any, where: str) -> "PassEntry":
        if not isinstance(data, Mapping) or "pass" not in data:
            raise RecipeError(f"{where}: each pass entry must be a mapping with a 'pass' key, got {data!r}")
        name = data["pass"]
        if not isinstance(name, str):
            raise RecipeError(f"{where}.pass: expected a pass name, got {name!r}; registered: {', '.join(sorted(PASSES))}")
        klass = pass_class(name)
        fields = settable_fields(klass)
        settings = []
        for key, value in data.items():
            if key == "pass":
                continue
            if key not in fields:
                allowed = ", ".join(sorted(fields)) or "none"
                raise RecipeError(f"{where}: unknown setting {key!r} for pass {name!r}; allowed settings: {allowed}")
            settings.append((key, convert_setting(f"{where}.{key}", value, fields[key])))
        try:
            check_settings(klass, dict(settings))
        except RecipeError as exc:
            raise RecipeError(f"{where}: {exc}") from None
        return cls(name, tuple(settings))

    def build(self, **runtime: Any) -> Any:
        """An instance of the pass with these settings plus ``runtime`` fields (e.g. calibration statistics)."""
        klass = pass_class(self.name)
        clash = set(runtime) & {k for k, _ in self.settings}
        if clash:
            raise RecipeError(f"pass {self.name!r}: {sorted(clash)} are set both in the recipe and at run time")
        try:
            return klass(**dict(self.settings), **runtime)
        except TypeError as exc:
            raise RecipeError(f"pass {self.name!r} cannot be built: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pass": self.name}
        for key, value in self.settings:
            if isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, tuple):
                value = [v.value if isinstance(v, enum.Enum) else v for v in value]
            out[key] = value
        return out


class RecipeCheck(str, enum.Enum):
    TENSORRT = "tensorrt"  # qexport.runtimes.tensorrt.check.require_compatible on the final graph


@dataclasses.dataclass(frozen=True)
class CalibrationSettings:
    """Recipe-level calibration text and shape (SLAC: calibrate at the deployment sequence length).

    ``None`` leaves the caller's default; an explicit caller setting (CLI flag, API argument) overrides these.
    ``text`` is what ``--calib`` takes: a built-in domain or a mix of them (``pydoc+manpages``), a file or a dataset.
    """

    seq_len: int | None = None  # tokens per calibration window
    windows: int | None = None  # number of calibration windows
    text: str | None = None  # calibration text, as --calib takes it

    @classmethod
    def parse(cls, data: Any, where: str) -> "CalibrationSettings":
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if not isinstance(data, Mapping):
            raise RecipeError(f"{where}: expected a mapping with keys {', '.join(fields)}, got {data!r}")
        values = {}
        for key, value in data.items():
            if key not in fields:
                raise RecipeError(f"{where}: unknown key {key!r}; allowed keys: {', '.join(fields)}")
            if key == "text":
                if value is not None and (not isinstance(value, str) or not value.strip()):
                    raise RecipeError(f"{where}.text: {value!r} is not allowed; expected a text source such as "
                                      "pydoc, pydoc+manpages or a file path")
            elif value is not None and (type(value) is not int or value < 1):
                raise RecipeError(f"{where}.{key}: {value!r} is not allowed; expected a positive integer")
            values[key] = value
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


class KvCache(str, enum.Enum):
    FLOAT = "float"  # the exported cache, in the model's dtype
    INT8 = "int8"  # the quantize-kv pass: an INT8 cache with static scales


def _with_kv_cache(passes: tuple[PassEntry, ...], kv_cache: KvCache, where: str) -> tuple[PassEntry, ...]:
    """``passes`` with ``quantize-kv`` (default settings) before the first ORT lowering, for ``kv_cache: int8``."""
    has_pass = any(e.name == KV_PASS for e in passes)
    if kv_cache is KvCache.FLOAT:
        if has_pass:
            raise RecipeError(f"{where}: kv_cache is float, but the passes include {KV_PASS}; keep one of them")
        return passes
    if has_pass:
        raise RecipeError(f"{where}: kv_cache: int8 adds {KV_PASS}, which the passes already include; keep one of them")
    at = next((i for i, e in enumerate(passes) if e.name.startswith("ort-")), len(passes))
    return passes[:at] + (PassEntry.parse({"pass": KV_PASS}, where),) + passes[at:]


def _check_places(passes: tuple[PassEntry, ...], checks: tuple[RecipeCheck, ...], source: str) -> None:
    """Each pass's ``recipe_conflict`` (where it has one) on the whole list; the first reason is raised."""
    names = [e.name for e in passes]
    for index, entry in enumerate(passes):
        rule = getattr(pass_class(entry.name), "recipe_conflict", None)
        reason = rule(names, index, [c.value for c in checks]) if rule is not None else None
        if reason:
            raise RecipeError(f"{source}.passes[{index}] ({entry.name}): {reason}")


def _parse_checks(data: Any, where: str) -> tuple[RecipeCheck, ...]:
    items = data if isinstance(data, list) else [data]
    return tuple(convert_setting(where, item, RecipeCheck) for item in items)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A named, ordered list of passes, with optional recipe-level calibration settings and output checks."""

    name: str
    passes: tuple[PassEntry, ...]
    description: str = ""
    calibration: CalibrationSettings = CalibrationSettings()
    checks: tuple[RecipeCheck, ...] = ()

    @classmethod
    def from_dict(cls, data: Any, source: str = "recipe") -> "Recipe":
        if not isinstance(data, Mapping):
            raise RecipeError(f"{source}: a recipe must be a mapping with keys {', '.join(_RECIPE_KEYS)}")
        unknown = [k for k in data if k not in _RECIPE_KEYS]
        if unknown:
            raise RecipeError(f"{source}: unknown key {unknown[0]!r}; allowed keys: {', '.join(_RECIPE_KEYS)}")
        name = convert_setting(f"{source}.name", data.get("name"), str)
        description = convert_setting(f"{source}.description", data.get("description", ""), str)
        entries = data.get("passes")
        if not isinstance(entries, list) or not entries:
            raise RecipeError(f"{source}.passes: expected a non-empty list of pass entries")
        calibration = CalibrationSettings.parse(data.get("calibration", {}), f"{source}.calibration")
        checks = _parse_checks(data["check"], f"{source}.check") if "check" in data else ()
        passes = tuple(PassEntry.parse(e, f"{source}.passes[{i}]") for i, e in enumerate(entries))
        if "kv_cache" in data:  # unstated: the passes say
            passes = _with_kv_cache(passes, convert_setting(f"{source}.kv_cache", data["kv_cache"], KvCache),
                                    f"{source}.kv_cache")
        _check_places(passes, checks, source)
        return cls(name, passes, description, calibration, checks)

    @property
    def kv_cache(self) -> KvCache:
        return KvCache.INT8 if any(e.name == KV_PASS for e in self.passes) else KvCache.FLOAT

    def with_kv_cache(self, kv_cache: KvCache | str) -> "Recipe":
        """This recipe with the KV cache asked for (``--kv-cache``): ``int8`` adds ``quantize-kv`` unless it is
        there; ``float`` refuses a recipe that quantizes the cache."""
        kv_cache = convert_setting("kv_cache", kv_cache.value if isinstance(kv_cache, KvCache) else kv_cache, KvCache)
        if kv_cache is self.kv_cache:
            return self
        passes = _with_kv_cache(self.passes, kv_cache, f"recipe {self.name!r}")
        _check_places(passes, self.checks, f"recipe {self.name!r}")
        return dataclasses.replace(self, passes=passes)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        if self.calibration.to_dict():
            out["calibration"] = self.calibration.to_dict()
        if self.checks:
            out["check"] = [c.value for c in self.checks]
        out["passes"] = [e.to_dict() for e in self.passes]
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def build(self, runtime: Mapping[str, Mapping[str, Any]] | None = None) -> list[Any]:
        """The pass instances, in order; ``runtime[pass_name]`` adds run-time fields to every entry of that pass."""
        runtime = runtime or {}
        unknown = set(runtime) - {e.name for e in self.passes}
        if unknown:
            raise RecipeError(f"run-time settings for passes not in recipe {self.name!r}: {sorted(unknown)}")
        return [e.build(**runtime.get(e.name, {})) for e in self.passes]


def presets_folder() -> Path:
    """The folder of preset recipes: the installed ``qexport.recipes.presets`` package, else the repo's samples/recipes."""
    try:
        packaged = Path(str(importlib.resources.files("qexport.recipes.presets")))
        if packaged.is_dir() and any(packaged.glob("*.yaml")):
            return packaged
    except ModuleNotFoundError:
        pass  # not installed as package data: an editable checkout reads samples/recipes directly
    return Path(__file__).resolve().parents[2] / "samples" / "recipes"


def preset_names() -> list[str]:
    return sorted(p.stem for p in presets_folder().glob("*.yaml"))


def load_recipe(path_or_name: str | os.PathLike) -> Recipe:
    """Load a recipe from a YAML file path, or a preset by name (e.g. ``rotate``)."""
    path = Path(path_or_name)
    if not path.is_file():
        if path.suffix or os.sep in str(path_or_name):
            raise RecipeError(f"recipe file {path} does not exist; presets: {', '.join(preset_names())}")
        path = presets_folder() / f"{path_or_name}.yaml"
        if not path.is_file():
            raise RecipeError(f"no recipe file or preset named {str(path_or_name)!r}; presets: {', '.join(preset_names())}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path} is not valid YAML: {exc}") from exc
    log.debug("loaded recipe %s", path)
    return Recipe.from_dict(data, source=path.name)
