"""`qexport export --recipe`: passes run on the export, are checked for equivalence, and are recorded."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest

import qexport
from qexport.artifact.folder import Artifact
from qexport.errors import QexportError, RecipeError

CALIB = dict(calib_windows=2, calib_seq_len=64)


def _logits(folder, ids) -> np.ndarray:
    return Artifact.open(folder).causal_lm().forward(ids)[0]


@pytest.mark.parametrize("family,recipe", [("llama", "smoothquant"), ("qwen2", "smooth-rotate"), ("opt", "fold-norm")])
def test_recipe_output_is_equivalent_and_recorded(tiny_source, tiny_export, tmp_path, family, recipe):
    out = qexport.export(str(tiny_source(family)), tmp_path / "out", recipe=recipe, **CALIB)
    manifest = Artifact.open(out).manifest
    report = manifest["recipe"]
    assert report["name"] == recipe
    assert any(step["modified"] for step in report["steps"])
    assert report["verify"]["max_abs_logit_diff"] < 1e-4
    assert manifest["calibration"]["windows"] == 2 and manifest["calibration"]["source"]["kind"] == "pydoc"
    assert report["difficulty"][0]["stage"] == "export" and len(report["difficulty"]) >= 2
    ids = np.random.default_rng(0).integers(3, 260, (1, 40))
    np.testing.assert_allclose(_logits(out, ids), _logits(tiny_export(family), ids), rtol=1e-4, atol=1e-5)


def test_smoothing_lowers_difficulty_where_it_should(tiny_source, tmp_path):
    out = qexport.export(str(tiny_source("llama")), tmp_path / "out", recipe="smoothquant", **CALIB)
    before, after = (stage["sites"] for stage in Artifact.open(out).manifest["recipe"]["difficulty"][:2])
    for name in ("layers.0.attn_norm", "layers.1.mlp_norm"):
        # SmoothQuant divides the largest activation channels most: the channel absmax profile flattens
        assert after[name]["outlier_ratio"] < before[name]["outlier_ratio"]


def test_recipe_export_is_deterministic(tiny_source, tmp_path):
    a = qexport.export(str(tiny_source("llama")), tmp_path / "a", recipe="smoothquant", **CALIB)
    b = qexport.export(str(tiny_source("llama")), tmp_path / "b", recipe="smoothquant", **CALIB)
    assert (a / "model.onnx").read_bytes() == (b / "model.onnx").read_bytes()


def test_bad_recipe_fails_before_exporting(tiny_source, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\npasses:\n  - pass: smooth\n    alpah: 0.5\n")
    with pytest.raises(RecipeError, match="alpah"):
        qexport.export(str(tiny_source("llama")), tmp_path / "out", recipe=str(bad))
    with pytest.raises(RecipeError, match="presets"):
        qexport.export(str(tiny_source("llama")), tmp_path / "out", recipe="no-such-preset")
    assert not (tmp_path / "out").exists()


@dataclasses.dataclass(frozen=True)
class BreakWeightsPass(ir.passes.InPlacePass):
    """Test double: doubles the first 2-D initializer, which no lossless pass may do."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for value in model.graph.initializers.values():
            array = value.const_value.numpy()
            if array.ndim == 2:
                value.const_value = ir.tensor(array * 2.0)
                break
        return ir.passes.PassResult(model, True)


def test_non_equivalent_pass_is_an_error_and_writes_nothing(tiny_source, tmp_path, monkeypatch):
    from qexport.recipes import schema as recipe

    monkeypatch.setitem(recipe.PASSES, "break-weights", f"{__name__}:BreakWeightsPass")
    bad = tmp_path / "break.yaml"
    bad.write_text("name: break\npasses:\n  - pass: break-weights\n")
    with pytest.raises(QexportError, match="changed the model's outputs"):
        qexport.export(str(tiny_source("llama")), tmp_path / "out", recipe=str(bad), **CALIB)
    assert not (tmp_path / "out").exists()


def test_difficulty_measurement_can_be_skipped(tiny_source, tmp_path):
    out = qexport.export(str(tiny_source("llama")), tmp_path / "out", recipe="smoothquant", measure_difficulty=False, **CALIB)
    report = Artifact.open(out).manifest["recipe"]
    assert report["difficulty"] == [] and report["steps"][0]["modified"]


def _windows(count: int = 2, length: int = 48) -> list[np.ndarray]:
    return [np.random.default_rng(i).integers(3, 250, size=length, dtype=np.int64) for i in range(count)]


def test_stage_difficulty_shares_the_pass_statistics_run(tiny_export):
    from qexport.calibration.stats import collect_stats
    from qexport.passes.discovery import sites
    from qexport.recipes.pipeline import PipelineSettings, apply_recipe
    from qexport.recipes.schema import load_recipe
    from qexport.analysis.difficulty import site_difficulties

    model = ir.load(tiny_export("llama") / "model.onnx")
    windows = _windows(3)
    # the metric of the export stage, measured on its own on the first window
    expected = site_difficulties(sites.find_sites(model), collect_stats(model, windows[:1]))
    report = apply_recipe(model, load_recipe("smoothquant"), windows, PipelineSettings(difficulty_windows=1))
    assert report["difficulty"][0]["stage"] == "export"
    for name, row in expected.items():  # smooth's statistics run (3 windows) also gave the 1-window metric
        for key, value in row.items():
            assert report["difficulty"][0]["sites"][name][key] == pytest.approx(value, rel=1e-9)
    assert report["verify"]["tokens"] == 48 and report["verify"]["max_abs_logit_diff"] < 1e-4


