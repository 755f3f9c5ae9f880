"""The registry of graph passes a recipe can name, and how YAML values map onto their settings.

:data:`PASSES` maps each pass name to ``"module:Class"``; the module is imported only when a recipe uses the pass.
A pass's settings are the fields of its frozen dataclass whose type can be written in YAML (scalars, enums by
value, Literals, lists and mappings of those): :func:`settable_fields` lists them and :func:`convert_setting`
turns a YAML value into the field's type, or raises :class:`RecipeError` naming the key and what is allowed.
A list of strings (the globs of ``sites``, ``linears``, ``exclude``) is written as a YAML list; a string there
is an error showing the list form, never split at commas. The fields whose type is a run-time input
(:class:`RuntimeInput`: calibration statistics, the :class:`~qexport.calibration.calibrator.Calibrator`, the float
reference graph) are provided by the pipeline, found by their type (:func:`runtime_inputs`), never by a recipe.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import enum
import functools
import importlib
import types
import typing
from typing import Any, Mapping

from qexport.errors import RecipeError
from qexport.passes.discovery.names import list_form_error

# pass name -> "module:Class"; modules are imported on first use
PASSES: dict[str, str] = {
    "untie-embeddings": "qexport.passes.transforms.untie_embeddings:UntieEmbeddingsPass",
    "fold-norm": "qexport.passes.transforms.fold_norm:FoldNormPass",
    "layernorm-to-rms": "qexport.passes.transforms.layernorm_to_rms:LayerNormToRmsPass",
    "smooth": "qexport.passes.transforms.smooth:SmoothPass",
    "rotate-residual": "qexport.passes.transforms.rotate_residual:RotateResidualPass",
    "rotate-heads": "qexport.passes.transforms.rotate_heads:RotateHeadsPass",
    "online-hadamard": "qexport.passes.transforms.online_hadamard:OnlineHadamardPass",
    "affine": "qexport.passes.transforms.affine:AffinePass",
    "quantize": "qexport.passes.quantize.insert_qdq:QuantizePass",
    "ort-int8": "qexport.passes.ort.int8:LowerOrtPass",
    "ort-attention": "qexport.passes.ort.attention:OrtAttentionPass",
    "ort-gqa": "qexport.passes.ort.group_query_attention:OrtGqaPass",
    "ort-merge-linears": "qexport.passes.ort.merge_linears:MergeInt8LinearsPass",
    "ort-rms-norm": "qexport.passes.ort.rms_norm:OrtRmsNormPass",
    "ort-skip-norm": "qexport.passes.ort.skip_norm:OrtSkipNormPass",
    "ort-rotary": "qexport.passes.ort.rotary:OrtRotaryPass",
    "ort-attention-chunks": "qexport.passes.ort.attention_chunks:OrtAttentionChunksPass",
    "ort-int4": "qexport.passes.ort.int4:LowerInt4OrtPass",
    "ort-nbits": "qexport.passes.ort.nbits:LowerNBitsOrtPass",
    "quantize-gptq": "qexport.passes.quantize.gptq:GptqPass",
    "bias-correct": "qexport.passes.quantize.bias_correction:BiasCorrectPass",
    "quantize-kv": "qexport.passes.quantize.kv_cache:QuantizeKvPass",
    "aqas": "qexport.passes.transforms.aqas:AqasPass",
}
_SCALARS = (bool, int, float, str)


class RuntimeInput(str, enum.Enum):
    """What the pipeline provides at run time (never a recipe), to the pass fields of its type."""

    STATS = "stats"  # CalibrationStats of the graph as it is when the pass runs
    CALIBRATOR = "calibrator"  # the Calibrator: the calibration windows and how to run them
    REFERENCE = "reference"  # ir.Model: a copy of the graph at the end of the lossless prefix


@functools.cache
def _runtime_types() -> dict[type, RuntimeInput]:
    import onnx_ir as ir  # imported when a pass class is looked at, not when recipes are only parsed

    from qexport.calibration.calibrator import CalibrationStats, Calibrator

    return {CalibrationStats: RuntimeInput.STATS, Calibrator: RuntimeInput.CALIBRATOR, ir.Model: RuntimeInput.REFERENCE}


def runtime_inputs(klass: type) -> dict[str, RuntimeInput]:
    """Field name -> run-time input, for the fields of a pass class typed ``T`` or ``T | None`` with ``T``
    :class:`CalibrationStats`, :class:`Calibrator` or ``ir.Model`` (the float reference graph)."""
    hints, kinds = typing.get_type_hints(klass), _runtime_types()
    found = {}
    for f in dataclasses.fields(klass):
        tp = hints[f.name]
        members = [a for a in typing.get_args(tp) if a is not type(None)] \
            if typing.get_origin(tp) in (typing.Union, types.UnionType) else [tp]
        if len(members) == 1 and members[0] in kinds:
            found[f.name] = kinds[members[0]]
    return found


def is_lossless(klass: type) -> bool:
    """Whether a pass class keeps the model's function (a pass says ``lossless = False`` when it quantizes)."""
    return getattr(klass, "lossless", True)


