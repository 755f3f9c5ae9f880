"""The Python API behind the CLI: export a model folder."""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import resource
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import onnx_ir as ir

from qexport.artifact.folder import MODEL_FILE
from qexport.artifact.genai_config import write_genai_config
from qexport.artifact.onnx_file import write_single_file
from qexport.exporter.checkpoint import CheckpointError
from qexport.exporter.checkpoint_export import export_from_checkpoint, materialize
from qexport.exporter.families import family_for
from qexport.exporter.graph_export import EXPORT_PATH_KEY, ExportPath, ExportSettings, export_graph, export_path_of
from qexport.exporter.layerwise import LayerwiseError
from qexport.exporter.loading import checkpoint_opener, load_config, load_tokenizer, load_weights, resolve_source
from qexport.artifact.outdir import atomic_output_dir, checksums, write_manifest
from qexport.recipes.adapt import adapt_recipe, is_preset_name
from qexport.recipes.pipeline import PipelineSettings, apply_recipe
from qexport.recipes.preflight import check_recipe_applies
from qexport.recipes.schema import KvCache, Recipe, load_recipe
from qexport.exporter.text import default_bos, load_text, parse_source, token_windows

log = logging.getLogger(__name__)

EXTERNAL_DATA_FILE = "model.onnx.data"
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3  # protobuf's hard limit
DEFAULT_CALIB_WINDOWS = 16
DEFAULT_CALIB_SEQ_LEN = 512
VERSIONED = ("torch", "transformers", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "qexport")


def package_versions() -> dict[str, str]:
    found = {}
    for name in VERSIONED:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def peak_memory_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def save_model(model: ir.Model, folder: Path) -> list[str]:
    """Save the ONNX model, with external data when it would pass protobuf's 2 GB limit."""
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if size > EXTERNAL_DATA_THRESHOLD:
        ir.save(model, folder / MODEL_FILE, external_data=EXTERNAL_DATA_FILE)
        return [MODEL_FILE, EXTERNAL_DATA_FILE]
    write_single_file(model, folder / MODEL_FILE)  # ir.save would hold two more copies of the weights
    return [MODEL_FILE]


def calibration_shape(recipe: Recipe, windows: int | None, seq_len: int | None,
                      text: str | None = None) -> dict[str, Any]:
    """Calibration window count, length and text (as ``--calib`` takes it; None is the default text): the caller's
    value, else the recipe's ``calibration:``, else the default; ``from`` says which applied to each."""
    shape: dict[str, Any] = {"from": {}}
    for key, given, default in (("windows", windows, DEFAULT_CALIB_WINDOWS), ("seq_len", seq_len, DEFAULT_CALIB_SEQ_LEN),
                                ("text", text, None)):
        from_recipe = getattr(recipe.calibration, key)
        shape[key], shape["from"][key] = ((given, "argument") if given is not None else
                                          (from_recipe, "recipe") if from_recipe is not None else (default, "default"))
    return shape


