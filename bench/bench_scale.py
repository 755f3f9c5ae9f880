"""How export and quantization grow with model size: the default model, a ~500M model and a 1.5B model.

The larger two have the shapes of real architectures (Qwen2.5-0.5B's and Qwen2.5-1.5B's configs, written out
below: nothing is downloaded) with random weights, saved once as float32 safetensors under ``--work`` and reused
by later runs; their tokenizer is the default model's (its ids fit their vocabulary). Each model goes through
three commands, each timed as its wall time with its peak resident memory (``wait4``'s ru_maxrss of the child):

1. ``qexport export MODEL`` (FP32; over 2 GB it is written with external data);
2. ``qexport export MODEL --recipe w8a8-dynamic`` (export, calibration, quantization, lowering);
3. ``qexport eval`` of the quantized folder (perplexity ratio to PyTorch FP32, which reloads the source).

Random weights give near-uniform logits, so the larger models' perplexity ratios only show that the pipeline ran
end to end, not its accuracy. Usage:

    python bench/bench_scale.py [--models default,qwen2.5-0.5b-shape,qwen2.5-1.5b-shape] [--work DIR]
        [--fp32-only MODELS] [--rss-limit-gib 20] [--calib-windows 4] [--calib-seq-len 256] [--eval-windows 2] [--eval-seq-len 256]
        [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import signal
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from table import markdown_table  # noqa: E402

# Architecture shapes (from the models' published config.json files), random weights.
SHAPES: dict[str, dict] = {
    "qwen2.5-0.5b-shape": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                               rope_theta=1000000.0, max_position_embeddings=32768, rms_norm_eps=1e-6),
    "qwen2.5-1.5b-shape": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                               rope_theta=1000000.0, max_position_embeddings=32768, rms_norm_eps=1e-6),
}
DEFAULT_MODELS = "default,qwen2.5-0.5b-shape,qwen2.5-1.5b-shape"


def random_model_folder(name: str, work: Path) -> Path:
    """The random-weight Hugging Face folder of shape ``name`` (built once; a half-built one is never reused)."""
    folder = work / name
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from qexport.exporter.loading import load_model, resolve_source

    tokenizer = load_model(resolve_source(None))[3]
    torch.manual_seed(0)
    config = Qwen2Config(**SHAPES[name], bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    del model
    os.replace(partial, folder)
    return folder


class OverMemory(RuntimeError):
    """The command passed the RSS limit and was stopped."""


def _watch(pid: int, limit_mib: float, stopped: list) -> None:
    """Kill ``pid`` if its resident memory passes ``limit_mib`` (so a model too large for the machine ends its row
    instead of the machine)."""
    status = Path(f"/proc/{pid}/status")
    while True:
        try:
            rss = next(int(line.split()[1]) / 1024 for line in status.read_text().splitlines()
                       if line.startswith("VmRSS"))
        except (OSError, StopIteration):
            return
        if rss > limit_mib:
            stopped.append(rss)
            os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.2)


def timed(command: list[str], limit_mib: float = float("inf")) -> dict:
    """Run ``command``; its wall seconds and the child's peak RSS in MiB, or an error with its last lines
    (:class:`OverMemory` when it passed ``limit_mib`` and was stopped)."""
    with tempfile.TemporaryFile("w+") as errors:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True)
        stopped: list = []
        threading.Thread(target=_watch, args=(process.pid, limit_mib, stopped), daemon=True).start()
        output = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)  # the child's own rusage (Popen.wait would discard it)
        process.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        if stopped:
            raise OverMemory(f"stopped after {seconds:.0f} s at {stopped[0]:.0f} MiB resident (limit {limit_mib:.0f})")
        if process.returncode != 0:
            errors.seek(0)
            tail = (errors.read() or output).strip().splitlines()[-3:]
            raise RuntimeError(f"{' '.join(command)} exited {process.returncode}: {' | '.join(tail)}")
    return {"seconds": round(seconds, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024), "output": output}


def weights_bytes(folder: Path) -> int:
    """Bytes of the initializers of an exported folder's ONNX model (inline or external)."""
    import onnx

    model = onnx.load(folder / "model.onnx", load_external_data=False)
    total = 0
    for tensor in model.graph.initializer:
        external = {e.key: e.value for e in tensor.external_data}
        total += int(external["length"]) if "length" in external else len(tensor.raw_data)
    return total


