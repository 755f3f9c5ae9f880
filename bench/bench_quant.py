"""Benchmark W8A8 quantization of a model: ONNX Runtime's own quantizers against the qexport presets.

One run, one table; every figure is measured in this run on the same model and evaluation text (never the
calibration text). Rows: the FP32 export; ONNX Runtime `quantize_dynamic` (per-channel int8 weights,
per-tensor dynamic uint8 activations) and `quantize_static` (QDQ, per-channel, MinMax, calibrated on the
qexport calibration text) applied to that export; the FP32 export with only the float fusions of the ORT presets
(`ort-attention`, `ort-rms-norm`, `ort-rotary`: shows how much of their speed comes from fusion rather than from
int8); each
qexport preset applied to that export. Columns:
perplexity, ratio to PyTorch FP32, model size, quantization time after the export (the ORT quantizer's call;
for qexport: load, calibration and passes), prefill and decode speed relative to the FP32 export (2 threads).
Speed is timed in ``--rounds`` interleaved rounds after all the models are built: each round opens a fresh
session of every model in turn (the order rotated each round), and a model's figure is its median over the
rounds, with the prefill range beside it. On a shared machine a slow spell then lands on one round of several
models rather than on the whole measurement of one of them.
Usage:
    python bench/bench_quant.py [MODEL] [--presets w8a8-dynamic,w8a8-static-ort] [--windows 4] [--inc-path DIR] [--json]
With Intel Neural Compressor 2.x importable (``--inc-path``), a row for ORT quantize_static with its SmoothQuant option.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import qexport
from qexport.artifact.folder import MODEL_FILE, Artifact
from qexport.evaluation.benchmark import BenchSettings, bench
from qexport.evaluation.perplexity import EvalSettings, evaluate
from qexport.exporter.text import load_text, parse_source, token_windows
from table import markdown_table  # bench/table.py, beside this script

log = logging.getLogger("bench_quant")


def _ort_quantized(fp32: Path, out: Path, quantize: Callable[[Path, Path], None]) -> float:
    """Copy the FP32 folder to ``out`` with its model replaced by ORT's quantized one; returns seconds."""
    shutil.copytree(fp32, out, ignore=shutil.ignore_patterns(MODEL_FILE))
    start = time.perf_counter()
    quantize(fp32 / MODEL_FILE, out / MODEL_FILE)
    return time.perf_counter() - start


def _ort_dynamic(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(src, dst, per_channel=True, weight_type=QuantType.QInt8)


def _ort_static(calib_windows: list, smooth_quant: bool = False) -> Callable[[Path, Path], None]:
    """ORT's quantize_static (QDQ, per-channel, MinMax); with ``smooth_quant`` its SmoothQuant option (alpha 0.5,
    folded), which needs Intel Neural Compressor 2.x (``neural_compressor.adaptor.ox_utils``)."""
    def run(src: Path, dst: Path) -> None:
        import numpy as np
        import onnx
        from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

        inputs = onnx.load(str(src), load_external_data=False).graph.input

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.items = iter(calib_windows)

            def get_next(self):
                ids = next(self.items, None)
                if ids is None:
                    return None
                feeds = {"input_ids": ids[None], "attention_mask": np.ones((1, len(ids)), np.int64)}
                for value in inputs:
                    if value.name == "position_ids":
                        feeds[value.name] = np.arange(len(ids), dtype=np.int64)[None]
                    elif value.name not in feeds:  # empty KV cache
                        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
                        feeds[value.name] = np.zeros((1, dims[1], 0, dims[3]), np.float32)
                return feeds

        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"SmoothQuant": True, "SmoothQuantAlpha": 0.5, "SmoothQuantFolding": True}
                        if smooth_quant else None)

    return run


