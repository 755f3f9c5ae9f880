"""Whether a report's evaluation text is of the domains its model was calibrated on (a domain gap, not a bug)."""

from __future__ import annotations

from typing import Any

BUILTIN = ("pydoc", "manpages", "gitnotes")


def _domains(source: dict[str, Any]) -> set[str]:
    kind, location = source.get("kind", "pydoc"), source.get("location")
    if kind == "mix":
        return set((location or "").split("+"))
    return {kind} if kind in BUILTIN else {f"{kind}:{location}"}


def text_agreement(calibration: dict[str, Any], evaluation: Any, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether the evaluation text is of a domain the model was calibrated on, and how much of it the calibrated
    static activation ranges clip (the most clipped site), so that a reader can tell a domain gap from a bug."""
    seen = _domains(calibration["source"]) if "source" in calibration else set()
    evaluated = _domains(evaluation.to_json())
    clipped = [(r["clipped_fraction"], r["site"]) for r in rows if r.get("clipped_fraction") is not None]
    worst = max(clipped, default=None)
    return {"calibration": ", ".join(sorted(seen)) or None, "evaluation": ", ".join(sorted(evaluated)),
            "shared_domains": sorted(seen & evaluated), "agree": bool(evaluated <= seen),
            "max_clipped_fraction": worst[0] if worst else None, "most_clipped_site": worst[1] if worst else None}


def texts_line(texts: dict[str, Any]) -> str:
    line = f"calibration text: {texts['calibration'] or 'unknown'}; evaluation text: {texts['evaluation']}"
    if texts["calibration"] and not texts["agree"]:
        unseen = "none of whose" if not texts["shared_domains"] else "not all of whose"
        line += (f" ({unseen} domains the calibration saw: figures measure how the calibration carries over to new "
                 "text, and are expected to be worse than on calibration-like text)")
    if texts["max_clipped_fraction"] is not None:
        line += (f"; the calibrated activation ranges clip at most {100 * texts['max_clipped_fraction']:.3f}% of this "
                 f"text's values ({texts['most_clipped_site']})")
    return line
