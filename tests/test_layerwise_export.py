"""Layer-wise export (a shallow trace, the other layers stamped) against the whole-model trace, in ONNX Runtime."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from qexport.exporter import layerwise
from qexport.exporter.families import family_for
from qexport.exporter.graph_export import ExportPath, ExportSettings, export_graph, export_path_of
from qexport.passes.discovery import sites
from qexport.passes.discovery.linear_select import linear_names
from tiny_models import make_tiny_model, tiny_config

# Both graphs run the same operators on the same weights: float32 rounding at most, written tight on purpose.
RTOL, ATOL = 1e-5, 1e-5
# Gemma3's sliding window is 8: prompts of 12 tokens make the local layers mask differently from the global ones.
DEEP = {
    "llama": {"num_hidden_layers": 4},
    "qwen2": {"num_hidden_layers": 4},
    "gemma3": {"num_hidden_layers": 5, "layer_types": ["sliding_attention", "sliding_attention", "full_attention",
                                                       "sliding_attention", "full_attention"]},
    "opt": {"num_hidden_layers": 4},
}
ALL_KINDS = ("attn_norm", "mlp_norm", "v_o", "up_down", "final_norm")


def _deep_model(family: str) -> torch.nn.Module:
    """A tiny model with 4 or 5 layers; every tensor random (norms too), so no two layers share a weight."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, DEEP[family])).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            else:  # norm weights
                p.normal_(1, 0.3)
    return model


@pytest.fixture(scope="module")
def exports():
    """family -> (layer-wise model, whole-model model, signature), each exported once."""
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            model = _deep_model(family)
            fam = family_for(model.config.model_type)
            lw, signature = export_graph(model, fam, ExportSettings())
            whole, _ = export_graph(model, fam, ExportSettings(layerwise=False))
            cache[family] = (lw, whole, signature)
        return cache[family]

    return get


class _Runner:
    def __init__(self, model: ir.Model) -> None:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options,
                                            providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self.session.run(self.outputs, {k: feeds[k] for k in self.inputs})))


def _feeds(signature, ids: np.ndarray, mask: np.ndarray, past: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    feeds = {"input_ids": ids, "attention_mask": mask}
    positions = np.cumsum(mask, axis=-1) - 1
    feeds["position_ids"] = np.where(mask == 0, 1, positions)[:, -ids.shape[1]:].astype(np.int64)
    for name in signature.past_names:
        if past is None:
            feeds[name] = np.zeros((ids.shape[0], signature.num_kv_heads, 0, signature.head_dim), np.float32)
        else:
            feeds[name] = past[name.replace("past_key_values.", "present.")]
    return feeds


def _session_outputs(model: ir.Model, signature, ids: np.ndarray, mask: np.ndarray, steps: int) -> list[dict]:
    """Prefill ``ids`` under ``mask`` from an empty cache, then ``steps`` one-token decode steps on the cache."""
    run = _Runner(model)
    outputs = [run(_feeds(signature, ids, mask, None))]
    for step in range(steps):
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)
        token = np.full((ids.shape[0], 1), 17 + 5 * step, np.int64)
        outputs.append(run(_feeds(signature, token, mask, outputs[-1])))
    return outputs


def _assert_same_runs(a: list[dict], b: list[dict]) -> None:
    for step, (got, want) in enumerate(zip(a, b, strict=True)):
        assert got.keys() == want.keys()
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=RTOL, atol=ATOL, err_msg=f"step {step}: {name}")


def test_layer_path_is_taken(exports, family):
    lw, whole, _ = exports(family)
    assert export_path_of(lw).path == "layerwise", export_path_of(lw).reason
    assert export_path_of(whole) == ExportPath("whole-model", "layerwise disabled in the export settings")


def test_same_inputs_outputs_and_initializer_names(exports, family):
    lw, whole, signature = exports(family)

    def described(values):
        return [(v.name, v.dtype, tuple(str(d) for d in v.shape)) for v in values]

    assert described(lw.graph.inputs) == described(whole.graph.inputs)
    assert described(lw.graph.outputs) == described(whole.graph.outputs)
    assert [v.name for v in lw.graph.inputs] == signature.input_names
    assert [v.name for v in lw.graph.outputs] == signature.output_names
    assert set(lw.graph.initializers) == set(whole.graph.initializers)
    for name, value in whole.graph.initializers.items():  # the same tensors under the same names
        np.testing.assert_array_equal(lw.graph.initializers[name].const_value.numpy(), value.const_value.numpy(),
                                      err_msg=name)


def test_prefill_longer_than_the_window_and_decode(exports, family):
    lw, whole, signature = exports(family)
    ids = np.random.default_rng(0).integers(3, 260, (1, 12))
    mask = np.ones_like(ids)
    _assert_same_runs(_session_outputs(lw, signature, ids, mask, 3), _session_outputs(whole, signature, ids, mask, 3))


