"""onnxruntime-genai runs every output folder: genai_config.json, greedy tokens equal to qexport's own, --runtime genai."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import onnxruntime_genai as og
import pytest

from qexport.artifact.folder import Artifact
from qexport.artifact.outdir import sha256_file
from qexport.cli import main
from qexport.errors import QexportError
from qexport.runtimes.generate import GenerationSettings, generate

NEW_TOKENS = 12
# 37 tokens is longer than the tiny Gemma3's sliding window (8): its local layer masks inside the graph.
PROMPTS = (list(range(3, 40)), [int(t) for t in np.random.default_rng(0).integers(3, 272, 20)],
           [int(t) for t in np.random.default_rng(1).integers(3, 272, 11)])
GREEDY = GenerationSettings(max_new_tokens=NEW_TOKENS)


def _ours(artifact: Artifact, prompt: list[int], settings: GenerationSettings = GREEDY,
          eos: list[int] | None = None) -> list[int]:
    eos = [artifact.tokenizer().eos_token_id] if eos is None else eos
    return generate(artifact.causal_lm(), prompt, settings, eos_token_ids=eos)


def _genai_step_logits(folder, prompt: list[int], steps: int) -> np.ndarray:
    """The logits onnxruntime-genai picks each of ``steps`` greedy tokens from: [steps, vocab]."""
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + steps, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    logits = []
    for _ in range(steps):
        logits.append(np.array(generator.get_logits())[0, -1])  # runs the step that the next token comes from
        generator.generate_next_token()
    return np.stack(logits)


def test_genai_config_names_the_graph(tiny_export, family):
    artifact = Artifact.open(tiny_export(family))
    config = json.loads((artifact.folder / "genai_config.json").read_text())
    signature, tokenizer = artifact.signature, artifact.tokenizer()
    model, decoder = config["model"], config["model"]["decoder"]
    assert model["type"] == {"llama": "llama", "qwen2": "qwen2", "gemma3": "gemma3_text", "opt": "decoder"}[family]
    assert (model["eos_token_id"], model["bos_token_id"]) == (tokenizer.eos_token_id, tokenizer.bos_token_id)
    assert model["context_length"] == config["search"]["max_length"] == 512
    assert (decoder["head_size"], decoder["num_key_value_heads"], decoder["num_hidden_layers"]) == (
        signature.head_dim, signature.num_kv_heads, signature.num_layers)
    assert ("position_ids" in decoder["inputs"]) is (family != "opt")
    assert decoder["inputs"]["past_key_names"] % 1 == "past_key_values.1.key"
    assert decoder["outputs"]["present_value_names"] % 0 == "present.0.value"
    assert config["search"]["past_present_share_buffer"] is False
    assert "sliding_window" not in decoder  # the runtime would cut the cache to the window; the graph masks instead
    assert artifact.manifest["files"]["genai_config.json"] == sha256_file(artifact.folder / "genai_config.json")


def test_genai_greedy_tokens_equal_qexport(tiny_export, family):
    artifact = Artifact.open(tiny_export(family))
    genai = artifact.genai()
    results = [(_ours(artifact, prompt), genai.generate(prompt, GREEDY)) for prompt in PROMPTS]
    for expected, got in results:
        assert got == expected
    assert any(len(set(expected)) > 1 for expected, _ in results)  # not one token repeated: the test can tell


def test_genai_logits_equal_the_graph(tiny_export, family):
    """Each step's logits in onnxruntime-genai equal the graph's on the same tokens: its mask, positions and cache
    are the ones the graph expects, beyond what equal argmaxes show."""
    artifact = Artifact.open(tiny_export(family))
    prompt = PROMPTS[0]
    tokens = _ours(artifact, prompt, eos=[])
    logits, _ = artifact.causal_lm().forward(np.asarray([prompt + tokens]))
    expected = logits[0, len(prompt) - 1: len(prompt) - 1 + NEW_TOKENS]
    np.testing.assert_allclose(_genai_step_logits(artifact.folder, prompt, NEW_TOKENS), expected, rtol=0, atol=1e-5)


def test_genai_stops_at_eos_as_qexport_does(tiny_export, tmp_path):
    """With the EOS set to a token the model emits, both stop on it (and return it); without the stop, both run on."""
    folder = shutil.copytree(tiny_export("qwen2"), tmp_path / "model")
    artifact = Artifact.open(folder)
    prompt = PROMPTS[1]
    free = _ours(artifact, prompt, eos=[])
    first = next(i for i in range(1, NEW_TOKENS - 1) if free[i] not in free[:i])  # a token it has not emitted before
    eos = free[first]
    path = folder / "genai_config.json"
    config = json.loads(path.read_text())
    config["model"]["eos_token_id"] = eos
    path.write_text(json.dumps(config))
    genai = artifact.genai()
    stopped = genai.generate(prompt, GREEDY)
    assert stopped == _ours(artifact, prompt, eos=[eos]) == free[: first + 1]
    no_stop = GenerationSettings(max_new_tokens=NEW_TOKENS, stop_at_eos=False)
    assert genai.generate(prompt, no_stop) == _ours(artifact, prompt, no_stop, eos=[eos]) == free


@pytest.mark.parametrize("family, preset, kv_cache", [
    ("llama", "w8a8-dynamic", None), ("llama", "w8a8-group-ort", None), ("gemma3", "w8a8-group-ort", None),
    ("opt", "w8a8-group-ort", None), ("qwen2", "w4a8-group-ort", None), ("llama", "w8a8-group-ort", "int8"),
    ("gemma3", "w8a8-group-ort", "int8")])
def test_quantized_preset_generates_identically(tiny_source, tmp_path, family, preset, kv_cache):
    """MatMulNBits, merged q/k/v and GroupQueryAttention (w8a8-group-ort; w4a8-group-ort with its online Hadamard
    and 4-bit kernels; GroupQueryAttention keeping an int8 cache) run in onnxruntime-genai too."""
    import qexport

    out = qexport.export(str(tiny_source(family)), tmp_path / "q", recipe=preset, calib_windows=2,
                         calib_seq_len=64, measure_difficulty=False, kv_cache_dtype=kv_cache)
    artifact = Artifact.open(out)
    assert "genai_config.json" in artifact.manifest["files"]
    genai = artifact.genai()
    for prompt in PROMPTS:
        assert genai.generate(prompt, GREEDY) == _ours(artifact, prompt)


def test_no_kv_cache_export_has_no_genai_config(tiny_source, tmp_path, caplog):
    """onnxruntime-genai feeds one new token a step, which a graph without a cache cannot take: no config, a reason."""
    import qexport

    with caplog.at_level("INFO", logger="qexport.artifact.genai_config"):
        out = qexport.export(str(tiny_source("llama")), tmp_path / "nokv", kv_cache=False)
    assert not (out / "genai_config.json").exists()
    assert "--no-kv-cache" in caplog.text
    artifact = Artifact.open(out)
    assert "genai_config.json" not in artifact.manifest["files"]
    with pytest.raises(QexportError, match="has no genai_config.json"):
        artifact.genai()


def test_cli_generate_runtime_genai_equals_ort(tiny_export, capsys):
    folder = str(tiny_export("opt"))
    runs = {}
    for runtime in ("ort-cpu", "genai"):
        assert main(["generate", folder, "hello there", "--greedy", "--raw", "--max-new-tokens", str(NEW_TOKENS),
                     "--runtime", runtime, "--threads", "1", "--json"]) == 0
        runs[runtime] = json.loads(capsys.readouterr().out)
    assert runs["genai"]["tokens"] == runs["ort-cpu"]["tokens"]
    assert len(runs["genai"]["tokens"]) == NEW_TOKENS


@pytest.mark.parametrize("command", [["eval", "--no-reference"], ["bench", "--no-reference"]])
def test_eval_and_bench_refuse_genai(tiny_export, capsys, command):
    folder = str(tiny_export("llama"))
    capsys.readouterr()  # the fixture's export progress
    assert main([command[0], folder, *command[1:], "--runtime", "genai"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qexport: error: --runtime genai") and "qexport generate" in err and "\n" not in err
    with pytest.raises(QexportError, match="only `qexport generate`"):
        Artifact.open(folder).causal_lm("genai")


def test_missing_onnxruntime_genai_names_the_install(tiny_export, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # import fails as if not installed
    with pytest.raises(QexportError, match="pip install onnxruntime-genai"):
        Artifact.open(tiny_export("llama")).genai()


@pytest.mark.slow
def test_smollm2_genai_greedy_equals_qexport(default_export):
    artifact = Artifact.open(default_export)
    tokenizer = artifact.tokenizer()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What does a Python decorator do?"}],
                                           add_generation_prompt=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    settings = GenerationSettings(max_new_tokens=48)
    expected = _ours(artifact, prompt, settings)
    assert artifact.genai(threads=2).generate(prompt, settings) == expected
    assert len(set(expected)) > 10
