"""The names and KV-cache layout of an exported graph: what a runner is fed and returns."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class GraphSignature:
    """Names and KV-cache layout of an exported graph; stored in the manifest."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    kv_cache: bool
    uses_position_ids: bool
    dtype: str
    kv_dtype: str | None = None  # the cache's type where it is not ``dtype``: "int8" (quantize-kv)

    @property
    def cache_dtype(self) -> str:
        """The type of the past inputs and present outputs: ``kv_dtype``, else the model's ``dtype``."""
        return self.kv_dtype or self.dtype

    @property
    def past_names(self) -> list[str]:
        if not self.kv_cache:
            return []
        return [f"past_key_values.{i}.{kind}" for i in range(self.num_layers) for kind in ("key", "value")]

    @property
    def present_names(self) -> list[str]:
        if not self.kv_cache:
            return []
        return [f"present.{i}.{kind}" for i in range(self.num_layers) for kind in ("key", "value")]

    @property
    def input_names(self) -> list[str]:
        names = ["input_ids", "attention_mask"]
        if self.uses_position_ids:
            names.append("position_ids")
        return names + self.past_names

    @property
    def output_names(self) -> list[str]:
        return ["logits"] + self.present_names

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        if data["kv_dtype"] is None:  # a float cache: the manifest reads as it always has
            del data["kv_dtype"]
        return data

    @classmethod
    def from_json(cls, data: dict) -> "GraphSignature":
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)
                      if f.name in data or f.default is dataclasses.MISSING})
