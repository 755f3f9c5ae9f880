"""Recipes: YAML <-> typed pass settings, clear errors naming the key, presets that run end to end."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest
import yaml

from pass_testing import give_norms_weights, load, make_feeds, run
from qexport.calibration.calibrator import CalibrationStats, Calibrator
from qexport.recipes import schema as rc
from qexport.recipes.registry import PASSES, RuntimeInput, pass_class, runtime_fields, runtime_inputs, settable_fields
from qexport.errors import RecipeError
from qexport.passes.transforms.hadamard import Rotation
from qexport.passes.transforms.online_hadamard import OnlineHadamardPass
from qexport.passes.transforms.rotate_heads import RotateHeadsPass
from qexport.passes.transforms.rotate_residual import RotateResidualPass


def _recipe(*passes: dict, **top) -> dict:
    return {"name": "t", "passes": list(passes), **top}


def test_presets_include_the_documented_set():
    assert {"fold-norm", "rotate", "rotate-opt", "smooth-rotate", "smoothquant"} <= set(rc.preset_names())
    assert rc.presets_folder().name == "recipes"


@pytest.mark.parametrize("name", rc.preset_names())
def test_presets_load_and_round_trip(name):
    recipe = rc.load_recipe(name)
    assert recipe.name == name and recipe.description
    again = rc.Recipe.from_dict(yaml.safe_load(recipe.to_yaml()))
    assert again == recipe


def test_rotate_preset_builds_typed_passes():
    passes = rc.load_recipe("rotate").build()
    assert [type(p).__name__ for p in passes] == [
        "UntieEmbeddingsPass", "FoldNormPass", "RotateResidualPass", "RotateHeadsPass", "OnlineHadamardPass"]
    assert passes[2] == RotateResidualPass(rotation=Rotation.RANDOM_HADAMARD, seed=0)
    assert passes[3] == RotateHeadsPass(rotation=Rotation.HADAMARD)
    assert passes[4] == OnlineHadamardPass(max_dense=256)


def test_load_by_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\npasses:\n  - pass: rotate-heads\n    rotation: orthogonal\n    seed: 4\n")
    recipe = rc.load_recipe(path)
    assert recipe.passes == (rc.PassEntry("rotate-heads", (("rotation", Rotation.ORTHOGONAL), ("seed", 4))),)
    assert recipe.build() == [RotateHeadsPass(rotation=Rotation.ORTHOGONAL, seed=4)]


def test_unknown_preset_lists_presets():
    with pytest.raises(RecipeError, match="no recipe file or preset named 'quarot'.*rotate"):
        rc.load_recipe("quarot")
    with pytest.raises(RecipeError, match="does not exist"):
        rc.load_recipe("missing/file.yaml")


def test_unknown_top_level_key():
    with pytest.raises(RecipeError, match="unknown key 'pases'; allowed keys: name, description, calibration, check, kv_cache, passes"):
        rc.Recipe.from_dict({"name": "t", "pases": []})


def test_unknown_pass_names_the_registered_ones():
    with pytest.raises(RecipeError, match="unknown pass 'rotate'; registered passes: affine, aqas, bias-correct, fold-norm, layernorm-to-rms, online-hadamard"):
        rc.Recipe.from_dict(_recipe({"pass": "rotate"}))


def test_unknown_setting_names_key_and_allowed():
    with pytest.raises(RecipeError, match=r"passes\[0\]: unknown setting 'angle' for pass 'rotate-heads'; "
                                          r"allowed settings: rotation, seed, sites"):
        rc.Recipe.from_dict(_recipe({"pass": "rotate-heads", "angle": 3}))


def test_bad_enum_value_lists_allowed_values():
    with pytest.raises(RecipeError, match=r"passes\[1\]\.rotation: 'givens' is not allowed; expected one of "
                                          r"'hadamard', 'random_hadamard', 'orthogonal'"):
        rc.Recipe.from_dict(_recipe({"pass": "fold-norm"}, {"pass": "rotate-residual", "rotation": "givens"}))


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("seed", "3", "expected int"), ("seed", True, "expected int"), ("seed", 1.5, "expected int")])
def test_bad_types_are_rejected(key, value, expected):
    with pytest.raises(RecipeError, match=rf"\.{key}: .* is not allowed; {expected}"):
        rc.Recipe.from_dict(_recipe({"pass": "rotate-residual", key: value}))


def test_float_settings_accept_ints_and_mappings_convert():
    recipe = rc.Recipe.from_dict(_recipe({"pass": "smooth", "alpha": 1, "alphas": {"layers.1.*": 0.85}}))
    assert dict(recipe.passes[0].settings) == {"alpha": 1.0, "alphas": {"layers.1.*": 0.85}}
    assert isinstance(dict(recipe.passes[0].settings)["alpha"], float)
    with pytest.raises(RecipeError, match=r"alphas\['x'\]: 'high' is not allowed; expected float"):
        rc.Recipe.from_dict(_recipe({"pass": "smooth", "alphas": {"x": "high"}}))


def test_run_time_fields_cannot_be_written_in_yaml_and_must_be_supplied():
    with pytest.raises(RecipeError, match="unknown setting 'stats' for pass 'smooth'"):
        rc.Recipe.from_dict(_recipe({"pass": "smooth", "stats": "calib.npz"}))
    recipe = rc.load_recipe("smoothquant")
    with pytest.raises(RecipeError, match="pass 'smooth' cannot be built: .*stats"):
        recipe.build()
    with pytest.raises(RecipeError, match=r"run-time settings for passes not in recipe 'smoothquant': \['fold-norm'\]"):
        recipe.build({"fold-norm": {}})
    for key in ("calibrator", "windows", "threads"):  # the Calibrator carries the windows and threads
        with pytest.raises(RecipeError, match=f"unknown setting '{key}' for pass 'quantize-gptq'"):
            rc.Recipe.from_dict(_recipe({"pass": "quantize-gptq", key: 1}))


def test_run_time_inputs_are_found_by_field_type():
    calibrated = {name: {f: kind.value for f, kind in runtime_inputs(pass_class(name)).items()} for name in PASSES}
    assert {name: found for name, found in calibrated.items() if found} == {
        "smooth": {"stats": "stats"}, "aqas": {"stats": "stats", "calibrator": "calibrator"},
        "affine": {"calibrator": "calibrator"}, "quantize": {"calibrator": "calibrator"},
        "quantize-gptq": {"calibrator": "calibrator"}, "quantize-kv": {"calibrator": "calibrator"},
        "bias-correct": {"reference": "reference", "calibrator": "calibrator"}}

    @dataclasses.dataclass(frozen=True)
    class Anywhere:  # any field name: the type decides; other types are settings
        text: Calibrator | None = None
        float_graph: ir.Model | None = None
        measured: CalibrationStats | None = None
        windows: int = 2

    assert runtime_inputs(Anywhere) == {"text": RuntimeInput.CALIBRATOR, "float_graph": RuntimeInput.REFERENCE,
                                        "measured": RuntimeInput.STATS}
    assert runtime_fields(Anywhere) == {"text", "float_graph", "measured"} and set(settable_fields(Anywhere)) == {"windows"}


@pytest.mark.parametrize(("entry", "message"), [
    ({"pass": "ort-attention-chunks", "chunks": 1}, "ort-attention-chunks: chunks must be at least 2, got 1"),
    ({"pass": "smooth", "alpha": 1.5}, r"smooth alpha must be within \[0, 1\], got 1.5"),  # a run-time field (stats)
    ({"pass": "ort-merge-linears", "max_columns": 1}, "ort-merge-linears: max_columns must be at least 2"),
    ({"pass": "quantize", "percentile": 0}, r"quantize percentile must be within \(0, 100\], got 0.0"),
])
def test_out_of_range_settings_fail_when_the_recipe_is_read(entry, message):
    """The pass's own checks run at load time, with its run-time fields empty: not after export and calibration."""
    with pytest.raises(RecipeError, match=r"passes\[1\]: " + message):
        rc.Recipe.from_dict(_recipe({"pass": "fold-norm"}, entry))


