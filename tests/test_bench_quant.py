"""bench/bench_quant.py without running it: --eval-text parsing, the builder's command lines, the table's columns."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from qexport.errors import TextSourceError
from qexport.exporter.text import TextSource, text_source

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
import bench_quant  # noqa: E402  (bench/ is not a package; the script imports its siblings the same way)
import genai_builder  # noqa: E402


def test_eval_text_defaults_to_the_evaluation_default():
    assert bench_quant.eval_sources(None) == [text_source()]
    assert bench_quant.parser().parse_args([]).eval_text is None


def test_eval_text_is_one_source_per_item(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("some text")
    sources = bench_quant.eval_sources(f"pydoc, gitnotes,pydoc+manpages,{text}")
    assert sources == [TextSource("pydoc"), TextSource("gitnotes"), TextSource("mix", "pydoc+manpages"),
                       TextSource("file", str(text))]
    assert [bench_quant.domain_label(s) for s in sources] == ["pydoc", "gitnotes", "pydoc+manpages", "notes.txt"]
    assert bench_quant.domain_label(TextSource("dataset", "wikitext:wikitext-2-raw-v1")) == "wikitext:wikitext-2-raw-v1"


@pytest.mark.parametrize("spec, message", [("pydoc,,gitnotes", "empty item"), ("pydoc,pydoc", "names a domain twice"),
                                           ("./missing.txt", "text file not found")])
def test_a_bad_eval_text_is_a_clear_error(spec, message):
    with pytest.raises(TextSourceError, match=message):
        bench_quant.eval_sources(spec)


def test_evaluate_args_resolve_back_to_the_same_source(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("some text")
    for source in bench_quant.eval_sources(f"pydoc,manpages,pydoc+gitnotes,{text},wikitext"):
        args = bench_quant.evaluate_args(source)
        assert text_source(args.get("text"), args.get("dataset")) == source


def test_builder_flag():
    assert bench_quant.parser().parse_args([]).builder is None  # on when onnxruntime_genai is importable
    assert bench_quant.parser().parse_args(["--no-builder"]).builder is False
    assert bench_quant.parser().parse_args(["--builder"]).builder is True


def test_builder_command_lines(tmp_path):
    precision, extra = genai_builder.BUILDS["builder int4 k_quant (acc 4)"]
    command = genai_builder.builder_command(tmp_path / "hf", tmp_path / "out", precision, extra, tmp_path / "cache")
    assert command[1:3] == ["-m", "onnxruntime_genai.models.builder"]
    assert command[command.index("-p") + 1] == "int4" and command[command.index("-e") + 1] == "cpu"
    assert command[command.index("--extra_options") + 1:] == ["algo_config=k_quant", "accuracy_level=4"]
    plain = genai_builder.builder_command(tmp_path / "hf", tmp_path / "out", *genai_builder.BUILDS["builder fp32"],
                                          tmp_path / "cache")
    assert "--extra_options" not in plain


def test_a_failing_command_is_an_error_with_its_output():
    with pytest.raises(RuntimeError, match="the step exited 3: boom"):
        genai_builder._timed([sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"],
                             "the step")


def _row(ratios: dict[str, float]) -> dict:
    return {"ppl_ratio": ratios, "size_mib": 513.2, "quant_seconds": 41.6, "prefill_ms": 250.0,
            "prefill_ms_range": (240.0, 260.0), "prefill_speedup": 1.0, "decode_tokens_per_s": 50.0,
            "decode_speedup": None}


def test_the_table_has_one_ppl_column_per_domain():
    rows = {"onnxruntime fp32": _row({"pydoc": 1.0, "gitnotes": 1.00001}), "builder int4": _row({"pydoc": 1.0421})}
    lines = bench_quant.table(rows, {"ort quantize_static + SmoothQuant (INC)": "not importable"},
                              ["pydoc", "gitnotes"]).splitlines()
    assert lines[0].startswith("| model | ppl ratio pydoc | ppl ratio gitnotes | size MiB | build s | prefill ms |")
    assert lines[2] == "| onnxruntime fp32 | 1.0000 | 1.0000 | 513 | 42 | 250 | 240-260 | 1.00 | 50.0 | - |"
    assert lines[3].startswith("| builder int4 | 1.0421 | - | 513 |")
    assert lines[4].startswith("| ort quantize_static + SmoothQuant (INC) | failed: not importable |")
    assert len({line.count("|") for line in lines}) == 1
