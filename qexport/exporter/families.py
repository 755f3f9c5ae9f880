"""The model families qexport supports, and what their export needs."""

from __future__ import annotations

import dataclasses

from qexport.errors import UnsupportedModelError


@dataclasses.dataclass(frozen=True)
class Family:
    """What qexport knows about one architecture family."""

    name: str
    model_types: tuple[str, ...]
    uses_position_ids: bool = True


FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama", "mistral")),
    Family("qwen2", ("qwen2",)),
    Family("gemma3", ("gemma3_text",)),
    Family("opt", ("opt",), uses_position_ids=False),
)


def family_for(model_type: str) -> Family:
    """Return the family of a Hugging Face ``model_type``, or raise a clear error."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise UnsupportedModelError(
        f"architecture {model_type!r} is not supported by qexport; supported model types: {supported}"
    )
