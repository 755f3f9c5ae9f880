"""Bad input gets a clear error naming the problem, and no half-written output."""

from __future__ import annotations


import pytest

import qexport
from qexport.errors import (
    ModelSourceError,
    OutputExistsError,
    QexportError,
    TextSourceError,
    UnsupportedModelError,
)


def test_missing_path(tmp_path):
    with pytest.raises(ModelSourceError, match="not found"):
        qexport.export(str(tmp_path / "nope" / "model"), tmp_path / "out")
    with pytest.raises(ModelSourceError, match="GGUF file not found"):
        qexport.export(str(tmp_path / "missing.gguf"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="no config.json"):
        qexport.export(str(tmp_path / "empty"), tmp_path / "out")


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config

    folder = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(folder)
    with pytest.raises(UnsupportedModelError, match="'gpt2' is not supported.*llama"):
        qexport.export(str(folder), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_corrupt_gguf(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelSourceError, match="not a GGUF file"):
        qexport.export(str(junk), tmp_path / "out")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 20)
    with pytest.raises(ModelSourceError, match="could not load"):
        qexport.export(str(truncated), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_offline_hub_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="offline.*local folder"):
        qexport.export("qexport-test-org/no-such-model", tmp_path / "out")


def test_existing_output_refused_unless_force(tiny_source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(OutputExistsError, match="--force"):
        qexport.export(str(tiny_source("llama")), out)
    assert (out / "keep.txt").read_text() == "user data"
    qexport.export(str(tiny_source("llama")), out, force=True)
    assert (out / "model.onnx").is_file() and not (out / "keep.txt").exists()


def test_failed_export_leaves_nothing(tiny_source, tmp_path, monkeypatch):
    import qexport.api

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure in the middle of the export")

    monkeypatch.setattr(qexport.api, "export_graph", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        qexport.export(str(tiny_source("llama")), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_eval_on_a_folder_that_is_not_an_export(tmp_path):
    with pytest.raises(QexportError, match="not a qexport output folder"):
        qexport.evaluate(tmp_path)


def test_empty_and_too_short_text(tiny_export, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(TextSourceError, match="empty"):
        qexport.evaluate(tiny_export("llama"), text=str(empty))
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(TextSourceError, match="fewer than one window of 512"):
        qexport.evaluate(tiny_export("llama"), text=str(short))
    with pytest.raises(TextSourceError, match="not found"):
        qexport.evaluate(tiny_export("llama"), text=str(tmp_path / "missing.txt"))


def test_cli_prints_one_line_error_and_exits_2(tmp_path, capsys):
    from qexport.cli import main

    code = main(["export", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("qexport: error: GGUF file not found") and "Traceback" not in err
