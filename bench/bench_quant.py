"""Benchmark quantization of a model: ONNX Runtime's quantizers and onnxruntime-genai's builder against qexport's presets.

One run, one table; every figure is measured in this run on the same model and evaluation text (never the
calibration text). Rows: the FP32 export; ONNX Runtime `quantize_dynamic` (per-channel int8 weights,
per-tensor dynamic uint8 activations) and `quantize_static` (QDQ, per-channel, MinMax, calibrated on the
qexport calibration text) applied to that export; the FP32 export with only the float fusions of the ORT presets
(`ort-attention`, `ort-rms-norm`, `ort-rotary`: shows how much of their speed comes from fusion rather than from
int8); each qexport preset applied to that export; with onnxruntime-genai importable (``--builder``, the default then), the
model builder's fp32, int8 and int4 (k_quant, rtn) models of the same model, saved once as a Hugging Face folder
under ``--work`` (see ``genai_builder.py``). Columns: the perplexity ratio to PyTorch FP32 on each ``--eval-text``
domain, model size, build or quantization time (the FP32 export and the builder: the wall time of the command
from the Hugging Face folder; the ORT quantizer: its call; a qexport preset: load, calibration and passes after
the export), prefill and decode speed relative to the FP32 export (2 threads). PyTorch FP32 is run once per
domain, on the FP32 export's evaluation; every other row is scored on the same windows.
Speed is timed in ``--rounds`` interleaved rounds after all the models are built: each round opens a fresh
session of every model in turn (the order rotated each round), and a model's figure is its median over the
rounds, with the prefill range beside it. On a shared machine a slow spell then lands on one round of several
models rather than on the whole measurement of one of them.
Usage:
    python bench/bench_quant.py [MODEL] [--presets w8a8-dynamic,w8a8-static-ort] [--windows 4] [--inc-path DIR]
        [--eval-text pydoc,gitnotes] [--no-builder] [--work DIR] [--json]
With Intel Neural Compressor 2.x importable (``--inc-path``), a row for ORT quantize_static with its SmoothQuant option.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import genai_builder  # bench/genai_builder.py, beside this script
import ort_peers  # bench/ort_peers.py
from qexport.artifact.folder import MODEL_FILE, Artifact
from qexport.evaluation.benchmark import BenchSettings, bench
from qexport.evaluation.perplexity import EvalSettings, evaluate
from qexport.errors import QexportError, TextSourceError
from qexport.exporter.machine_text import DOMAINS
from qexport.exporter.text import TextSource, load_text, parse_source, text_source, token_windows
from recipe_run import apply_to_export  # bench/recipe_run.py, beside this script
from table import markdown_table  # bench/table.py, beside this script

log = logging.getLogger("bench_quant")


def _qexport_preset(fp32: Path, out: Path, preset: str, tokenizer, seq_len: int, count: int) -> float:
    """Apply ``preset`` to the FP32 export (load, calibrate on the preset's calibration text, else the default, in
    ``count`` windows of ``seq_len`` tokens, run the passes, save); returns seconds."""
    from qexport.recipes.schema import load_recipe

    recipe = load_recipe(preset)
    windows = token_windows(tokenizer, load_text(parse_source(recipe.calibration.text), "calibration"), seq_len, count)
    return apply_to_export(fp32, out, recipe, windows)


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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--presets", default="w8a8-dynamic,w8a8-dynamic-qdq,w8a8-static,w8a8-static-ort,w8a8-group-ort")
    p.add_argument("--windows", type=int, default=4, help="evaluation windows per --eval-text domain")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-text", default=None, metavar="SPEC[,SPEC...]",
                   help="evaluation domains, one ppl-ratio column each: a built-in domain (pydoc, manpages, gitnotes) "
                        "or mix (pydoc+manpages), a text file, or a dataset name (default: the evaluation default, pydoc)")
    p.add_argument("--calib-windows", type=int, default=16)
    p.add_argument("--ort-calib-windows", type=int, default=2, help="windows for ORT's static calibration")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=5, help="timed prefills per session (decode: half)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds, a fresh session each")
    p.add_argument("--builder", action=argparse.BooleanOptionalAction, default=None,
                   help="rows for onnxruntime-genai's model builder (default: on when onnxruntime_genai is importable)")
    p.add_argument("--work", default=None, help="folder for the saved Hugging Face model, reused across runs "
                                                "(default: qexport-bench in the temporary folder)")
    p.add_argument("--inc-path", default=None,
                   help="a folder holding Intel Neural Compressor 2.x (e.g. pip install --no-deps --target DIR "
                        "neural-compressor==2.6 and its imports) for ORT's SmoothQuant row; skipped when absent")
    p.add_argument("--json", action="store_true")
    return p


def eval_sources(spec: str | None) -> list[TextSource]:
    """``--eval-text``: each comma-separated item through :func:`parse_source`; none means the evaluation default."""
    if not spec:
        return [text_source()]
    items = [item.strip() for item in spec.split(",")]
    if not all(items):
        raise TextSourceError(f"--eval-text {spec!r} has an empty item; give SPEC[,SPEC...], e.g. pydoc,gitnotes")
    if len(set(items)) != len(items):
        raise TextSourceError(f"--eval-text {spec!r} names a domain twice")
    return [parse_source(item) for item in items]


def domain_label(source: TextSource) -> str:
    """The short name of an evaluation domain in the table's header."""
    if source.kind in DOMAINS:
        return source.kind
    return Path(source.location).name if source.kind == "file" else str(source.location)


