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
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "GraphSignature":
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})
