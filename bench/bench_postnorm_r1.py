"""Benchmark R1 on a post-norm (Gemma3) stream: the online post-norm rotation against smoothing without R1.

A random-weight Gemma3 text model of a real shape (default Gemma3-270M: hidden 640, 18 layers, intermediate 2048,
4 heads, 1 KV head, head_dim 256, 5 local : 1 global layers) with its vocabulary cut to ``--vocab`` (32768 by
default, so the lm_head does not dominate the timing) is exported FP32 once. Then the ``w8a8-dynamic`` preset is
applied in each variant, written out here so the rows do not move when the preset adaptation changes:

- ``smooth, no R1``: R1 removed, SmoothQuant (alpha 0.5) at the norm sites in its place (R2, R4 kept);
- ``R1 online, full``: ``rotate-residual`` with ``post_norm: online`` and the full Hadamard (two small MatMuls
  above ``max_dense``), or ``dense`` (one hidden x hidden MatMul per post-norm);
- ``R1 online, block B``: the block-diagonal I ⊗ H_B (one MatMul per post-norm).

Speed: ONNX Runtime CPU, 2 threads, prefill of ``--seq-len`` tokens and decode tokens/s, medians of ``--rounds``
interleaved rounds (fresh sessions, the order rotated each round), as ``bench/bench_quant.py`` times them.
Logits SQNR and cosine against the FP32 export on random tokens are a sanity figure only: with random weights they
say the graph still computes the model, not how well a trained model quantizes (that needs perplexity on real
weights). Usage:
    python bench/bench_postnorm_r1.py [--layers 18] [--vocab 32768] [--blocks 128,32] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from qexport import numerics
from qexport.artifact.folder import MODEL_FILE, Artifact
from qexport.evaluation.benchmark import BenchSettings, time_model
from qexport.recipes.schema import Recipe, load_recipe
from recipe_run import apply_to_export  # bench/recipe_run.py, beside this script
from table import markdown_table  # bench/table.py, beside this script

log = logging.getLogger("bench_postnorm_r1")
PRESET = "w8a8-dynamic"
NORM_SMOOTHING = {"pass": "smooth", "method": "smoothquant", "alpha": 0.5, "sites": ["layers.*_norm", "final_norm"]}


def gemma3_source(folder: Path, layers: int, vocab: int, seed: int = 0) -> Path:
    """A random-weight Gemma3-270M-shaped model and a byte-level tokenizer saved to ``folder``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

    config = Gemma3TextConfig(
        vocab_size=vocab, hidden_size=640, intermediate_size=2048, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, sliding_window=512, query_pre_attn_scalar=256,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)],
        max_position_embeddings=32768, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # Gemma's norm weights start at 0 (scale 1 + w): give every norm its own scale
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(folder)
    vocab_map = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab_map[ch] = len(vocab_map)
    tok = Tokenizer(models.BPE(vocab=vocab_map, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    return folder


def variants(blocks: list[int], dense: bool) -> dict[str, Recipe]:
    """Row name -> the ``w8a8-dynamic`` recipe in that variant."""
    written = [e.to_dict() for e in load_recipe(PRESET).passes]
    r1 = next(i for i, e in enumerate(written) if e["pass"] == "rotate-residual")

    def with_r1(**settings: Any) -> list[dict]:
        return written[:r1] + [{**written[r1], "post_norm": "online", **settings}] + written[r1 + 1:]

    found = {"smooth, no R1 (today's adaptation)": written[:r1] + [NORM_SMOOTHING] + written[r1 + 1:],
             "R1 online, full H": with_r1()}
    if dense:
        found["R1 online, full H dense"] = with_r1(max_dense=1 << 16)
    for b in blocks:
        found[f"R1 online, block {b}"] = with_r1(block=b)
    return {name: Recipe.from_dict({"name": f"{PRESET}-{i}", "passes": passes}) for i, (name, passes) in enumerate(found.items())}


def apply(fp32: Path, out: Path, recipe: Recipe, windows: list) -> float:
    """``recipe`` applied to the FP32 export and saved beside a copy of its other files; returns seconds."""
    return apply_to_export(fp32, out, recipe, windows)


def logits_agreement(folder: Path, fp32: Path, tokens: int, vocab: int) -> tuple[float, float]:
    """(SQNR dB, cosine) of ``folder``'s logits against the FP32 export's on one random prompt."""
    prompt = np.random.default_rng(1).integers(3, vocab, (1, tokens), dtype=np.int64)
    got = Artifact.open(folder).causal_lm("ort-cpu", threads=2).forward(prompt)[0]
    want = Artifact.open(fp32).causal_lm("ort-cpu", threads=2).forward(prompt)[0]
    return numerics.sqnr_db(want, got), numerics.cosine(want, got)


def timed(folders: dict[str, Path], settings: BenchSettings, vocab: int, rounds: int) -> dict[str, dict[str, float]]:
    """Median prefill ms (and range) and decode tokens/s per model over interleaved rounds of fresh sessions."""
    names = list(folders)
    samples: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for index in range(rounds):
        for name in names[index % len(names):] + names[:index % len(names)]:
            log.info("timing %s (round %d of %d)", name, index + 1, rounds)
            lm = Artifact.open(folders[name]).causal_lm("ort-cpu", threads=settings.threads)
            samples[name].append(time_model(lm, vocab, settings))
    return {name: {"prefill_ms": statistics.median(r["prefill_ms"] for r in runs),
                   "prefill_range": (min(r["prefill_ms"] for r in runs), max(r["prefill_ms"] for r in runs)),
                   "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in runs)}
            for name, runs in samples.items()}


def online_nodes(folder: Path) -> int:
    """How many nodes the passes inserted as online transforms (R1's post-norm rotations and R4)."""
    import onnx_ir as ir

    from qexport.passes.metadata import Meta

    return sum(Meta.ONLINE_HADAMARD in n.metadata_props for n in ir.load(folder / MODEL_FILE).graph)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--blocks", default="128,32", help="block sizes of the block-diagonal rows (comma-separated)")
    p.add_argument("--dense", action=argparse.BooleanOptionalAction, default=True, help="the dense full-H row")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--calib-windows", type=int, default=4)
    p.add_argument("--runs", type=int, default=5, help="timed prefills per session (decode: half)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--time-fp32", action=argparse.BooleanOptionalAction, default=False,
                   help="time the FP32 export too (by default it is only the logits reference)")
    p.add_argument("--work", default=None, help="folder to build in (default: a temporary folder)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import qexport
    from qexport.exporter.text import load_text, parse_source, token_windows

    settings = BenchSettings(seq_len=args.seq_len, decode_tokens=args.decode_tokens, runs=args.runs, reference=False)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp_name:
        tmp = Path(tmp_name)
        fp32 = qexport.export(str(gemma3_source(tmp / "hf", args.layers, args.vocab)), tmp / "fp32")
        tokenizer = Artifact.open(fp32).tokenizer()
        windows = token_windows(tokenizer, load_text(parse_source(None), "calibration"), args.seq_len, args.calib_windows)
        folders, rows = {"fp32": fp32}, {"fp32": {"seconds": None, "sqnr_db": None, "cosine": None}}
        for i, (name, recipe) in enumerate(variants([int(b) for b in args.blocks.split(",") if b], args.dense).items()):
            log.info("building %s", name)
            folders[name] = tmp / f"v{i}"
            seconds = apply(fp32, folders[name], recipe, windows)
            sqnr, cosine = logits_agreement(folders[name], fp32, 256, args.vocab)
            rows[name] = {"seconds": seconds, "sqnr_db": sqnr, "cosine": cosine}
        for name, folder in folders.items():
            rows[name]["online_nodes"] = online_nodes(folder)
        timed_folders = {name: folder for name, folder in folders.items() if name != "fp32" or args.time_fp32}
        for name, speed in timed(timed_folders, settings, args.vocab, args.rounds).items():
            rows[name].update(speed)
    base = rows["smooth, no R1 (today's adaptation)"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"\nGemma3-270M shape, random weights, {args.layers} layers, vocab {args.vocab}; {PRESET}; ORT CPU, 2 threads; "
          f"prefill {args.seq_len} tokens, decode {args.decode_tokens} tokens after it; medians of {args.rounds} "
          "interleaved rounds; 'vs smooth' = speed relative to the no-R1 row; SQNR/cosine of the logits against FP32 "
          "on 256 random tokens (random weights: a sanity figure, not a perplexity)\n")
    header = ["variant", "prefill ms", "prefill range", "prefill vs smooth", "decode tok/s", "decode vs smooth",
              "online nodes", "logits SQNR dB", "cosine"]
    lines = [[name, f"{r['prefill_ms']:.0f}", "{:.0f}-{:.0f}".format(*r["prefill_range"]),
              f"{base['prefill_ms'] / r['prefill_ms']:.3f}", f"{r['decode_tokens_per_s']:.1f}",
              f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.3f}", str(r["online_nodes"]),
              "-" if r["sqnr_db"] is None else f"{r['sqnr_db']:.2f}", "-" if r["cosine"] is None else f"{r['cosine']:.5f}"]
             for name, r in rows.items() if "prefill_ms" in r]
    print(markdown_table(header, lines, align="l" + "r" * (len(header) - 1)))


if __name__ == "__main__":
    main()