def evaluate_args(source: TextSource) -> dict[str, str]:
    """``source`` as the ``text``/``dataset`` arguments of :func:`evaluate` (which resolves them back to it)."""
    if source.kind == "dataset":
        return {"dataset": source.location}
    return {"text": source.location if source.kind in ("file", "mix") else source.kind}


def _build(args: argparse.Namespace, tmp: Path, work: Path, failed: dict[str, str]) -> dict[str, tuple[Path, float | None]]:
    """Every model of the table, built into ``tmp``: {row name: (folder, build or quantization seconds)}."""
    builder = genai_builder.available() if args.builder is None else args.builder
    if builder and not genai_builder.available():
        raise QexportError("--builder needs onnxruntime-genai: pip install onnxruntime-genai, or pass --no-builder")
    if builder:  # both FP32 builds from one Hugging Face folder, each timed as its command
        source = genai_builder.hf_folder(args.model, work)
        fp32, seconds = tmp / "fp32", genai_builder.qexport_export(source, tmp / "fp32")
    else:
        from qexport.api import export

        start = time.perf_counter()
        fp32 = export(args.model, tmp / "fp32")
        seconds = time.perf_counter() - start
    log.info("fp32 export %.1f s", seconds)
    models: dict[str, tuple[Path, float | None]] = {"onnxruntime fp32": (fp32, seconds)}
    tokenizer = Artifact.open(fp32).tokenizer()
    calib = token_windows(tokenizer, load_text(parse_source(None), "calibration"), args.seq_len, args.ort_calib_windows)
    peers = [("ort quantize_dynamic", tmp / "ort-dyn", ort_peers.dynamic),
             ("ort quantize_static", tmp / "ort-static", ort_peers.static(calib))]
    if importlib.util.find_spec("neural_compressor") is not None:
        peers.append(("ort quantize_static + SmoothQuant (INC)", tmp / "ort-static-sq", ort_peers.static(calib, True)))
    else:
        failed["ort quantize_static + SmoothQuant (INC)"] = "neural_compressor not importable (see --inc-path)"
    for name, folder, quantizer in peers:
        try:
            models[name] = (folder, ort_peers.quantized(fp32, folder, quantizer))
        except Exception as exc:  # a peer that fails is a row of the table, not the end of the run
            log.warning("%s failed: %s", name, exc)
            failed[name] = f"{type(exc).__name__}: {exc}"[:200]
    models["onnxruntime fp32 + ort fusions"] = (tmp / "fp32-fused", _fp32_fused(fp32, tmp / "fp32-fused"))
    for preset in filter(None, args.presets.split(",")):
        models[f"qexport {preset}"] = (tmp / preset, _qexport_preset(fp32, tmp / preset, preset, tokenizer,
                                                                     args.seq_len, args.calib_windows))
    for name, (precision, extra) in (genai_builder.BUILDS.items() if builder else ()):
        folder = tmp / name.replace(" ", "-").replace("(", "").replace(")", "")
        log.info("building %s", name)
        try:
            models[name] = (folder, genai_builder.build(source, folder, precision, extra))
        except Exception as exc:
            log.warning("%s failed: %s", name, exc)
            failed[name] = f"{type(exc).__name__}: {exc}"[:200]
    return models


def _same_windows(folder: Path, reference: Path, sources: list[TextSource], settings: EvalSettings) -> str | None:
    """Why ``folder`` would be scored on other tokens than ``reference`` (its tokenizer differs), or None."""
    theirs, ours = Artifact.open(folder).tokenizer(), Artifact.open(reference).tokenizer()
    for source in sources:
        text = load_text(source, "evaluation")
        a = token_windows(theirs, text, settings.seq_len, settings.windows)
        b = token_windows(ours, text, settings.seq_len, settings.windows)
        if len(a) != len(b) or any(x.shape != y.shape or (x != y).any() for x, y in zip(a, b)):
            return f"its tokenizer cuts the {domain_label(source)} text into other windows than the FP32 export's"
    return None


