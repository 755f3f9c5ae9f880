"""A recipe whose pass cannot apply to the exported graph fails right after export, before any calibration."""

from __future__ import annotations

import time

import pytest

import qexport
from pass_testing import load
from qexport.errors import RecipeError
from qexport.recipes import schema as rc
from qexport.recipes.preflight import check_recipe_applies


def _no_calibration(monkeypatch):
    """Make any calibration fail the test: the error must come before it."""
    import qexport.recipes.pipeline as pipeline

    def forbidden(*args, **kwargs):
        raise AssertionError("calibration ran before the recipe was checked against the graph")

    monkeypatch.setattr(pipeline, "collect_stats", forbidden)
    monkeypatch.setattr(pipeline, "_observe", forbidden)
    monkeypatch.setattr(pipeline, "_run_logits", forbidden)


@pytest.mark.parametrize("family, preset", [
    ("opt", "rotate"),  # LayerNorm: R1 needs layernorm-to-rms first, which the rotate preset lacks
    ("gemma3", "w8a8-dynamic"),  # post-norms between each branch and its residual add
])
def test_a_pass_that_cannot_apply_fails_before_calibration_in_seconds(tiny_source, tmp_path, monkeypatch, family,
                                                                       preset):
    """A recipe file runs exactly as written: the preset copied to a file is not adapted to the family (by name,
    it would be: test_recipe_adapt)."""
    _no_calibration(monkeypatch)
    written = tmp_path / f"my-{preset}.yaml"
    written.write_text(rc.load_recipe(preset).to_yaml())
    start = time.perf_counter()
    with pytest.raises(RecipeError, match=r"pass 3 \(rotate-residual\) fails on its graph before any calibration"):
        qexport.export(str(tiny_source(family)), tmp_path / "out", recipe=str(written))
    assert time.perf_counter() - start < 60
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_the_check_leaves_the_graph_as_it_was_and_accepts_a_recipe_that_applies(tiny_export):
    model = load(tiny_export("llama"))
    before = {name: v.const_value.numpy().copy() for name, v in model.graph.initializers.items()}
    nodes = len(model.graph)
    check_recipe_applies(model, rc.load_recipe("w8a8-static"))  # smooth (calibrated) is skipped, the rotations run
    assert len(model.graph) == nodes and model.graph.initializers.keys() == before.keys()
    assert all((v.const_value.numpy() == before[n]).all() for n, v in model.graph.initializers.items())


def test_the_error_names_the_pass_and_what_to_do(tiny_export):
    model = load(tiny_export("opt"))
    with pytest.raises(RecipeError) as info:
        check_recipe_applies(model, rc.load_recipe("rotate"))
    message = str(info.value)
    assert "rotate-residual" in message and "samples/recipes" in message and "--recipe" in message


def test_the_trial_copy_shares_the_weights_read_only(tiny_export):
    import numpy as np
    import onnx_ir as ir

    from qexport.passes._ir import trial_copy

    model = load(tiny_export("qwen2"))
    for value in model.graph.initializers.values():  # in memory, as after an export (not views of a loaded proto)
        value.const_value = ir.Tensor(value.const_value.numpy(), name=value.name)
    trial = trial_copy(model)
    shared = [n for n, v in model.graph.initializers.items() if v.const_value.size >= 1024]
    assert len(shared) >= 10
    for name in shared:
        ours, theirs = trial.graph.initializers[name].const_value.numpy(), model.graph.initializers[name].const_value.numpy()
        assert np.shares_memory(ours, theirs) and not ours.flags.writeable, name
    with pytest.raises(ValueError, match="read-only"):
        trial.graph.initializers[shared[0]].const_value.numpy()[...] = 0
    assert ir.to_proto(trial) == ir.to_proto(model)  # otherwise the same model
