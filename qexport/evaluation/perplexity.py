"""Evaluate an exported model against its PyTorch source: perplexity, logits parity, greedy agreement."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from qexport import numerics
from qexport.artifact.folder import Artifact
from qexport.runtimes.causal_lm import CausalLM
from qexport.runtimes.generate import GenerationSettings, generate
from qexport.exporter.text import TextSource, default_bos, load_text, text_source, token_windows

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What `qexport eval` measures."""

    windows: int = 4
    seq_len: int = 512
    greedy_tokens: int = 32
    prompt_tokens: int = 32
    runtime: str = "ort-cpu"
    threads: int | None = None
    reference: bool = True


def token_nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of each next token (float64); logits [S, V], ids [S] → [S-1]."""
    x = logits[:-1].astype(np.float64)
    peak = x.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(x - peak).sum(axis=-1)) + peak[:, 0]
    return log_z - x[np.arange(len(x)), ids[1:]]


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two generations share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _check_overlap(artifact: Artifact, source: TextSource) -> None:
    calibration = artifact.manifest.get("calibration") or {}
    if calibration.get("source") == source.to_json() and source.kind in ("file", "dataset"):  # built-ins: halves
        log.warning("the evaluation text is the same source the model was calibrated on: results will be optimistic")


def evaluate(
    folder: str | os.PathLike,
    text: str | None = None,
    dataset: str | None = None,
    settings: EvalSettings = EvalSettings(),
) -> dict[str, Any]:
    """Evaluate the exported model in ``folder``; returns the metrics as a JSON-ready dict."""
    start = time.perf_counter()
    artifact = Artifact.open(folder)
    source = text_source(text, dataset)
    _check_overlap(artifact, source)
    tokenizer = artifact.tokenizer()
    windows = token_windows(tokenizer, load_text(source, "evaluation"), settings.seq_len, settings.windows, source.describe())
    lm = artifact.causal_lm(settings.runtime, threads=settings.threads)
    ref = artifact.reference(threads=settings.threads) if settings.reference else None

    nll, nll_ref, max_abs, cosines = [], [], 0.0, []
    for ids in tqdm(windows, desc="evaluating windows", disable=None):
        logits, _ = lm.forward(ids[None])
        nll.append(token_nll(logits[0], ids))
        if ref is not None:
            ref_logits, _ = ref.forward(ids[None])
            nll_ref.append(token_nll(ref_logits[0], ids))
            max_abs = max(max_abs, numerics.max_abs_diff(logits, ref_logits))
            cosines.append(numerics.row_cosines(logits[0], ref_logits[0], floor="add"))

    result: dict[str, Any] = {
        "model": str(folder),
        "runtime": lm.name,
        "text_source": source.describe(),
        "windows": len(windows),
        "seq_len": settings.seq_len,
        "bos_prefixed": default_bos(tokenizer) is not None,  # each window starts with BOS, which is never scored
        "tokens_scored": int(sum(len(x) for x in nll)),
        "ppl": float(np.exp(np.concatenate(nll).mean())),
    }
    if ref is not None:
        result["ppl_reference"] = float(np.exp(np.concatenate(nll_ref).mean()))
        result["ppl_ratio"] = result["ppl"] / result["ppl_reference"]
        result["max_abs_logit_diff"] = max_abs
        all_cos = np.concatenate(cosines)
        result["logit_cosine"] = float(all_cos.mean())
        result["logit_cosine_min"] = float(all_cos.min())
        result.update(greedy_agreement(lm, ref, windows[0][: settings.prompt_tokens], settings.greedy_tokens))
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def greedy_agreement(lm: CausalLM, ref: CausalLM, prompt: np.ndarray, tokens: int) -> dict[str, Any]:
    """Greedy-generate ``tokens`` tokens with the KV cache on both models; count the shared prefix."""
    gen = GenerationSettings(max_new_tokens=tokens, greedy=True, stop_at_eos=False)
    ours = generate(lm, prompt.tolist(), gen)
    theirs = generate(ref, prompt.tolist(), gen)
    return {"greedy_match": common_prefix(ours, theirs), "greedy_tokens": tokens}
