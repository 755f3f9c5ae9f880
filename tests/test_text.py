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


def _fake_pages(root, names, words=120):
    import gzip

    for name in names:
        section = root / "man1"
        section.mkdir(parents=True, exist_ok=True)
        body = " ".join(f"{name}word{i}" for i in range(words))
        roff = f'.TH {name.upper()} 1\n.\\" a comment\n.SH NAME\n{name} \\- a tool\n.SH DESCRIPTION\n\\fB{name}\\fR {body}\n'
        (section / f"{name}.1.gz").write_bytes(gzip.compress(roff.encode()))


def test_roff_to_text_keeps_the_prose_and_drops_the_markup():
    from qexport.exporter.machine_text import roff_to_text

    source = ('.TH LS 1 "2024" "GNU"\n.\\" comment line\n.de XX\n.ft B\n..\n.SH NAME\nls \\- list directory\n'
              '.SH DESCRIPTION\nList information about the \\fIFILE\\fRs (the current directory by default).\n'
              '.TP\n.B \\-a\ndo not ignore entries starting with \\(aq.\\(aq\n.TS\ntab;\n.TE\n')
    assert roff_to_text(source) == ("NAME\n\nls - list directory\n\nDESCRIPTION\n\n"
                                    "List information about the FILEs (the current directory by default).\n\n"
                                    "-a do not ignore entries starting with '.'")


def test_manpage_halves_are_disjoint_and_few_pages_per_tool(tmp_path, monkeypatch):
    from qexport.exporter import machine_text

    names = [f"tool{i}" for i in range(16)] + [f"cloud-sub{i}" for i in range(12)]
    _fake_pages(tmp_path, names)
    monkeypatch.setattr(machine_text, "MAN_ROOT", tmp_path)
    halves = [machine_text.manpages_text(purpose) for purpose in machine_text.PURPOSES]
    found = [{n for n in names if f"{n}word0 " in half} for half in halves]
    assert not found[0] & found[1]
    assert {f"tool{i}" for i in range(16)} <= found[0] | found[1]  # every distinct tool lands in one half
    assert sum(n.startswith("cloud") for n in found[0] | found[1]) <= 2 * machine_text.PAGES_PER_PREFIX
    assert "\\f" not in halves[0] and ".SH" not in halves[0]


def test_a_missing_domain_is_a_clear_error(tmp_path, monkeypatch):
    from qexport.errors import TextSourceError
    from qexport.exporter import machine_text, text

    monkeypatch.setattr(machine_text, "MAN_ROOT", tmp_path / "nothing")
    with pytest.raises(TextSourceError, match="manual pages"):
        load_text(parse_source("manpages"), "evaluation")
    assert text.parse_source(None) == TextSource()  # the default needs no manual pages


def test_a_mix_alternates_its_domains(tmp_path, monkeypatch):
    from qexport.exporter import text

    fake = {"pydoc": lambda p: "\n\n".join(f"P{p[0]}{i} " + "p" * 900 for i in range(8)),
            "manpages": lambda p: "\n\n".join(f"M{p[0]}{i} " + "m" * 900 for i in range(20))}
    monkeypatch.setattr(text, "DOMAINS", fake)
    source = text.parse_source("pydoc+manpages")
    assert source == TextSource("mix", "pydoc+manpages")
    mixed = text.load_text(source, "calibration")
    order = [piece[:1] for piece in mixed.split("\n\n")]
    # chunks of about 2,000 characters (three 900-character paragraphs), alternating, until pydoc runs out
    assert order == ["P"] * 3 + ["M"] * 3 + ["P"] * 3 + ["M"] * 3 + ["P"] * 2 + ["M"] * 3
    assert "Pe" not in mixed and "Me" not in mixed  # calibration halves only


def test_builtin_domain_names_and_their_errors(tmp_path, monkeypatch):
    from qexport.errors import TextSourceError
    from qexport.exporter.text import text_source

    assert parse_source("gitnotes") == TextSource("gitnotes")
    assert text_source("manpages") == TextSource("manpages")
    assert parse_source("pydoc+gitnotes") == TextSource("mix", "pydoc+gitnotes")
    with pytest.raises(TextSourceError, match="twice"):
        parse_source("pydoc+pydoc")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "manpages").write_text("a user's own file wins over the built-in name")
    assert text_source("manpages") == TextSource("file", "manpages")


def test_machine_mixes_the_domains_this_machine_has_and_falls_back_to_the_documentation(tmp_path, monkeypatch, caplog):
    from qexport.exporter import machine_text

    _fake_pages(tmp_path, [f"tool{i}" for i in range(16)])
    monkeypatch.setattr(machine_text, "MAN_ROOT", tmp_path)
    source = parse_source("machine")
    # the manifest names what was used, not "machine"; git's release notes stay unseen by it
    assert source == TextSource("mix", "pydoc+manpages")
    mixed = load_text(source, "calibration")
    assert "word0" in mixed and pydoc_text("calibration")[:200] in mixed
    monkeypatch.setattr(machine_text, "MAN_ROOT", tmp_path / "nothing")
    with caplog.at_level("WARNING"):
        assert parse_source("machine") == TextSource("pydoc")
    assert "no manpages text" in caplog.text