def test_a_bad_recipe_fails_before_the_export(tiny_source, tmp_path, capsys):
    from qexport.cli import main
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\npasses:\n  - pass: ort-attention-chunks\n    chunks: 1\n")
    assert main(["export", str(tiny_source("llama")), "--out", str(tmp_path / "out"), "--recipe", str(bad)]) != 0
    assert "bad.yaml.passes[0]: ort-attention-chunks: chunks must be at least 2" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_pass_module_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(rc.PASSES, "gptq", "qexport.passes.gptq_not_written:GptqPass")
    with pytest.raises(RecipeError, match="pass 'gptq' needs module qexport.passes.gptq_not_written, which cannot"):
        rc.Recipe.from_dict(_recipe({"pass": "gptq"}))


def test_entries_must_name_a_pass():
    with pytest.raises(RecipeError, match=r"passes\[0\]: each pass entry must be a mapping with a 'pass' key"):
        rc.Recipe.from_dict(_recipe({"rotation": "hadamard"}))
    with pytest.raises(RecipeError, match="non-empty list"):
        rc.Recipe.from_dict({"name": "t", "passes": []})


def test_rotate_preset_runs_losslessly_on_a_tiny_llama(tiny_export):
    model = load(tiny_export("llama"))
    give_norms_weights(model)
    feeds = make_feeds(model, past=0)
    expected = run(model, feeds)["logits"]
    for p in rc.load_recipe("rotate").build():
        assert p(model).modified, type(p).__name__
    np.testing.assert_allclose(run(model, feeds)["logits"], expected, rtol=1e-4, atol=1e-5)