def runtime_fields(klass: type) -> set[str]:
    """The names of the run-time fields of a pass class (:func:`runtime_inputs`)."""
    return set(runtime_inputs(klass))


def check_settings(klass: type, settings: Mapping[str, Any]) -> None:
    """Run the pass's own checks of ``settings`` (its ``__post_init__``) now, with the run-time fields left empty,
    so that a bad value fails when the recipe is read rather than after export and calibration; raises
    :class:`RecipeError`. A pass that cannot be built without its run-time data is checked when it is built."""
    empty = {name: None for name in runtime_fields(klass)}
    try:
        klass(**settings, **empty)
    except RecipeError:
        raise
    except Exception:  # noqa: BLE001 - needs real run-time data; its settings are checked again when built
        pass


def pass_class(name: str) -> type:
    """The pass class registered as ``name``; raises :class:`RecipeError` for an unknown or missing pass."""
    if name not in PASSES:
        raise RecipeError(f"unknown pass {name!r}; registered passes: {', '.join(sorted(PASSES))}")
    module_name, class_name = PASSES[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise RecipeError(f"pass {name!r} needs module {module_name}, which cannot be imported: {exc}") from exc
    return getattr(module, class_name)


def _settable(tp: Any) -> bool:
    """Whether a field of type ``tp`` can be written in YAML."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return all(_settable(a) for a in args)
    if origin is tuple:
        return len(args) == 2 and args[1] is Ellipsis and _settable(args[0])
    if origin is typing.Literal:
        return True
    if origin in (dict, collections.abc.Mapping):
        return args[0] is str and _settable(args[1])
    return tp is type(None) or tp in _SCALARS or (isinstance(tp, type) and issubclass(tp, enum.Enum))


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        return f"a list of {_describe(args[0])}"
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (dict, collections.abc.Mapping):
        return f"a mapping of names to {_describe(args[1])}"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    return "null" if tp is type(None) else tp.__name__


def convert_setting(where: str, value: Any, tp: Any) -> Any:
    """``value`` read from YAML as type ``tp``; raises :class:`RecipeError` naming ``where``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return convert_setting(where, value, arg)
            except RecipeError:
                continue
    elif origin is tuple and isinstance(value, (list, tuple)):
        return tuple(convert_setting(f"{where}[{i}]", v, args[0]) for i, v in enumerate(value))
    elif origin is tuple and args[0] is str and isinstance(value, str):  # globs: never split at commas
        raise list_form_error(where, where.rsplit(".", 1)[-1], value)
    elif origin in (dict, collections.abc.Mapping) and isinstance(value, Mapping):
        return {convert_setting(f"{where} key", k, str): convert_setting(f"{where}[{k!r}]", v, args[1])
                for k, v in value.items()}
    elif origin is typing.Literal:
        if value in args:
            return value
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if value == member.value:
                return member
    elif tp is type(None):
        if value is None:
            return None
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp in _SCALARS and type(value) is tp:
        return value
    raise RecipeError(f"{where}: {value!r} is not allowed; expected {_describe(tp)}")


def settable_fields(klass: type) -> dict[str, Any]:
    """Field name -> type for the fields of a pass dataclass that a recipe may set."""
    if not dataclasses.is_dataclass(klass):
        raise RecipeError(f"{klass.__name__} is not a dataclass pass")
    hints = typing.get_type_hints(klass)
    return {f.name: hints[f.name] for f in dataclasses.fields(klass) if f.init and _settable(hints[f.name])}
