"""AQAS: the alpha search loss against a numpy reference, and the fold it feeds stays exact."""

from __future__ import annotations

import numpy as np
import pytest

from pass_testing import give_norms_weights, load, make_feeds, prefill_decode, run, weights_of
from qexport.calibration.calibrator import Calibrator
from qexport.calibration.stats import collect_stats, run_values
from qexport.errors import RecipeError
from qexport.passes.discovery import sites
from qexport.passes.metadata import Meta
from qexport.passes.transforms.aqas import AqasPass
from qexport.passes.transforms.smooth import SmoothPass

WINDOWS = tuple(np.random.default_rng(i).integers(3, 250, size=20, dtype=np.int64) for i in range(2))
GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


def _reference_loss(x, w, act_absmax, w_range, alpha, per_token, channel_index, tensor_absmax):
    """||Q_A(X / s) Q_W(s W) - X W||_F^2 written out: int8 symmetric, per row (or one scale), per column."""
    s = np.where((act_absmax > 0) & (w_range > 0), act_absmax ** alpha / w_range ** (1 - alpha), 1.0)[channel_index]
    xs, ws = x / s, s[:, None] * w
    ax = np.abs(xs).max(axis=1, keepdims=True) / 127 if per_token else np.max(tensor_absmax / s) / 127
    xq = np.clip(np.round(xs / ax), -127, 127) * ax
    aw = np.abs(ws).max(axis=0, keepdims=True) / 127
    wq = np.clip(np.round(ws / aw), -127, 127) * aw
    return float(((xq @ wq - x @ w) ** 2).sum())


@pytest.mark.parametrize("activations", ["per_token", "per_tensor"])
def test_search_loss_matches_numpy_reference(tiny_export, activations):
    model = load(tiny_export("qwen2"))
    give_norms_weights(model)
    stats = collect_stats(model, WINDOWS)
    aqas = AqasPass(stats=stats, calibrator=Calibrator(WINDOWS), activations=activations, alphas_grid=GRID, tokens=1000)
    found = {s.name: s for s in sites.find_sites(model).all}
    names = ["layers.0.attn_norm", "layers.1.v_o", "layers.0.up_down"]
    rows = {}
    for outs in run_values(model, [found[n].activation.name for n in names], WINDOWS):
        for n in names:
            rows.setdefault(n, []).append(outs[found[n].activation.name].reshape(-1, outs[found[n].activation.name].shape[-1]))
    for name in names:
        site, x = found[name], np.concatenate(rows[name]).astype(np.float64)  # all 40 rows: tokens >= 40
        if isinstance(site, sites.NormSite):
            w = np.concatenate([lin.weight_in_out() for lin in site.linears], axis=1)
            w_range = np.abs(w).max(axis=1)
            act, index = stats[name].absmax, np.arange(x.shape[1])
        elif isinstance(site, sites.VOSite):
            w, index = site.o.weight_in_out(), site.o_to_v_channel()
            act, w_range = np.zeros(site.v.out_features), np.zeros(site.v.out_features)
            np.maximum.at(act, index, stats[name].absmax)
            np.maximum.at(w_range, index, np.abs(w).max(axis=1))
        else:
            w = site.down.weight_in_out()
            w_range, act, index = np.abs(w).max(axis=1), stats[name].absmax, np.arange(x.shape[1])
        expected = [_reference_loss(x, w, act, w_range, a, activations == "per_token", index, stats[name].absmax) for a in GRID]
        got = aqas.losses(site, x)
        np.testing.assert_allclose(got, expected, rtol=1e-4, err_msg=name)
        assert max(expected) > 1.05 * min(expected), name  # the grid matters: a loss that ignored s would fail


def test_aqas_is_exact_records_alphas_and_runs_once(tiny_export):
    model, twin = load(tiny_export("llama")), load(tiny_export("llama"))
    give_norms_weights(model)
    give_norms_weights(twin)
    stats = collect_stats(model, WINDOWS)
    feeds = make_feeds(model, past=0)
    expected = run(model, feeds)["logits"]
    aqas = AqasPass(stats=stats, calibrator=Calibrator(WINDOWS), sites=("layers.*",), alphas_grid=GRID)
    assert aqas(model).modified
    np.testing.assert_allclose(run(model, feeds)["logits"], expected, rtol=1e-4, atol=1e-5)
    prefill_decode(model)  # the smoothed v -> o cache still decodes
    alphas = {k: float(v) for k, v in Meta.AQAS_ALPHA.under(model.metadata_props).items()}
    assert set(alphas) == {s.name for s in sites.find_sites(twin).all} - {"final_norm"}
    assert set(alphas.values()) <= set(GRID)
    # the fold is SmoothQuant's with the chosen alpha per site
    SmoothPass(stats=collect_stats(twin, WINDOWS), alphas=alphas)(twin)
    for name, array in weights_of(twin).items():
        np.testing.assert_allclose(model.graph.initializers[name].const_value.numpy(), array, rtol=1e-6, err_msg=name)
    before = weights_of(model)
    assert not aqas(model).modified  # these statistics are spent on these sites
    assert all(np.array_equal(before[k], v) for k, v in weights_of(model).items())


def test_aqas_settings_are_checked():
    stats = None
    with pytest.raises(RecipeError, match="activations must be one of"):
        AqasPass(stats=stats, activations="per_channel")
    with pytest.raises(RecipeError, match="alphas_grid"):
        AqasPass(stats=stats, alphas_grid=(0.5, 1.5))
    with pytest.raises(RecipeError, match="tokens"):
        AqasPass(stats=stats, tokens=0)
