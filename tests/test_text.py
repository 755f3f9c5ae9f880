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


def _bos_tokenizer(adds_bos: bool):
    """The tiny models' byte tokenizer, with a post-processor that puts <s> first when ``adds_bos`` (as Gemma's)."""
    from tokenizers import processors

    from tiny_models import _byte_tokenizer

    tok = _byte_tokenizer()
    if adds_bos:
        tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def test_windows_start_with_bos_where_the_tokenizer_adds_it_by_default():
    from qexport.exporter.text import default_bos

    text = "the quick brown fox jumps over the lazy dog " * 4
    plain = token_windows(_bos_tokenizer(False), text, seq_len=16, count=3)
    with_bos = token_windows(_bos_tokenizer(True), text, seq_len=16, count=3)
    assert default_bos(_bos_tokenizer(False)) is None and default_bos(_bos_tokenizer(True)) == 1
    assert all(w[0] != 1 for w in plain) and all(len(w) == 16 for w in plain + with_bos)
    assert all(w[0] == 1 for w in with_bos)  # BOS, then 15 text tokens
    ids = _bos_tokenizer(True)(text, add_special_tokens=False)["input_ids"]
    assert np.concatenate([w[1:] for w in with_bos]).tolist() == ids[: 3 * 15]  # contiguous, nothing skipped
