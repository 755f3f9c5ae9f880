"""Export parity: the ONNX graph matches the PyTorch source on every supported family."""

from __future__ import annotations

import numpy as np
import onnx

from qexport.artifact.folder import Artifact
from qexport.runtimes.generate import GenerationSettings, generate

# FP32 on tiny models: exporter and ONNX Runtime kernels differ only by float rounding.
ATOL = 1e-4


def _ids(batch: int, seq: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 260, (batch, seq))


def test_signature_uses_optimum_names(tiny_export, family):
    artifact = Artifact.open(tiny_export(family))
    model = onnx.load(artifact.model_path, load_external_data=False)
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    assert inputs[:2] == ["input_ids", "attention_mask"]
    assert ("position_ids" in inputs) == (family != "opt")
    assert "past_key_values.0.key" in inputs and "past_key_values.1.value" in inputs
    assert outputs[0] == "logits" and "present.1.value" in outputs
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 21
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param, "batch axis must be dynamic"


def test_prefill_and_padded_batch_match_pytorch(tiny_export, family):
    artifact = Artifact.open(tiny_export(family))
    lm, ref = artifact.causal_lm(), artifact.reference()
    ids = _ids(2, 24)
    mask = np.ones_like(ids)
    mask[1, :5] = 0  # left padding on the second row
    logits, present = lm.forward(ids, mask)
    ref_logits, ref_present = ref.forward(ids, mask)
    np.testing.assert_allclose(logits[0], ref_logits[0], atol=ATOL, rtol=0)
    np.testing.assert_allclose(logits[1, 5:], ref_logits[1, 5:], atol=ATOL, rtol=0)
    for ours, theirs in zip(present, ref_present):  # padded positions hold don't-care values
        np.testing.assert_allclose(ours[0], theirs[0], atol=ATOL, rtol=0)
        np.testing.assert_allclose(ours[1, :, 5:], theirs[1, :, 5:], atol=ATOL, rtol=0)


def test_decode_with_cache_matches_full_prefill(tiny_export, family):
    artifact = Artifact.open(tiny_export(family))
    lm, ref = artifact.causal_lm(), artifact.reference()
    ids = _ids(1, 20, seed=1)
    _, past = lm.forward(ids[:, :12])
    for t in range(12, 20):  # one token a step, through the KV cache
        step_logits, past = lm.forward(ids[:, t : t + 1], np.ones((1, t + 1), dtype=np.int64), past)
    full_logits, _ = ref.forward(ids)
    np.testing.assert_allclose(step_logits[0, -1], full_logits[0, -1], atol=ATOL, rtol=0)


def test_greedy_generation_identical_to_pytorch(tiny_export, family):
    artifact = Artifact.open(tiny_export(family))
    settings = GenerationSettings(max_new_tokens=32, greedy=True, stop_at_eos=False)
    prompt = _ids(1, 8, seed=2)[0].tolist()
    ours = generate(artifact.causal_lm(), prompt, settings)
    theirs = generate(artifact.reference(), prompt, settings)
    assert len(ours) == 32
    assert ours == theirs


def test_export_is_deterministic(tiny_source, tmp_path):
    import qexport

    a = qexport.export(str(tiny_source("llama")), tmp_path / "a")
    b = qexport.export(str(tiny_source("llama")), tmp_path / "b")
    assert (a / "model.onnx").read_bytes() == (b / "model.onnx").read_bytes()


def test_manifest_records_source_versions_and_checksums(tiny_export):
    from qexport.artifact.outdir import sha256_file

    artifact = Artifact.open(tiny_export("qwen2"))
    manifest = artifact.manifest
    assert manifest["source"]["kind"] == "folder"
    assert manifest["versions"]["torch"] and manifest["versions"]["onnxruntime"]
    assert manifest["files"]["model.onnx"] == sha256_file(artifact.model_path)
    assert manifest["export"]["peak_memory_mib"] > 0
    assert (artifact.folder / "tokenizer.json").is_file() and (artifact.folder / "config.json").is_file()


def test_export_without_kv_cache(tiny_source, tmp_path):
    import qexport

    out = qexport.export(str(tiny_source("llama")), tmp_path / "nokv", kv_cache=False)
    artifact = Artifact.open(out)
    assert artifact.signature.past_names == []
    ids = _ids(1, 16)
    logits, present = artifact.causal_lm().forward(ids)
    ref_logits, _ = artifact.reference().forward(ids)
    assert present == []
    np.testing.assert_allclose(logits, ref_logits, atol=ATOL, rtol=0)


def test_fp16_export_runs_and_stays_close(tiny_source, tmp_path):
    import qexport

    out = qexport.export(str(tiny_source("llama")), tmp_path / "fp16", dtype="fp16")
    artifact = Artifact.open(out)
    ids = _ids(1, 16)
    logits, present = artifact.causal_lm().forward(ids)
    ref_logits, _ = artifact.reference().forward(ids)  # the float32 source
    assert present[0].dtype == np.float16
    # half precision: about 3 significant digits on logits of magnitude ~1
    np.testing.assert_allclose(logits, ref_logits, atol=2e-2, rtol=0)


def test_large_models_get_external_data(tiny_source, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    import qexport
    import qexport.api

    monkeypatch.setattr(qexport.api, "EXTERNAL_DATA_THRESHOLD", 0)  # treat the tiny model as over 2 GB
    out = qexport.export(str(tiny_source("qwen2")), tmp_path / "ext")
    artifact = Artifact.open(out)
    weights = sum(p.numel() * 4 for p in AutoModelForCausalLM.from_pretrained(tiny_source("qwen2")).parameters())
    assert (out / "model.onnx.data").stat().st_size >= 0.9 * weights
    assert set(artifact.manifest["files"]) == {"model.onnx", "model.onnx.data", "genai_config.json"}
    ids = _ids(1, 12)
    np.testing.assert_allclose(artifact.causal_lm().forward(ids)[0], artifact.reference().forward(ids)[0], atol=ATOL, rtol=0)
