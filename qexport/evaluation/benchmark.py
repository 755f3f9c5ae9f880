"""Time prefill and decode of an exported model and of its PyTorch source, the same way."""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Any, Callable

import numpy as np

from qexport.artifact.folder import Artifact
from qexport.runtimes.causal_lm import CausalLM


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """How `qexport bench` times a model."""

    seq_len: int = 512
    decode_tokens: int = 64
    runs: int = 5
    warmup: int = 1
    threads: int = 2
    runtime: str = "ort-cpu"
    reference: bool = True
    seed: int = 0


def _median_seconds(fn: Callable[[], Any], runs: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_model(lm: CausalLM, vocab: int, settings: BenchSettings) -> dict[str, float]:
    """Prefill latency of ``seq_len`` tokens and decode throughput after it (KV cache), medians of ``runs``."""
    rng = np.random.default_rng(settings.seed)
    prompt = rng.integers(0, vocab, (1, settings.seq_len), dtype=np.int64)
    prefill_s = _median_seconds(lambda: lm.forward(prompt), settings.runs, settings.warmup)
    result = {"prefill_ms": prefill_s * 1e3, "prefill_tokens_per_s": settings.seq_len / prefill_s}
    if not lm.signature.kv_cache or settings.decode_tokens == 0:
        return result
    _, past = lm.forward(prompt)
    token = np.asarray([[1]], dtype=np.int64)

    def decode() -> None:
        cache = past
        for _ in range(settings.decode_tokens):
            mask = np.ones((1, cache[0].shape[2] + 1), dtype=np.int64)
            _, cache = lm.forward(token, mask, cache)

    decode_s = _median_seconds(decode, max(1, settings.runs // 2), settings.warmup)
    result["decode_ms_per_token"] = decode_s / settings.decode_tokens * 1e3
    result["decode_tokens_per_s"] = settings.decode_tokens / decode_s
    return result


def bench(folder: str | os.PathLike, settings: BenchSettings = BenchSettings()) -> dict[str, Any]:
    """Benchmark the exported model (and its PyTorch source unless ``reference`` is off)."""
    artifact = Artifact.open(folder)
    vocab = int(artifact.tokenizer().vocab_size)
    rows = {}
    lm = artifact.causal_lm(settings.runtime, threads=settings.threads)
    rows[lm.name] = time_model(lm, vocab, settings)
    if settings.reference:
        import torch

        torch.set_num_threads(settings.threads)
        ref = artifact.reference(threads=settings.threads)
        rows[ref.name] = time_model(ref, vocab, settings)
    result: dict[str, Any] = {"model": str(folder), "settings": dataclasses.asdict(settings), "results": rows}
    if settings.reference:
        ours, theirs = rows[lm.name], rows["pytorch"]
        result["prefill_speedup_vs_pytorch"] = theirs["prefill_ms"] / ours["prefill_ms"]
        if "decode_tokens_per_s" in ours:
            result["decode_speedup_vs_pytorch"] = ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"]
    return result


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """A plain-text table of timing rows."""
    keys = ["prefill_ms", "prefill_tokens_per_s", "decode_ms_per_token", "decode_tokens_per_s"]
    lines = [f"{'runtime':<20}" + "".join(f"{k:>24}" for k in keys)]
    for name, row in rows.items():
        lines.append(f"{name:<20}" + "".join(f"{row[k]:>24.2f}" if k in row else f"{'-':>24}" for k in keys))
    return "\n".join(lines)
