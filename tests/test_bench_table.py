"""bench/table.py: the markdown tables of the bench scripts (its doctest, and the errors for a malformed table)."""

from __future__ import annotations

import doctest
import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("bench_table", Path(__file__).parents[1] / "bench" / "table.py")
table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(table)


def test_the_doctest_table():
    result = doctest.testmod(table)
    assert result.attempted == 1 and result.failed == 0


def test_alignment_and_empty_cells():
    text = table.markdown_table(["a", "b", "c"], [["x", "", "1.5"]], align="lrr")
    assert text == "| a | b | c |\n|---|---:|---:|\n| x | | 1.5 |"
    assert table.markdown_table(["a"], []) == "| a |\n|---|"


def test_a_malformed_table_is_an_error():
    with pytest.raises(ValueError, match="a row has 1 cells, the header 2"):
        table.markdown_table(["a", "b"], [["x"]])
    with pytest.raises(ValueError, match="one of 'l' or 'r' per column"):
        table.markdown_table(["a", "b"], [], align="lc")
