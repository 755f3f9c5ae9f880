"""The `qexport` command line: parses arguments into settings and calls the library."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from typing import Any, Sequence

from qexport.artifact.runtime import Runtime
from qexport.errors import QexportError

log = logging.getLogger("qexport")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qexport", description="Export causal LMs to calibrated, quantized ONNX.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="export a model to an ONNX folder")
    p.add_argument("model", nargs="?", default=None, help="hub id, local folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--no-kv-cache", action="store_true", help="export without past/present key-value inputs")
    p.add_argument("--kv-cache", choices=["float", "int8"], default=None, dest="kv_cache_dtype",
                   help="KV cache type (default: the recipe's kv_cache, else float); int8 adds quantize-kv to the recipe")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    p.add_argument("--recipe", default=None, help="recipe YAML file or preset name (see samples/recipes)")
    p.add_argument("--calib", default=None, help="calibration text: a file, a built-in domain (pydoc, manpages, gitnotes) or a mix "
                   "(pydoc+manpages), 'machine' (pydoc mixed with the manual pages where installed), or a "
                   "dataset name (default: the recipe's calibration.text, else pydoc; always the calibration half)")
    p.add_argument("--calib-windows", type=int, default=None,
                   help="calibration windows (default: the recipe's calibration.windows, else 16)")
    p.add_argument("--calib-seq-len", type=int, default=None,
                   help="tokens per calibration window (default: the recipe's calibration.seq_len, else 512)")
    p.add_argument("--no-difficulty", action="store_true",
                   help="skip the per-site quantization-difficulty metric after each pass (faster)")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")

    p = sub.add_parser("eval", help="perplexity and parity against the PyTorch source model")
    p.add_argument("dir")
    _evaluation_args(p, windows=4, seq_len=512, greedy_tokens=32, windows_help="number of text windows")
    p.add_argument("--no-reference", action="store_true", help="skip the PyTorch comparison")
    _runtime_args(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("generate", help="generate text with the exported model")
    p.add_argument("dir")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="greedy decoding (default: sampling)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="do not wrap the prompt in the tokenizer's chat template")
    _runtime_args(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("bench", help="time prefill and decode against the PyTorch source model")
    p.add_argument("dir")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--no-reference", action="store_true", help="skip timing PyTorch")
    _runtime_args(p, default_threads=2)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("check", help="check an exported model against a runtime's rules (TensorRT explicit quantization)")
    p.add_argument("dir")
    p.add_argument("--target", choices=["tensorrt"], default="tensorrt")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("report", help="validation report: per-site error, difficulty, perplexity, plots, suggestions")
    p.add_argument("dir")
    _evaluation_args(p, windows=2, seq_len=256, greedy_tokens=16, windows_help="evaluation windows (sites and perplexity)")
    p.add_argument("--reference", default=None,
                   help="FP32 export of the same model (default: export it again from the source in the manifest)")
    p.add_argument("--html", default=None, help="write one self-contained HTML page here")
    p.add_argument("--plots", default=None, help="write the PNG plots into this folder (default with --html: OUT-plots/)")
    p.add_argument("--worst", type=int, default=12, help="sites listed in the text summary")
    p.add_argument("--suggest", action="store_true", help="propose recipe changes from the measurements")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("build-engine", help="build a TensorRT engine from the model folder's ONNX graph")
    p.add_argument("dir")
    p.add_argument("--int8", action="store_true", help="the graph is Q/DQ-quantized (explicit quantization)")
    p.add_argument("--fp16", action="store_true", help="weakly typed build: float layers may run in FP16")
    p.add_argument("--workspace", type=int, default=4096, help="builder workspace, MiB")
    p.add_argument("--max-seq-len", type=int, default=2048, help="longest prompt + generated length")
    p.add_argument("--max-batch", type=int, default=1)
    p.add_argument("--json", action="store_true")
    return parser


def _evaluation_args(p: argparse.ArgumentParser, *, windows: int, seq_len: int, greedy_tokens: int,
                     windows_help: str) -> None:
    """The evaluation text and how much of it is scored, shared by `eval` and `report` (their defaults differ)."""
    p.add_argument("--text", default=None, help="a UTF-8 text file, or a built-in domain (pydoc, manpages, gitnotes; their evaluation "
                   "halves) (default: pydoc)")
    p.add_argument("--dataset", default=None, help="a Hugging Face dataset name, NAME or NAME:CONFIG")
    p.add_argument("--windows", type=int, default=windows, help=windows_help)
    p.add_argument("--seq-len", type=int, default=seq_len, help="tokens per window")
    p.add_argument("--greedy-tokens", type=int, default=greedy_tokens, help="greedy tokens compared with PyTorch")


def _runtime_args(p: argparse.ArgumentParser, default_threads: int | None = None) -> None:
    p.add_argument("--runtime", default=Runtime.ORT_CPU.value, choices=[r.value for r in Runtime])
    p.add_argument("--threads", type=int, default=default_threads, help="intra-op threads")


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    for old in [h for h in log.handlers if getattr(h, "qexport_cli", False)]:
        log.removeHandler(old)  # main() may run several times in one process (tests, notebooks)
    handler = logging.StreamHandler(sys.stderr)
    handler.qexport_cli = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(message)s" if verbose == 0 else "%(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(level)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)


def _cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    from qexport.api import export
    from qexport.artifact.outdir import read_manifest

    out = export(args.model, args.out, dtype=args.dtype, kv_cache=not args.no_kv_cache, force=args.force,
                 revision=args.revision, recipe=args.recipe, calib=args.calib, calib_windows=args.calib_windows,
                 calib_seq_len=args.calib_seq_len, measure_difficulty=not args.no_difficulty,
                 kv_cache_dtype=args.kv_cache_dtype)
    manifest = read_manifest(out)
    if not args.json:
        from qexport.recipes.adapt import describe

        for change in manifest.get("recipe_adaptations") or []:  # a preset fitted to this graph: what and why
            print(f"recipe adapted: {describe(change)}")
        _print_recipe_report(manifest.get("recipe"))
        e = manifest["export"]
        print(f"exported {manifest['source']['location']} -> {out} ({e['nodes']} nodes, {e['total_seconds']} s, "
              f"peak memory {e['peak_memory_mib']:.0f} MiB)")
    return manifest


def _print_recipe_report(report: dict[str, Any] | None) -> None:
    if not report:
        return
    from qexport.analysis.difficulty import summary_table

    for step in report["steps"]:
        print(f"pass {step['pass']:<18} {'modified' if step['modified'] else 'no change':<10} {step['seconds']:.2f} s")
    verify = report["verify"]
    print(f"equivalence: max |logit difference| vs the untransformed export {verify['max_abs_logit_diff']:.3g} "
          f"over {verify['tokens']} tokens (tolerance {verify['tolerance']})")
    if report["difficulty"]:
        print("\nquantization difficulty (mean over sites of each kind; per-site values are in qexport.json)")
        print(summary_table(report["difficulty"]))


def _cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    from qexport.evaluation.perplexity import EvalSettings, evaluate

    Runtime.parse_stepwise(args.runtime)  # before the text and the reference load
    settings = EvalSettings(windows=args.windows, seq_len=args.seq_len, greedy_tokens=args.greedy_tokens,
                            runtime=args.runtime, threads=args.threads, reference=not args.no_reference)
    result = evaluate(args.dir, text=args.text, dataset=args.dataset, settings=settings)
    if not args.json:
        for key, value in result.items():
            print(f"{key:>20}: {value:.6g}" if isinstance(value, float) else f"{key:>20}: {value}")
    return result


def _cmd_generate(args: argparse.Namespace) -> dict[str, Any]:
    from qexport.artifact.folder import Artifact
    from qexport.runtimes.generate import GenerationSettings, generate

    artifact = Artifact.open(args.dir)
    tokenizer = artifact.tokenizer()
    if not args.raw and getattr(tokenizer, "chat_template", None):
        prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
        if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "keys"):
            prompt_ids = prompt_ids["input_ids"]
    else:
        prompt_ids = tokenizer(args.prompt)["input_ids"]
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, greedy=args.greedy,
                                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    eos = [t for t in [tokenizer.eos_token_id] if t is not None]
    new: list[int] = []
    printed = ""

    def stream(token: int) -> None:
        nonlocal printed
        new.append(token)
        text = tokenizer.decode(new, skip_special_tokens=True)
        if not args.json:
            print(text[len(printed):], end="", flush=True)
        printed = text

    if Runtime.parse(args.runtime) is Runtime.GENAI:  # stops at the EOS of genai_config.json: the tokenizer's
        artifact.genai(threads=args.threads).generate(prompt_ids, settings, on_token=stream)
    else:
        generate(artifact.causal_lm(args.runtime, threads=args.threads), prompt_ids, settings, eos_token_ids=eos,
                 on_token=stream)
    if not args.json:
        print()
    return {"prompt": args.prompt, "text": printed, "tokens": new, "settings": dataclasses.asdict(settings)}


def _cmd_bench(args: argparse.Namespace) -> dict[str, Any]:
    from qexport.evaluation.benchmark import BenchSettings, bench, format_table

    Runtime.parse_stepwise(args.runtime)
    settings = BenchSettings(seq_len=args.seq_len, decode_tokens=args.decode_tokens, runs=args.runs,
                             threads=args.threads, runtime=args.runtime, reference=not args.no_reference)
    result = bench(args.dir, settings)
    if not args.json:
        print(format_table(result["results"]))
        for key in ("prefill_speedup_vs_pytorch", "decode_speedup_vs_pytorch"):
            if key in result:
                print(f"{key}: {result[key]:.2f}x")
    return result


def _cmd_check(args: argparse.Namespace) -> dict[str, Any]:
    from qexport.artifact.folder import Artifact
    from qexport.runtimes.tensorrt.check import check_path, errors, format_findings

    findings = check_path(Artifact.open(args.dir).model_path)
    result = {"target": args.target, "passed": not errors(findings), "findings": [f.to_json() for f in findings]}
    if not args.json:
        print(f"{args.target} compatibility: {'passed' if result['passed'] else 'FAILED'}")
        print(format_findings(findings))
    return result


def _cmd_report(args: argparse.Namespace) -> dict[str, Any]:
    from pathlib import Path

    from qexport.report.build import ReportSettings, build_report, format_text

    settings = ReportSettings(windows=args.windows, seq_len=args.seq_len, greedy_tokens=args.greedy_tokens,
                              threads=args.threads, reference=args.reference, suggest=args.suggest)
    report = build_report(args.dir, text=args.text, dataset=args.dataset, settings=settings)
    plots_dir = args.plots or (str(Path(args.html).with_suffix("")) + "-plots" if args.html else None)
    if plots_dir or args.html:
        from qexport.report.html import render_html, write_html
        from qexport.report.plots import render_plots, write_plots

        plots = render_plots(report)
        if plots_dir:
            report["plots"] = [str(p) for p in write_plots(plots, plots_dir)]
        if args.html:
            report["html"] = str(write_html(render_html(report, plots), args.html))
    if not args.json:
        print(format_text(report, worst=args.worst))
        for key in ("html", "plots"):
            if key in report:
                print(f"{key}: {report[key]}")
    return report


def _cmd_build_engine(args: argparse.Namespace) -> dict[str, Any]:
    from qexport.artifact.folder import Artifact
    from qexport.runtimes.tensorrt.engine import ENGINE_FILE, build_engine, settings_path

    artifact = Artifact.open(args.dir)
    engine = build_engine(artifact.model_path, artifact.folder / ENGINE_FILE, int8=args.int8, fp16=args.fp16,
                          workspace_mb=args.workspace, max_seq_len=args.max_seq_len, max_batch=args.max_batch)
    record = json.loads(settings_path(engine).read_text())
    if not args.json:
        print(f"built {engine} with TensorRT {record['tensorrt']} (settings in {settings_path(engine).name})")
    return record


COMMANDS = {"export": _cmd_export, "eval": _cmd_eval, "generate": _cmd_generate, "bench": _cmd_bench,
            "check": _cmd_check, "report": _cmd_report, "build-engine": _cmd_build_engine}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    try:
        result = COMMANDS[args.command](args)
    except QexportError as exc:
        print(f"qexport: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qexport: interrupted", file=sys.stderr)
        return 130
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2, sort_keys=True))
    return 0 if result.get("passed", True) else 1


if __name__ == "__main__":
    sys.exit(main())
