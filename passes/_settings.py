"""Checks a pass runs on its own settings in ``__post_init__`` (so a bad recipe value fails when it is read)."""

from __future__ import annotations

import enum
from typing import Any

from qexport.errors import RecipeError


def coerce_enums(settings: Any, where: str, **fields: type[enum.Enum]) -> None:
    """Store each field of the frozen dataclass ``settings`` named in ``fields`` as a member of its enum (YAML gives
    the value); an unknown value is a :class:`RecipeError` naming ``where`` (the pass), the field and the choices."""
    for key, kind in fields.items():
        value = getattr(settings, key)
        try:
            object.__setattr__(settings, key, kind(value))
        except ValueError:
            raise RecipeError(f"{where} {key} must be one of {[m.value for m in kind]}, got {value!r}") from None