def test_manifest_sites_record_activation_and_weight_scales(tiny_export):
    from qexport.passes.discovery.linear_select import linear_names
    from qexport.passes.metadata import Meta
    from qexport.recipes.pipeline import PipelineSettings, apply_recipe
    from qexport.recipes.schema import load_recipe

    model = ir.load(tiny_export("llama") / "model.onnx")
    role_of = {node.name: role for node, role in linear_names(model).items()}
    report = apply_recipe(model, load_recipe("w8a8-static"), _windows(), PipelineSettings(measure_difficulty=False))
    sites = report["sites"]
    assert set(sites) == {r for r in role_of.values() if r != "lm_head"} and len(sites) == 14
    for node in model.graph:
        if role_of.get(node.name) in sites:
            entry = sites[role_of[node.name]]
            a_dq, w_dq = node.inputs[0].producer(), node.inputs[1].producer()
            assert a_dq.metadata_props[Meta.QUANT] == entry["act"] == "per_tensor" and entry["method"] == "mse"
            scale = float(a_dq.inputs[1].const_value.numpy())
            assert entry["scale"] == pytest.approx(scale, rel=1e-3) and entry["clip"] == pytest.approx(127 * scale, rel=1e-3)
            assert 0 < entry["clip"] <= entry["absmax"]  # the MSE clip never exceeds the calibration absmax
            w_scale = w_dq.inputs[1].const_value.numpy()
            assert entry["w_scale"] == pytest.approx([w_scale.min(), w_scale.max()], rel=1e-3)
    assert report["checks"] == {"tensorrt": {"passed": True, "warnings": report["checks"]["tensorrt"]["warnings"]}}


def test_pipeline_gives_bias_correction_the_float_graph(tiny_export):
    from qexport.recipes.pipeline import PipelineSettings, apply_recipe
    from qexport.recipes.schema import Recipe

    model = ir.load(tiny_export("llama") / "model.onnx")
    recipe = Recipe.from_dict({"name": "bc", "passes": [{"pass": "quantize", "activations": "per_tensor"},
                                                        {"pass": "bias-correct", "linears": ["layers.0.attn.*"]}]})
    adds = sum(n.op_type == "Add" for n in model.graph)
    report = apply_recipe(model, recipe, _windows(), PipelineSettings(measure_difficulty=False))
    assert [s["modified"] for s in report["steps"]] == [True, True]
    assert sum(n.op_type == "Add" for n in model.graph) == adds + 4  # q, k, v, o of layer 0 had no bias


def test_recipe_tensorrt_check_fails_the_export_and_writes_nothing(tiny_source, tmp_path):
    from qexport.runtimes.tensorrt.check import TensorRTIncompatibleError

    recipe = tmp_path / "dyn.yaml"
    recipe.write_text("name: dyn\ncheck: tensorrt\npasses:\n  - pass: quantize\n    activations: per_token\n")
    with pytest.raises(TensorRTIncompatibleError, match="dynamic-scale"):
        qexport.export(str(tiny_source("llama")), tmp_path / "out", recipe=str(recipe), measure_difficulty=False, **CALIB)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_recipe_calibration_settings_reach_the_manifest(tiny_source, tmp_path):
    recipe = tmp_path / "slac.yaml"
    recipe.write_text("name: slac\ncalibration:\n  seq_len: 32\n  windows: 3\npasses:\n  - pass: fold-norm\n")
    out = qexport.export(str(tiny_source("llama")), tmp_path / "a", recipe=str(recipe), measure_difficulty=False)
    calibration = Artifact.open(out).manifest["calibration"]
    assert (calibration["windows"], calibration["seq_len"], calibration["tokens"]) == (3, 32, 96)
    assert calibration["settings_from"] == {"windows": "recipe", "seq_len": "recipe", "text": "default"}
    assert calibration["source"] == {"kind": "pydoc", "location": None}


def test_recipe_calibration_text_is_used_and_an_argument_overrides_it(tiny_source, tmp_path):
    recipe = tmp_path / "mixed.yaml"
    recipe.write_text("name: mixed\ncalibration:\n  seq_len: 32\n  windows: 2\n  text: pydoc+gitnotes\n"
                      "passes:\n  - pass: fold-norm\n")
    out = qexport.export(str(tiny_source("llama")), tmp_path / "a", recipe=str(recipe), measure_difficulty=False)
    calibration = Artifact.open(out).manifest["calibration"]
    assert calibration["source"] == {"kind": "mix", "location": "pydoc+gitnotes"}
    assert calibration["settings_from"]["text"] == "recipe"
    out = qexport.export(str(tiny_source("llama")), tmp_path / "b", recipe=str(recipe), measure_difficulty=False,
                         calib="pydoc")
    calibration = Artifact.open(out).manifest["calibration"]
    assert calibration["source"]["kind"] == "pydoc" and calibration["settings_from"]["text"] == "argument"
    # an explicit argument overriding the recipe: test_recipe's test of calibration_shape