def export(
    model: str | None = None,
    out: str | os.PathLike = "qexport-out",
    *,
    dtype: str = "fp32",
    kv_cache: bool = True,
    force: bool = False,
    revision: str | None = None,
    recipe: str | os.PathLike | None = None,
    calib: str | None = None,
    calib_windows: int | None = None,
    calib_seq_len: int | None = None,
    measure_difficulty: bool = True,
    kv_cache_dtype: str | None = None,
) -> Path:
    """Export MODEL (hub id, folder, .gguf, or the embedded default) to the folder ``out``; returns it.

    ``recipe`` (a YAML path or a preset name) runs graph passes on the export, calibrated on ``calib``
    (a text file or dataset name; default: the calibration half of Python's documentation) in
    ``calib_windows`` windows of ``calib_seq_len`` tokens. Left as ``None``, these come from the recipe's
    ``calibration:`` settings, else 16 windows of 512 tokens; the manifest records which applied.
    ``kv_cache_dtype`` (``float`` or ``int8``) overrides the recipe's ``kv_cache`` setting; ``int8`` needs a recipe
    (its scales are calibrated) and the KV cache.
    """
    settings = ExportSettings(dtype=dtype, kv_cache=kv_cache)
    source = resolve_source(model, revision=revision)
    loaded_recipe = load_recipe(recipe) if recipe is not None else None  # a bad recipe fails before the slow part
    if kv_cache_dtype is not None:
        loaded_recipe = _with_kv_cache(loaded_recipe, kv_cache_dtype, kv_cache)
    out = Path(out)
    if out.exists() and not force:  # fail before the slow part; atomic_output_dir checks again
        from qexport.errors import OutputExistsError

        raise OutputExistsError(f"output folder {out} exists; pass --force to replace it")
    start = time.perf_counter()
    config = load_config(source)
    family = family_for(config.model_type)
    tokenizer = load_tokenizer(source)
    load_s = time.perf_counter() - start
    with atomic_output_dir(out, force=force) as tmp:
        export_start = time.perf_counter()
        ir_model, signature, load_weights_s = _export_graph(source, config, family, settings)
        export_s = time.perf_counter() - export_start - load_weights_s
        load_s += load_weights_s
        path = export_path_of(ir_model)
        recipe_report, calibration, adaptations = None, None, None
        if loaded_recipe is not None:
            materialize(ir_model)  # passes rewrite the weights: read those the export left in the checkpoint
            adaptations = ()
            if is_preset_name(recipe):  # a preset is an intent, fitted to this graph; a recipe file runs as written
                loaded_recipe, adaptations = adapt_recipe(loaded_recipe, ir_model)
            check_recipe_applies(ir_model, loaded_recipe)  # seconds; before the calibration text and statistics
            shape = calibration_shape(loaded_recipe, calib_windows, calib_seq_len, calib)
            text = parse_source(shape["text"])
            windows = token_windows(tokenizer, load_text(text, "calibration"), shape["seq_len"], shape["windows"],
                                    text.describe())
            calibration = {"source": text.to_json(), "windows": len(windows), "seq_len": shape["seq_len"],
                           "tokens": int(sum(len(w) for w in windows)), "settings_from": shape["from"],
                           "bos_prefixed": default_bos(tokenizer) is not None}
            recipe_report = apply_recipe(ir_model, loaded_recipe, windows, PipelineSettings(measure_difficulty=measure_difficulty))
            signature = _cache_type(signature, ir_model)
        files = save_model(ir_model, tmp)
        tokenizer.save_pretrained(tmp)
        config_dict = config.to_dict()
        config_dict.pop("quantization_config", None)  # the GGUF loader's marker; the ONNX weights are float
        type(config).from_dict(config_dict).save_pretrained(tmp)
        files += write_genai_config(tmp, signature, config, tokenizer, MODEL_FILE)  # for onnxruntime-genai
        manifest = {
            "format": 1,
            "source": source.to_json(),
            "model_type": config.model_type,
            "family": family.name,
            "dtype": settings.dtype,
            "opset": settings.opset,
            "signature": signature.to_json(),
            "files": checksums(tmp, files),
            "versions": package_versions(),
            "python": platform.python_version(),
            "export": {
                "load_seconds": round(load_s, 2),
                "export_seconds": round(export_s, 2),
                "total_seconds": round(time.perf_counter() - start, 2),
                "peak_memory_mib": round(peak_memory_mib(), 1),
                "nodes": len(ir_model.graph),
                "path": getattr(path, "path", None),  # "layerwise" or "whole-model"
                "path_reason": getattr(path, "reason", None),
            },
            "recipe": recipe_report,
            "recipe_adaptations": None if adaptations is None else [a.to_json() for a in adaptations],
            "calibration": calibration,
        }
        write_manifest(tmp, manifest)
    return out


def _export_graph(source, config, family, settings: ExportSettings):
    """(graph, signature, seconds spent loading the whole model): straight from the checkpoint where it can be
    read tensor by tensor, else from the loaded model; the manifest's export path says which and why."""
    reason = None
    if settings.layerwise:
        try:
            ir_model, signature = export_from_checkpoint(config, family, checkpoint_opener(source, config), settings)
            return ir_model, signature, 0.0
        except (CheckpointError, LayerwiseError) as error:
            reason = f"{type(error).__name__}: {error}"
            log.info("not exporting from the checkpoint (%s); loading the whole model", reason)
        except Exception as error:  # noqa: BLE001  (any failure of the shortcut: load the whole model instead)
            reason = f"{type(error).__name__}: {error}"
            log.warning("export from the checkpoint failed, loading the whole model: %s", reason)
    start = time.perf_counter()
    hf_model = load_weights(source, config)
    load_s = time.perf_counter() - start
    ir_model, signature = export_graph(hf_model, family, settings)
    del hf_model  # the graph holds the weights it uses; those a pass replaces can then be freed
    path = export_path_of(ir_model)
    if reason is not None and path is not None:
        ir_model.meta[EXPORT_PATH_KEY] = ExportPath(path.path, f"{path.reason}; the model was loaded whole, "
                                                               f"not read from the checkpoint ({reason})")
    return ir_model, signature, load_s


def _with_kv_cache(recipe: Recipe | None, kv_cache_dtype: str, kv_cache: bool) -> Recipe | None:
    """The recipe with the KV cache type asked for; an int8 cache without a recipe or a cache is an error."""
    from qexport.errors import RecipeError

    if kv_cache_dtype == KvCache.INT8.value and (recipe is None or not kv_cache):
        raise RecipeError("an int8 KV cache needs a recipe (its scales are calibrated; e.g. --recipe w8a8-dynamic) "
                          "and the KV cache (drop --no-kv-cache)")
    return recipe.with_kv_cache(kv_cache_dtype) if recipe is not None else None


def _cache_type(signature, model: ir.Model):
    """The signature with the past inputs' type where a pass changed it (quantize-kv: int8)."""
    types = {v.dtype for v in model.graph.inputs if v.name in set(signature.past_names)}
    return dataclasses.replace(signature, kv_dtype="int8") if types == {ir.DataType.INT8} else signature
