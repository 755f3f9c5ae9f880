"""The CLI on a tiny export: eval, generate and bench print what users and scripts rely on."""

from __future__ import annotations

import json
import re
from pathlib import Path

from qexport.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def test_eval_json_keys(tiny_export, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    assert main(["-q", "eval", str(tiny_export("llama")), "--text", str(text), "--windows", "2", "--seq-len", "64",
                 "--greedy-tokens", "8", "--json"]) == 0
    result = _json(capsys)
    for key in ("ppl", "ppl_reference", "ppl_ratio", "max_abs_logit_diff", "logit_cosine", "greedy_match", "greedy_tokens"):
        assert key in result
    assert result["windows"] == 2 and result["tokens_scored"] == 2 * 63
    assert abs(result["ppl_ratio"] - 1) < 1e-4
    assert result["greedy_match"] == result["greedy_tokens"] == 8


def test_generate_greedy_is_reproducible(tiny_export, capsys):
    args = ["-q", "generate", str(tiny_export("qwen2")), "hello", "--greedy", "--max-new-tokens", "6", "--json"]
    assert main(args) == 0
    first = _json(capsys)
    assert main(args) == 0
    assert _json(capsys)["tokens"] == first["tokens"] and 1 <= len(first["tokens"]) <= 6


def test_bench_json(tiny_export, capsys):
    assert main(["-q", "bench", str(tiny_export("opt")), "--seq-len", "32", "--decode-tokens", "4", "--runs", "2", "--json"]) == 0
    result = _json(capsys)
    ort = result["results"]["onnxruntime-cpu"]
    assert ort["prefill_ms"] > 0 and ort["decode_tokens_per_s"] > 0
    assert result["prefill_speedup_vs_pytorch"] > 0


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"\*\*Run the tests\.\*\*.*?```\n(.+?)\n```", readme, re.S)
    assert block, "README lost its test command"
    assert block.group(1).strip() in (ROOT / ".ci" / "run").read_text()


def test_export_with_a_recipe_prints_the_passes_and_check(tiny_source, tmp_path, capsys):
    out = tmp_path / "smooth"
    assert main(["-q", "export", str(tiny_source("qwen2")), "--out", str(out), "--recipe", "smoothquant",
                 "--calib-windows", "2", "--calib-seq-len", "64"]) == 0
    printed = capsys.readouterr().out
    assert "pass smooth" in printed and "modified" in printed
    assert "equivalence: max |logit difference|" in printed
    assert "mlp_norm outlier_ratio" in printed  # the difficulty summary
    assert json.loads((out / "qexport.json").read_text())["recipe"]["name"] == "smoothquant"


def test_export_prints_one_line_per_recipe_adaptation(tiny_source, tmp_path, capsys):
    out = tmp_path / "gemma3"
    assert main(["-q", "export", str(tiny_source("gemma3")), "--out", str(out), "--recipe", "w8a8-dynamic-qdq",
                 "--calib-windows", "2", "--calib-seq-len", "64", "--no-difficulty"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("recipe adapted: ")]
    changes = json.loads((out / "qexport.json").read_text())["recipe_adaptations"]
    assert len(lines) == len(changes) == 1
    assert lines[0].startswith("recipe adapted: changed rotate-residual at 4 sites (layers.0.attn.post_norm, ")
    assert all(change["reason"] in line for change, line in zip(changes, lines))


def test_check_tensorrt_passes_a_float_export_and_exits_0(tiny_export, capsys):
    assert main(["-q", "check", str(tiny_export("llama")), "--json"]) == 0
    result = _json(capsys)
    assert result["passed"] is True and result["target"] == "tensorrt"


def test_tensorrt_runtime_without_engine_says_how_to_build_it(tiny_export, capsys):
    code = main(["-q", "generate", str(tiny_export("llama")), "hi", "--runtime", "tensorrt", "--max-new-tokens", "2"])
    assert code == 2
    assert "qexport build-engine" in capsys.readouterr().err


def test_report_on_an_unquantized_export_is_a_clear_error(tiny_export, capsys):
    assert main(["-q", "report", str(tiny_export("llama")), "--json"]) == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]  # the fixture's export may have printed progress first
    assert line.startswith("qexport: error:") and "without a recipe" in line and "--recipe w8a8-static" in line