def test_smooth_rotate_preset_runs_losslessly_on_a_tiny_qwen2(tiny_export):
    from qexport.calibration.stats import collect_stats

    model = load(tiny_export("qwen2"))
    give_norms_weights(model)
    feeds = make_feeds(model, past=0)
    expected = run(model, feeds)["logits"]
    windows = [np.random.default_rng(i).integers(3, 250, size=12, dtype=np.int64) for i in range(3)]
    passes = rc.load_recipe("smooth-rotate").build({"smooth": {"stats": collect_stats(model, windows)}})
    modified = [p(model).modified for p in passes]
    assert modified == [True, False, True, True, True, True]  # qwen2's embeddings are not tied
    np.testing.assert_allclose(run(model, feeds)["logits"], expected, rtol=1e-4, atol=1e-5)


def test_recipe_calibration_and_check_map_onto_settings():
    recipe = rc.Recipe.from_dict(_recipe({"pass": "fold-norm"}, calibration={"seq_len": 2048, "windows": 4},
                                         check="tensorrt"))
    assert recipe.calibration == rc.CalibrationSettings(seq_len=2048, windows=4)
    assert recipe.checks == (rc.RecipeCheck.TENSORRT,)
    assert rc.Recipe.from_dict(yaml.safe_load(recipe.to_yaml())) == recipe
    plain = rc.Recipe.from_dict(_recipe({"pass": "fold-norm"}))
    assert plain.calibration == rc.CalibrationSettings() and plain.checks == () and "calibration" not in plain.to_dict()
    mixed = rc.Recipe.from_dict(_recipe({"pass": "fold-norm"}, calibration={"text": "pydoc+manpages"}))
    assert mixed.calibration.text == "pydoc+manpages" and rc.Recipe.from_dict(yaml.safe_load(mixed.to_yaml())) == mixed
    for bad in ("", 3, ["pydoc"]):
        with pytest.raises(rc.RecipeError, match="text"):
            rc.Recipe.from_dict(_recipe({"pass": "fold-norm"}, calibration={"text": bad}))


@pytest.mark.parametrize("calibration, message", [
    ({"seq_length": 128}, r"t.calibration: unknown key 'seq_length'; allowed keys: seq_len, windows"),
    ({"seq_len": 0}, r"t.calibration.seq_len: 0 is not allowed; expected a positive integer"),
    ({"windows": "many"}, r"t.calibration.windows: 'many' is not allowed"),
    ([128], r"t.calibration: expected a mapping"),
])
def test_bad_recipe_calibration_names_the_key(calibration, message):
    with pytest.raises(RecipeError, match=message):
        rc.Recipe.from_dict(_recipe({"pass": "fold-norm"}, calibration=calibration), source="t")


def test_bad_recipe_check_lists_the_checks():
    with pytest.raises(RecipeError, match=r"t.check: 'onnx' is not allowed; expected one of 'tensorrt'"):
        rc.Recipe.from_dict(_recipe({"pass": "fold-norm"}, check="onnx"), source="t")


def test_calibration_shape_prefers_arguments_then_recipe_then_defaults():
    from qexport.api import DEFAULT_CALIB_SEQ_LEN, calibration_shape

    recipe = rc.Recipe.from_dict(_recipe({"pass": "fold-norm"}, calibration={"seq_len": 2048}))
    assert calibration_shape(recipe, None, None) == {
        "windows": 16, "seq_len": 2048, "text": None,
        "from": {"windows": "default", "seq_len": "recipe", "text": "default"}}
    assert calibration_shape(recipe, 2, 128, "gitnotes") == {
        "windows": 2, "seq_len": 128, "text": "gitnotes",
        "from": {"windows": "argument", "seq_len": "argument", "text": "argument"}}
    mixed = rc.Recipe.from_dict(_recipe({"pass": "fold-norm"}, calibration={"text": "pydoc+manpages"}))
    assert calibration_shape(mixed, None, None)["text"] == "pydoc+manpages"
    assert calibration_shape(mixed, None, None)["from"]["text"] == "recipe"
    plain = rc.Recipe.from_dict(_recipe({"pass": "fold-norm"}))
    assert calibration_shape(plain, None, None)["seq_len"] == DEFAULT_CALIB_SEQ_LEN