def test_left_padded_batch_and_decode(exports, family):
    lw, whole, signature = exports(family)
    ids = np.random.default_rng(1).integers(3, 260, (2, 12))
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    _assert_same_runs(_session_outputs(lw, signature, ids, mask, 3), _session_outputs(whole, signature, ids, mask, 3))


def test_same_sites_and_linears(exports, family):
    lw, whole, _ = exports(family)
    found, expected = sites.find_sites(lw), sites.find_sites(whole)
    found.require(DEEP[family]["num_hidden_layers"], kinds=ALL_KINDS)
    assert [(s.name, s.layer) for s in found.all] == [(s.name, s.layer) for s in expected.all]
    for ours, theirs in zip(found.all, expected.all):
        np.testing.assert_array_equal(sites.consumer_weight(ours), sites.consumer_weight(theirs), err_msg=ours.name)
    assert sorted(linear_names(lw).values()) == sorted(linear_names(whole).values())
    assert len(sites.find_residual_stream(lw).blocks) == len(sites.find_residual_stream(whole).blocks)


def test_plan_picks_layer_zero_and_two_of_each_kind():
    model = _deep_model("gemma3")
    plan = layerwise.plan_layers(model, family_for("gemma3_text"), 5)
    assert plan.shallow == (0, 1, 3, 2, 4)
    assert plan.shallow_kinds == ("sliding_attention",) * 3 + ("full_attention",) * 2
    assert (plan.template("sliding_attention"), plan.template("full_attention")) == (2, 4)


def test_shallow_model_restores_the_model():
    model = _deep_model("gemma3")
    layers, types = list(model.model.layers), list(model.config.layer_types)
    idx = [layer.self_attn.layer_idx for layer in layers]
    plan = layerwise.plan_layers(model, family_for("gemma3_text"), 5)
    with pytest.raises(RuntimeError, match="inside"):
        with layerwise.shallow_model(model, plan):
            assert len(model.model.layers) == 5 and model.config.num_hidden_layers == 5
            assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3, 4]
            raise RuntimeError("inside")
    assert list(model.model.layers) == layers and model.config.layer_types == types
    assert model.config.num_hidden_layers == 5 and [layer.self_attn.layer_idx for layer in layers] == idx


def test_manifest_records_the_layer_path(tmp_path):
    import qexport

    source = make_tiny_model("llama", tmp_path / "src", overrides=DEEP["llama"])
    out = qexport.export(str(source), tmp_path / "out")
    export = json.loads((out / "qexport.json").read_text())["export"]
    assert export["path"] == "layerwise"
    assert "stamped" in export["path_reason"]


def test_too_shallow_model_falls_back_and_says_why(tiny_source, tmp_path):
    import qexport

    out = qexport.export(str(tiny_source("llama")), tmp_path / "out")  # 2 layers: no second layer to measure
    export = json.loads((out / "qexport.json").read_text())["export"]
    assert export["path"] == "whole-model"
    assert "fewer than two" in export["path_reason"]


def test_an_error_in_the_layer_path_falls_back(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise layerwise.LayerwiseError("boom")

    monkeypatch.setattr(layerwise, "stamp_layers", broken)
    model = _deep_model("llama")
    with caplog.at_level("WARNING", logger="qexport.exporter.graph_export"):
        onnx_model, _ = export_graph(model, family_for("llama"), ExportSettings())
    path = export_path_of(onnx_model)
    assert path.path == "whole-model" and "LayerwiseError: boom" in path.reason
    assert "layer-wise export failed" in caplog.text
    assert len(model.model.layers) == 4 and model.config.num_hidden_layers == 4


def test_layerwise_setting_is_validated():
    with pytest.raises(ValueError, match="layerwise"):
        ExportSettings(layerwise="yes")


@pytest.mark.slow
def test_default_model_layerwise_matches_whole_model():
    from qexport.exporter.loading import load_model, resolve_source

    _, family, model, _ = load_model(resolve_source(None))
    lw, signature = export_graph(model, family, ExportSettings())
    assert export_path_of(lw).path == "layerwise", export_path_of(lw).reason
    whole, _ = export_graph(model, family, ExportSettings(layerwise=False))
    assert set(lw.graph.initializers) == set(whole.graph.initializers)
    ids = np.random.default_rng(0).integers(3, 1000, (1, 10))
    mask = np.ones_like(ids)
    ours, theirs = _session_outputs(lw, signature, ids, mask, 1), _session_outputs(whole, signature, ids, mask, 1)
    for got, want in zip(ours, theirs):
        assert float(np.max(np.abs(got["logits"] - want["logits"]))) < 1e-4
    assert len(sites.find_sites(lw).all) == len(sites.find_sites(whole).all)
