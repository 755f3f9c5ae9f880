"""`qexport export --recipe`: passes run on the export, are checked for equivalence, and are recorded."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest

import qexport
from qexport.artifact import Artifact
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
    from qexport import recipe

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
