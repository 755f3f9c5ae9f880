"""Selecting sites and linears by name: one frozen filter of include and exclude globs.

Every pass setting that picks things by name (``sites``, ``linears``, ``exclude``) is a tuple of fnmatch globs
(case-sensitive), written in YAML as a list. A string is never split at commas: it is an error that shows the
list form, so ``exclude: "a,b"`` cannot silently mean one glob or two.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from typing import Any, Sequence

from qexport.errors import RecipeError


def list_form_error(where: str, key: str, value: str) -> RecipeError:
    """The error for a glob setting ``key`` given as the string ``value``: names ``where`` and shows the list."""
    parts = [g.strip() for g in value.split(",") if g.strip()] or [value]
    form = f"{key}: {json.dumps(parts)}"
    if len(parts) > 1:
        return RecipeError(f"{where}: {value!r} is one string; globs are not separated by commas but given as a "
                           f"list: {form}")
    return RecipeError(f"{where}: {value!r} is a string; globs are given as a list: {form}")


def glob_tuple(value: Any, key: str, where: str) -> tuple[str, ...]:
    """``value`` (a list or tuple of glob strings) as a tuple; anything else is a :class:`RecipeError` naming
    ``where`` (e.g. ``"smooth sites"``), a string one that shows the list form of ``key``."""
    if isinstance(value, str):
        raise list_form_error(where, key, value)
    if not isinstance(value, (list, tuple)) or not all(isinstance(g, str) for g in value):
        raise RecipeError(f"{where}: {value!r} is not allowed; expected a list of globs, e.g. {key}: [\"layers.*\"]")
    return tuple(value)


def check_glob_fields(settings: Any, where: str, *keys: str) -> None:
    """Check the glob fields ``keys`` of the frozen dataclass ``settings`` (a pass) and store them as tuples;
    ``where`` names it in errors (``"quantize"``)."""
    for key in keys:
        object.__setattr__(settings, key, glob_tuple(getattr(settings, key), key, f"{where} {key}"))


@dataclasses.dataclass(frozen=True)
class NameFilter:
    """Names matching some ``include`` glob and no ``exclude`` glob.

    A candidate may go by several names (a linear: its role name ``layers.3.mlp.down``, node name and weight
    name): a glob matches the candidate when it matches any of them. No ``include`` glob selects nothing.
    """

    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "include", glob_tuple(self.include, "include", "name filter include"))
        object.__setattr__(self, "exclude", glob_tuple(self.exclude, "exclude", "name filter exclude"))

    def included(self, *names: str) -> bool:
        """Whether some ``include`` glob matches one of ``names``."""
        return _any_match(names, self.include)

    def excluded(self, *names: str) -> bool:
        """Whether some ``exclude`` glob matches one of ``names``."""
        return _any_match(names, self.exclude)

    def matches(self, *names: str) -> bool:
        """Included and not excluded."""
        return self.included(*names) and not self.excluded(*names)

    def check_excludes(self, candidates: Sequence[Sequence[str]], *, what: str = "names", key: str = "include",
                       shown_as: str = "names", note: str = "", hint: str = "") -> None:
        """Raise :class:`RecipeError` for the first ``exclude`` glob matching none of ``candidates`` (the names of
        each thing ``include`` selected, display name first): such a glob is a typo, not a no-op. ``what``,
        ``key`` and ``shown_as`` word the message (``linears``, ``linears``, ``role names``); ``note`` and
        ``hint`` add to it."""
        for glob in self.exclude:
            if any(_any_match(names, (glob,)) for names in candidates):
                continue
            valid = [names[0] for names in candidates if names and names[0]]
            shown = ", ".join(valid[:4] + (["...", valid[-1]] if len(valid) > 5 else valid[4:]))
            raise RecipeError(f"exclude glob {glob!r} matches none of the {len(candidates)} {what} selected by "
                              f"{key}={list(self.include)!r}{note}; {shown_as} look like: {shown or 'none found'}. "
                              f"Fix the glob{hint}")


def _any_match(names: Sequence[str], globs: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, glob) for name in names for glob in globs)
