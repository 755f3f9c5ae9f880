"""A causal LM step (prefill or decode with a KV cache) over any runner with the exported signature."""

from __future__ import annotations

import numpy as np

from qexport.runtimes.signature import GraphSignature
from qexport.runtimes.base import Runner

NUMPY_DTYPES = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8}


def position_ids_from_mask(attention_mask: np.ndarray, seq_len: int) -> np.ndarray:
    """Positions of the last ``seq_len`` tokens, counting only attended tokens (left padding safe)."""
    positions = np.cumsum(attention_mask, axis=-1) - 1
    positions = np.where(attention_mask == 0, 1, positions)
    return positions[:, -seq_len:].astype(np.int64)


class CausalLM:
    """Feeds a runner the exported signature: ids, mask, positions and past key/values."""

    def __init__(self, runner: Runner, signature: GraphSignature) -> None:
        self.runner = runner
        self.signature = signature
        self.kv_dtype = NUMPY_DTYPES[signature.cache_dtype]

    @property
    def name(self) -> str:
        return self.runner.name

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.signature.num_kv_heads, 0, self.signature.head_dim)
        return [np.zeros(shape, dtype=self.kv_dtype) for _ in self.signature.past_names]

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray | None = None,
        past: list[np.ndarray] | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Run one step; returns float32 logits [batch, seq, vocab] and the present key/values."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        batch, seq = input_ids.shape
        if self.signature.kv_cache and past is None:
            past = self.empty_past(batch)
        past_len = past[0].shape[2] if self.signature.kv_cache else 0
        if attention_mask is None:
            attention_mask = np.ones((batch, past_len + seq), dtype=np.int64)
        feeds = {"input_ids": input_ids, "attention_mask": np.asarray(attention_mask, dtype=np.int64)}
        if self.signature.uses_position_ids:
            feeds["position_ids"] = position_ids_from_mask(feeds["attention_mask"], seq)
        if self.signature.kv_cache:
            feeds.update(zip(self.signature.past_names, past))
        outputs = self.runner.infer(feeds)
        present = [outputs[name] for name in self.signature.present_names]
        return outputs["logits"].astype(np.float32, copy=False), present

