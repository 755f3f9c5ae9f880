"""Text sources: the default split is disjoint, files and datasets fail clearly."""

from __future__ import annotations

import numpy as np
import pytest

from qexport.errors import TextSourceError
from qexport.exporter.text import TextSource, load_text, parse_source, pydoc_text, token_windows


def test_pydoc_halves_are_disjoint_and_cover_the_topics():
    from pydoc_data.topics import topics

    evaluation, calibration = pydoc_text("evaluation"), pydoc_text("calibration")
    assert len(evaluation) > 100_000 and len(calibration) > 100_000
    for text in topics.values():
        if len(text) > 200:
            assert (text in evaluation) != (text in calibration)


def test_file_source(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("hello world " * 10)
    assert load_text(parse_source(str(path)), "calibration").startswith("hello world")
    with pytest.raises(TextSourceError, match="not found"):
        parse_source(str(tmp_path / "missing.txt"))


def test_token_windows_do_not_overlap():
    class CountingTokenizer:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(range(len(text.split())))}

    windows = token_windows(CountingTokenizer(), "w " * 100, seq_len=30, count=5)
    assert len(windows) == 3  # 100 tokens hold three whole windows of 30
    joined = np.concatenate(windows)
    assert len(set(joined.tolist())) == len(joined)


def test_dataset_source_fails_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(TextSourceError, match="--text FILE"):
        load_text(TextSource("dataset", "qexport-test-org/no-such-dataset"), "evaluation")
