"""SmolLM2 quantized with the w8a8-static preset, built once per test session for the slow report and check tests."""

from __future__ import annotations

import shutil
from pathlib import Path

CALIB_WINDOWS = 4  # fewer than the export's default 16: the slow tests check the report and the graph, not accuracy
_BUILT: dict[Path, Path] = {}


def static_smollm2(fp32: Path, folder: Path) -> Path:
    """Apply w8a8-static to the FP32 export ``fp32`` as `qexport export --recipe` does, less the difficulty metric
    (the tiny tests cover it); the folder has the recipe report and calibration record in its manifest."""
    if fp32 in _BUILT:
        return _BUILT[fp32]
    import onnx_ir as ir

    from qexport.api import save_model
    from qexport.artifact.folder import Artifact
    from qexport.artifact.outdir import checksums, read_manifest, write_manifest
    from qexport.recipes.pipeline import PipelineSettings, apply_recipe
    from qexport.recipes.schema import load_recipe
    from qexport.exporter.text import load_text, parse_source, token_windows

    source = parse_source(None)
    windows = token_windows(Artifact.open(fp32).tokenizer(), load_text(source, "calibration"), 512, CALIB_WINDOWS)
    model = ir.load(fp32 / "model.onnx")
    report = apply_recipe(model, load_recipe("w8a8-static"), windows, PipelineSettings(measure_difficulty=False, threads=2))
    shutil.copytree(fp32, folder, ignore=shutil.ignore_patterns("model.onnx"))
    files = save_model(model, folder)
    manifest = read_manifest(folder)
    manifest["recipe"] = report
    manifest["calibration"] = {"source": source.to_json(), "windows": len(windows), "seq_len": 512,
                               "tokens": int(sum(len(w) for w in windows))}
    manifest["files"] = checksums(folder, files + [f for f in manifest["files"] if f not in files])
    write_manifest(folder, manifest)
    _BUILT[fp32] = folder
    return folder