def run_model(name: str, work: Path, args, fp32_only: bool = False) -> dict:
    source = None if name == "default" else str(random_model_folder(name, work))
    qexport = [sys.executable, "-m", "qexport.cli", "-q"]
    model_arg = [] if source is None else [source]
    fp32, quant = work / "out" / f"{name}-fp32", work / "out" / f"{name}-w8a8"
    export = timed(qexport + ["export", *model_arg, "--out", str(fp32), "--force"])
    fp32_bytes = weights_bytes(fp32)
    files = sorted(p.name for p in fp32.iterdir() if p.name.startswith("model.onnx"))
    shutil.rmtree(fp32)  # room on disk for the next step
    if fp32_only:
        return {"model": name, "fp32_gb": fp32_bytes / 1e9, "fp32_files": files, "export": export}
    try:
        recipe = timed(qexport + ["export", *model_arg, "--out", str(quant), "--force", "--recipe", "w8a8-dynamic",
                                  "--calib-windows", str(args.calib_windows), "--calib-seq-len",
                                  str(args.calib_seq_len), "--no-difficulty"], args.rss_limit_gib * 1024)
    except OverMemory as error:
        return {"model": name, "fp32_gb": fp32_bytes / 1e9, "fp32_files": files, "export": export,
                "recipe_failed": str(error)}
    evaluation = timed(qexport + ["eval", str(quant), "--windows", str(args.eval_windows), "--seq-len",
                                  str(args.eval_seq_len), "--greedy-tokens", "8", "--json"])
    scores = json.loads(evaluation["output"])
    manifest = json.loads((quant / "qexport.json").read_text())
    return {"model": name, "fp32_gb": fp32_bytes / 1e9, "fp32_files": files, "export": export, "recipe": recipe,
            "eval": evaluation, "ppl_ratio": scores["ppl_ratio"], "w8a8_files": manifest["files"],
            "w8a8_gb": weights_bytes(quant) / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--work", type=Path, default=Path("bench-scale-work"))
    parser.add_argument("--calib-windows", type=int, default=4)
    parser.add_argument("--calib-seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=2)
    parser.add_argument("--eval-seq-len", type=int, default=256)
    parser.add_argument("--rss-limit-gib", type=float, default=20.0,
                        help="stop a w8a8-dynamic export that passes this resident memory (the row says so)")
    parser.add_argument("--fp32-only", default="", help="models (of --models) that get only the FP32 export")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    fp32_only = {n.strip() for n in args.fp32_only.split(",") if n.strip()}
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n != "default" and n not in SHAPES]
    if unknown:
        parser.error(f"unknown model {unknown}; choose from default, {', '.join(SHAPES)}")
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        print(f"[bench_scale] {name} ...", file=sys.stderr, flush=True)
        rows.append(run_model(name, args.work, args, fp32_only=name in fp32_only))
    if args.json:
        print(json.dumps([{k: v for k, v in r.items()} for r in rows], indent=2, default=str))
        return
    print(f"calibration {args.calib_windows} x {args.calib_seq_len} tokens, evaluation {args.eval_windows} x "
          f"{args.eval_seq_len}; peak RSS of each command (MiB)")
    print(markdown_table(
        ["model", "FP32 weights GB", "FP32 files", "export s", "export peak MiB", "peak / weights",
         "w8a8-dynamic export s", "its peak MiB", "w8a8 GB", "eval s", "eval peak MiB", "ppl ratio"],
        [[r["model"], f"{r['fp32_gb']:.2f}", "+".join(r["fp32_files"]), f"{r['export']['seconds']:.1f}",
          f"{r['export']['peak_rss_mib']}", f"{r['export']['peak_rss_mib'] * 2**20 / (r['fp32_gb'] * 1e9):.2f}",
          *([f"{r['recipe']['seconds']:.1f}", f"{r['recipe']['peak_rss_mib']}", f"{r['w8a8_gb']:.2f}",
             f"{r['eval']['seconds']:.1f}", f"{r['eval']['peak_rss_mib']}", f"{r['ppl_ratio']:.4f}"] if "recipe" in r
            else [r.get("recipe_failed", "not run")] + [""] * 5)] for r in rows],
        align="lllrrrrrrrrr"))


if __name__ == "__main__":
    main()