def _qexport_preset(fp32: Path, out: Path, preset: str, windows: list) -> float:
    """Apply ``preset`` to the FP32 export (load, calibrate, run the passes, save); returns seconds.

    The passes run as `qexport export --recipe` runs them, less the per-pass difficulty measurement (a
    report metric, not part of quantizing), so the time is calibration and passes only.
    """
    import onnx_ir as ir

    from qexport.api import save_model
    from qexport.recipes.pipeline import PipelineSettings, apply_recipe
    from qexport.recipes.schema import load_recipe

    shutil.copytree(fp32, out, ignore=shutil.ignore_patterns(MODEL_FILE))
    start = time.perf_counter()
    model = ir.load(fp32 / MODEL_FILE)
    apply_recipe(model, load_recipe(preset), windows, PipelineSettings(measure_difficulty=False))
    save_model(model, out)
    return time.perf_counter() - start


def _fp32_fused(fp32: Path, out: Path) -> float:
    """The FP32 export with the float ORT fusions of the w8a8-dynamic preset (attention, RMSNorm, rotary,
    query chunks) and nothing else; returns seconds."""
    import onnx_ir as ir

    from qexport.api import save_model
    from qexport.passes.ort.attention_chunks import OrtAttentionChunksPass
    from qexport.passes.ort.attention import OrtAttentionPass
    from qexport.passes.ort.rms_norm import OrtRmsNormPass
    from qexport.passes.ort.rotary import OrtRotaryPass

    shutil.copytree(fp32, out, ignore=shutil.ignore_patterns(MODEL_FILE))
    start = time.perf_counter()
    model = ir.load(fp32 / MODEL_FILE)
    for fusion in (OrtAttentionPass(), OrtRmsNormPass(), OrtRotaryPass(), OrtAttentionChunksPass()):
        fusion(model)
    save_model(model, out)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--presets", default="w8a8-dynamic,w8a8-dynamic-qdq,w8a8-static,w8a8-static-ort")
    parser.add_argument("--windows", type=int, default=4, help="evaluation windows")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--ort-calib-windows", type=int, default=2, help="windows for ORT's static calibration")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5, help="timed prefills per session (decode: half)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds, a fresh session each")
    parser.add_argument("--inc-path", default=None,
                        help="a folder holding Intel Neural Compressor 2.x (e.g. pip install --no-deps --target DIR "
                             "neural-compressor==2.6 and its imports) for ORT's SmoothQuant row; skipped when absent")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.inc_path:
        sys.path.insert(0, args.inc_path)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    eval_settings = EvalSettings(windows=args.windows, seq_len=args.seq_len, threads=2, greedy_tokens=8)
    speed_settings = BenchSettings(seq_len=args.seq_len, decode_tokens=args.decode_tokens, runs=args.runs, reference=False)

    rows: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        start = time.perf_counter()
        fp32 = qexport.export(args.model, tmp / "fp32")
        models: dict[str, tuple[Path, float | None]] = {"onnxruntime fp32": (fp32, None)}
        log.info("fp32 export %.1f s", time.perf_counter() - start)
        tokenizer = Artifact.open(fp32).tokenizer()
        calib = token_windows(tokenizer, load_text(parse_source(None), "calibration"), args.seq_len, args.ort_calib_windows)
        peers = [("ort quantize_dynamic", tmp / "ort-dyn", _ort_dynamic),
                 ("ort quantize_static", tmp / "ort-static", _ort_static(calib))]
        if importlib.util.find_spec("neural_compressor") is not None:
            peers.append(("ort quantize_static + SmoothQuant (INC)", tmp / "ort-static-sq", _ort_static(calib, True)))
        else:
            failed["ort quantize_static + SmoothQuant (INC)"] = "neural_compressor not importable (see --inc-path)"
        for name, folder, quantizer in peers:
            try:
                models[name] = (folder, _ort_quantized(fp32, folder, quantizer))
            except Exception as exc:  # a peer that fails is a row of the table, not the end of the run
                log.warning("%s failed: %s", name, exc)
                failed[name] = f"{type(exc).__name__}: {exc}"[:200]
        models["onnxruntime fp32 + ort fusions"] = (tmp / "fp32-fused", _fp32_fused(fp32, tmp / "fp32-fused"))
        windows = token_windows(tokenizer, load_text(parse_source(None), "calibration"), args.seq_len, args.calib_windows)
        for preset in filter(None, args.presets.split(",")):
            models[f"qexport {preset}"] = (tmp / preset, _qexport_preset(fp32, tmp / preset, preset, windows))
        for name, (folder, seconds) in models.items():
            log.info("evaluating %s", name)
            try:
                quality = evaluate(folder, settings=eval_settings)
            except Exception as exc:
                log.warning("%s does not run: %s", name, exc)
                failed[name] = f"{type(exc).__name__}: {exc}"[:200]
                continue
            size = sum(f.stat().st_size for f in folder.glob("model.onnx*"))
            rows[name] = {"ppl": quality["ppl"], "ppl_ratio": quality["ppl_ratio"], "size_mb": size / 1e6,
                          "quant_seconds": seconds}
        speeds = _timed_in_rounds({name: models[name][0] for name in rows}, speed_settings, args.rounds, failed)
        for name in list(rows):
            if name in speeds:
                rows[name].update(speeds[name])
            else:  # its timing failed (in ``failed``): a row of errors, not the end of the run
                del rows[name]
    base = rows.get("onnxruntime fp32")  # None when the FP32 export itself failed: no speed ratios, still a table
    for row in rows.values():
        row["prefill_speedup"] = base["prefill_ms"] / row["prefill_ms"] if base else None
        row["decode_speedup"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"] if base else None
    if args.json:
        print(json.dumps({"rows": rows, "failed": failed}, indent=2))
        return
    print(f"\n{args.windows} x {args.seq_len} evaluation tokens; ORT CPU, 2 threads; ratios vs PyTorch FP32 (ppl) "
          f"and the ORT FP32 export (speed: medians of {args.rounds} interleaved rounds, fresh sessions)\n")
    print(_table(rows, failed))


def _timed_in_rounds(folders: dict[str, Path], settings: BenchSettings, rounds: int,
                     failed: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per model: median prefill ms and decode tokens/s over ``rounds`` rounds, each timing every model in a fresh
    session, the order rotated by one model per round; plus the prefill range over the rounds. A model whose timing
    fails is left out of the later rounds and of the result, its error put in ``failed``."""
    names = list(folders)
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for index in range(max(1, rounds)):
        order = names[index % len(names):] + names[:index % len(names)]
        for name in (n for n in order if n not in failed):
            log.info("timing %s (round %d of %d)", name, index + 1, rounds)
            try:
                samples[name].append(bench(folders[name], settings)["results"]["onnxruntime-cpu"])
            except Exception as exc:
                log.warning("%s cannot be timed: %s", name, exc)
                failed[name] = f"{type(exc).__name__}: {exc}"[:200]
                del samples[name]
    result = {}
    for name, runs in samples.items():
        prefill = [r["prefill_ms"] for r in runs]
        result[name] = {"prefill_ms": statistics.median(prefill), "prefill_ms_range": (min(prefill), max(prefill)),
                        "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in runs),
                        "rounds": runs}
    return result


def _table(rows: dict[str, dict[str, Any]], failed: dict[str, str]) -> str:
    """One line per measured model, then one per model that failed, with the error."""
    header = ["model", "ppl", "ppl ratio", "size MB", "quant s", "prefill ms", "prefill range", "prefill x",
              "decode tok/s", "decode x"]
    lines = []
    for name, r in rows.items():
        quant = "-" if r["quant_seconds"] is None else f"{r['quant_seconds']:.0f}"
        lines.append([name, f"{r['ppl']:.3f}", f"{r['ppl_ratio']:.4f}", f"{r['size_mb']:.0f}", quant,
                      f"{r['prefill_ms']:.0f}", "{:.0f}-{:.0f}".format(*r["prefill_ms_range"]), _ratio(r["prefill_speedup"]),
                      f"{r['decode_tokens_per_s']:.1f}", _ratio(r["decode_speedup"])])
    lines += [[name, f"failed: {error}"] + [""] * (len(header) - 2) for name, error in failed.items()]
    return markdown_table(header, lines, align="l" + "r" * (len(header) - 1))


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    main()
