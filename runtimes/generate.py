"""Text generation with a KV cache (prefill, then one token a step) on any :class:`CausalLM`."""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import numpy as np

from qexport.runtimes.causal_lm import CausalLM


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """How tokens are chosen; greedy by default."""

    max_new_tokens: int = 32
    greedy: bool = True
    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 0.9
    seed: int = 0
    stop_at_eos: bool = True


def _sample(logits: np.ndarray, settings: GenerationSettings, rng: np.random.Generator) -> int:
    if settings.greedy:
        return int(np.argmax(logits))
    logits = logits.astype(np.float64) / max(settings.temperature, 1e-5)
    order = np.argsort(-logits)[: max(settings.top_k, 1)]
    probs = np.exp(logits[order] - logits[order[0]])
    probs /= probs.sum()
    keep = int(np.searchsorted(np.cumsum(probs), settings.top_p) + 1)
    probs = probs[:keep] / probs[:keep].sum()
    return int(order[rng.choice(keep, p=probs)])


def generate(
    lm: CausalLM,
    prompt_ids: Iterable[int],
    settings: GenerationSettings = GenerationSettings(),
    eos_token_ids: Iterable[int] = (),
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """Generate up to ``max_new_tokens`` after the prompt; returns only the new token ids."""
    ids = np.asarray([list(prompt_ids)], dtype=np.int64)
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty")
    eos = set(eos_token_ids) if settings.stop_at_eos else set()
    rng = np.random.default_rng(settings.seed)
    new: list[int] = []
    logits, past = lm.forward(ids)
    for _ in range(settings.max_new_tokens):
        token = _sample(logits[0, -1], settings, rng)
        new.append(token)
        if on_token is not None:
            on_token(token)
        if token in eos:
            break
        if lm.signature.kv_cache:
            total = past[0].shape[2] + 1
            logits, past = lm.forward(np.asarray([[token]]), np.ones((1, total), dtype=np.int64), past)
        else:
            ids = np.concatenate([ids, [[token]]], axis=1)
            logits, _ = lm.forward(ids)
    return new
