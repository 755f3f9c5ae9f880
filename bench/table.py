"""The markdown tables the bench scripts print: one header, an alignment row, one line per row of cells.

>>> print(markdown_table(["model", "ppl"], [["fp32", "12.345"], ["int8", ""]], align="lr"))
| model | ppl |
|---|---:|
| fp32 | 12.345 |
| int8 | |
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

_ALIGN = {"l": "---", "r": "---:"}


def markdown_line(cells: Sequence[str]) -> str:
    """One table line; an empty cell is a single space, as GitHub renders it."""
    return "|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str | None = None) -> str:
    """The table as text, without a trailing newline. ``align`` has one letter per column, ``l`` (the default) or
    ``r``; the cells are already formatted strings, and a row may have as many cells as the header, no other number."""
    align = align or "l" * len(header)
    if len(align) != len(header) or set(align) - set(_ALIGN):
        raise ValueError(f"align {align!r}: give one of 'l' or 'r' per column ({len(header)} columns)")
    lines = [markdown_line(header), "|" + "|".join(_ALIGN[a] for a in align) + "|"]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"a row has {len(row)} cells, the header {len(header)}: {list(row)}")
        lines.append(markdown_line(row))
    return "\n".join(lines)
