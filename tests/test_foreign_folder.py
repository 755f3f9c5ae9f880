"""A folder onnxruntime-genai's model builder wrote (no qexport.json) opens as an Artifact: qexport's runner drives
its GroupQueryAttention graph (fused rotary, no position_ids, BNSH cache) and `evaluate` scores it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from qexport.artifact.folder import Artifact
from qexport.errors import QexportError
from qexport.evaluation.perplexity import EvalSettings, evaluate, token_nll
from qexport.exporter.text import token_windows
from tiny_models import make_tiny_model

pytest.importorskip("onnxruntime_genai")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(the tiny Llama's Hugging Face folder, the builder's FP32 folder of it)."""
    root = tmp_path_factory.mktemp("builder")
    source = make_tiny_model("llama", root / "hf")
    out = root / "fp32"
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(out),
                    "-p", "fp32", "-e", "cpu", "-c", str(root / "cache")], check=True, capture_output=True)
    return source, out


def _torch_logits(source, ids: np.ndarray) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype="float32").eval()
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


def test_the_signature_comes_from_genai_config(built):
    _, folder = built
    signature = Artifact.open(folder).signature
    assert (signature.num_layers, signature.num_kv_heads, signature.head_dim) == (2, 2, 16)
    assert signature.kv_cache and not signature.uses_position_ids and signature.dtype == "fp32"


def test_prefill_and_decode_match_pytorch(built):
    source, folder = built
    ids = np.random.default_rng(0).integers(3, 200, (1, 13))
    lm = Artifact.open(folder).causal_lm(threads=1)
    prefill, past = lm.forward(ids[:, :12])
    decode, present = lm.forward(ids[:, 12:], np.ones((1, 13), np.int64), past)
    expected = _torch_logits(source, ids)
    np.testing.assert_allclose(prefill, expected[:, :12], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(decode, expected[:, 12:], rtol=1e-4, atol=1e-5)
    assert present[0].shape == (1, 2, 13, 16)


def test_evaluate_scores_it_without_a_reference(built, tmp_path):
    source, folder = built
    text = tmp_path / "eval.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    result = evaluate(folder, text=str(text), settings=EvalSettings(windows=2, seq_len=64, reference=False))
    artifact = Artifact.open(folder)
    windows = token_windows(artifact.tokenizer(), text.read_text(), 64, 2)
    nll = np.concatenate([token_nll(_torch_logits(source, w[None])[0], w) for w in windows])
    assert result["windows"] == 2 and "ppl_ratio" not in result
    np.testing.assert_allclose(result["ppl"], np.exp(nll.mean()), rtol=1e-5)
    with pytest.raises(QexportError, match="names no PyTorch source"):
        artifact.reference()


def test_other_io_names_are_a_clear_error(built, tmp_path):
    _, folder = built
    copy = shutil.copytree(folder, tmp_path / "renamed")
    config = json.loads((copy / "genai_config.json").read_text())
    config["model"]["decoder"]["inputs"]["past_key_names"] = "past.%d.k"
    (copy / "genai_config.json").write_text(json.dumps(config))
    with pytest.raises(QexportError, match="names its inputs and outputs differently.*past"):
        Artifact.open(copy)
    (copy / "genai_config.json").write_text("{}")
    with pytest.raises(QexportError, match="not a usable onnxruntime-genai config"):
        Artifact.open(copy)


def test_report_on_a_builder_folder_says_what_to_use_instead(built):
    from qexport.report.build import build_report

    with pytest.raises(QexportError, match="not written by qexport .* use qexport eval --no-reference"):
        build_report(built[1])
