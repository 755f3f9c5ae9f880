"""The Calibrator: what calibrating passes are given. Its producers run the graph as it is when asked and leave it
as it was; a pass without one says it needs calibration windows."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from pass_testing import load
from qexport.calibration.calibrator import Calibrator, ErrorProbe
from qexport.calibration.stats import collect_stats, run_values
from qexport.errors import QexportError, RecipeError
from qexport.passes._ir import new_initializer
from qexport.passes.discovery import sites
from qexport.passes.metadata import Meta
from qexport.passes.quantize.bias_correction import BiasCorrectPass
from qexport.passes.quantize.gptq import GptqPass
from qexport.passes.quantize.insert_qdq import QuantizePass
from qexport.passes.transforms.affine import AffinePass
from qexport.passes.transforms.aqas import AqasPass

WINDOWS = (np.arange(3, 35, dtype=np.int64), np.arange(100, 124, dtype=np.int64), np.arange(50, 70, dtype=np.int64))


def test_windows_head_and_fingerprint():
    with pytest.raises(QexportError, match="no calibration windows"):
        Calibrator(())
    calibrator = Calibrator(list(WINDOWS), threads=1)
    assert calibrator.windows == WINDOWS and isinstance(calibrator.windows, tuple)
    head = calibrator.head(2)
    assert head.windows == WINDOWS[:2] and head.threads == 1
    assert head.fingerprint() != calibrator.fingerprint() == Calibrator(WINDOWS).fingerprint()
    # the value affine wrote before the Calibrator existed: a model fitted then is still skipped on these windows
    pinned = (np.arange(3, 20, dtype=np.int64), np.arange(40, 48, dtype=np.int32).reshape(2, 4))
    assert Calibrator(pinned).fingerprint() == "65a900ad38f19d558dd3eef8281b9ab6"


def test_sample_rows_are_the_same_token_rows_of_every_value(tiny_export):
    model = load(tiny_export("llama"))
    names = [site.activation.name for site in sites.find_sites(model).all]
    rows = Calibrator(WINDOWS).sample_rows(model, names, tokens=30, seed=3)
    keep = np.sort(np.random.default_rng(3).choice(76, size=30, replace=False))  # 76 tokens in all
    for name in names:
        runs = run_values(model, [name], WINDOWS)
        every = np.concatenate([outs[name].reshape(-1, outs[name].shape[-1]) for outs in runs])
        assert rows[name].dtype == np.float64 and rows[name].shape == (30, every.shape[1])
        np.testing.assert_array_equal(rows[name], every[keep])
    everything = Calibrator(WINDOWS).sample_rows(model, names[:1], tokens=1000)
    assert everything[names[0]].shape[0] == 76


def test_hessians_see_the_graph_as_it_is_when_each_stage_is_asked_for(tiny_export):
    """A weight changed between stages changes the later stage's Hessian, exactly as a fresh run shows it."""
    model = load(tiny_export("llama"))
    found = sites.find_sites(model)
    first, second = found.norm_sites[0], found.norm_sites[1]  # layers.0 attn and mlp norms
    stages = [[first.activation], [second.activation]]
    before = next(Calibrator(WINDOWS).hessians(model, [[second.activation]]))
    stream = Calibrator(WINDOWS).hessians(model, stages)
    assert next(stream).hessians.keys() == {first.activation}
    o_proj = found.v_o[0].o.weight  # feeds the residual add before the mlp norm
    o_proj.const_value = ir.tensor(o_proj.const_value.numpy() * 2.0, name=o_proj.name)
    later = next(stream)
    assert later.from_cache  # from the residual stream cached by the first stage
    fresh = next(Calibrator(WINDOWS).hessians(model, [[second.activation]])).hessians[second.activation]
    h = later.hessians[second.activation]
    np.testing.assert_allclose(h, fresh, rtol=1e-6, atol=1e-9 * np.abs(fresh).max())
    assert np.abs(h - before.hessians[second.activation]).max() > 1e-3 * np.abs(fresh).max()


def test_producers_leave_the_graph_as_it_was(tiny_export):
    model = load(tiny_export("llama"))
    found = sites.find_sites(model)
    calibrator = Calibrator(WINDOWS)
    site = found.v_o[0]
    bias = new_initializer(model.graph, "probe.bias", np.zeros(site.o.out_features, np.float32))
    add = ir.node("Add", [site.o.node.outputs[0], bias])
    model.graph.insert_after(site.o.node, add)  # a correction Add read by nothing: the graph's outputs are the same
    saved = ir.to_proto(model).SerializeToString()
    values = [s.activation for s in found.all]
    scales = calibrator.activation_scales(model, values, "minmax")
    assert set(scales) == set(values) and all(s.scale > 0 for s in scales.values())
    calibrator.sample_rows(model, [v.name for v in values], tokens=8)
    list(calibrator.hessians(model, [values[:2], values[2:]]))
    probe = ErrorProbe(site.activation, site.o.node.outputs[0], site.o.weight_in_out(), 0.0, bias)
    errors = calibrator.bias_errors(model, [[probe]])
    assert np.abs(errors[probe]).max() < 1e-4  # the float graph: no error but float32 rounding
    assert ir.to_proto(model).SerializeToString() == saved
    assert not any(Meta.ACT_CALIBRATION in v.meta for v in values)


def test_a_calibrating_pass_without_a_calibrator_says_it_needs_windows(tiny_export):
    model = load(tiny_export("llama"))
    stats = collect_stats(model, WINDOWS)
    for make in (lambda: QuantizePass(activations="per_tensor"), lambda: GptqPass(), lambda: AffinePass(),
                 lambda: AqasPass(stats=stats), lambda: BiasCorrectPass(reference=load(tiny_export("llama")))):
        with pytest.raises(RecipeError, match="calibration windows"):
            make()(model)
    assert QuantizePass()(model).modified  # per-token activations need no calibration