def _score(models: dict[str, tuple[Path, float | None]], sources: list[TextSource], settings: EvalSettings,
           failed: dict[str, str]) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    """Per model: ppl and its ratio to PyTorch FP32 per domain, size, seconds; and PyTorch's ppl per domain, run once
    on the FP32 export's evaluation (the first model)."""
    rows: dict[str, dict[str, Any]] = {}
    reference: dict[str, float] = {}
    first = next(iter(models.values()))[0]
    for index, (name, (folder, seconds)) in enumerate(models.items()):
        log.info("evaluating %s", name)
        try:
            if "foreign" in Artifact.open(folder).manifest and (why := _same_windows(folder, first, sources, settings)):
                raise QexportError(why)
            ppl = {}
            for source in sources:
                quality = evaluate(folder, **evaluate_args(source),
                                   settings=dataclasses.replace(settings, reference=index == 0))
                label = domain_label(source)
                ppl[label] = quality["ppl"]
                if index == 0:
                    reference[label] = quality["ppl_reference"]
        except Exception as exc:
            log.warning("%s does not run: %s", name, exc)
            failed[name] = f"{type(exc).__name__}: {exc}"[:200]
            continue
        size = sum(f.stat().st_size for f in folder.glob("model.onnx*"))
        rows[name] = {"ppl": ppl, "ppl_ratio": {d: p / reference[d] for d, p in ppl.items() if d in reference},
                      "size_mib": size / 2**20, "quant_seconds": seconds}
    return rows, reference


def main() -> None:
    cli = parser()
    args = cli.parse_args()
    if args.inc_path:
        sys.path.insert(0, args.inc_path)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:  # a bad domain fails here, before anything is built
        sources = eval_sources(args.eval_text)
        for source in sources:
            load_text(source, "evaluation")
    except QexportError as exc:
        cli.error(str(exc))
    work = Path(args.work) if args.work else Path(tempfile.gettempdir()) / "qexport-bench"
    work.mkdir(parents=True, exist_ok=True)
    eval_settings = EvalSettings(windows=args.windows, seq_len=args.seq_len, threads=2, greedy_tokens=8)
    speed_settings = BenchSettings(seq_len=args.seq_len, decode_tokens=args.decode_tokens, runs=args.runs, reference=False)

    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory(dir=work) as tmp_name:
        models = _build(args, Path(tmp_name), work, failed)
        rows, reference = _score(models, sources, eval_settings, failed)
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
        print(json.dumps({"rows": rows, "failed": failed, "ppl_pytorch_fp32": reference}, indent=2))
        return
    domains = [domain_label(s) for s in sources]
    print(f"\n{args.windows} x {args.seq_len} evaluation tokens per domain; PyTorch FP32 ppl "
          + ", ".join(f"{d} {reference[d]:.3f}" for d in domains if d in reference)
          + f"; ORT CPU, 2 threads; ppl ratios vs PyTorch FP32, speed ratios vs the ORT FP32 export (medians of "
          f"{args.rounds} interleaved rounds, fresh sessions); build s: the FP32 export and the builder, the wall "
          "time of the command; the ORT quantizers and qexport presets, the quantization after the FP32 export\n")
    print(table(rows, failed, domains))


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


def table(rows: dict[str, dict[str, Any]], failed: dict[str, str], domains: list[str]) -> str:
    """One line per measured model, one ppl-ratio column per evaluation domain; then one per model that failed,
    with the error."""
    header = ["model", *(f"ppl ratio {d}" for d in domains), "size MiB", "build s", "prefill ms", "prefill range",
              "prefill x", "decode tok/s", "decode x"]
    lines = []
    for name, r in rows.items():
        quant = "-" if r["quant_seconds"] is None else f"{r['quant_seconds']:.0f}"
        ratios = [f"{r['ppl_ratio'][d]:.4f}" if d in r["ppl_ratio"] else "-" for d in domains]
        lines.append([name, *ratios, f"{r['size_mib']:.0f}", quant, f"{r['prefill_ms']:.0f}",
                      "{:.0f}-{:.0f}".format(*r["prefill_ms_range"]), _ratio(r["prefill_speedup"]),
                      f"{r['decode_tokens_per_s']:.1f}", _ratio(r["decode_speedup"])])
    lines += [[name, f"failed: {error}"] + [""] * (len(header) - 2) for name, error in failed.items()]
    return markdown_table(header, lines, align="l" + "r" * (len(header) - 1))


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    main()
