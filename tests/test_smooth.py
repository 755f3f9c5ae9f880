"""SmoothPass keeps the model's outputs and divides each smoothed activation channel by its scale."""

from __future__ import annotations

import numpy as np
import pytest

from pass_testing import assert_outputs_close, give_norms_weights, load, make_feeds, run
from qexport.calibration.stats import collect_stats
from qexport.errors import RecipeError
from qexport.passes.discovery import sites
from qexport.passes.transforms.fold_norm import FoldNormPass
from qexport.passes.transforms.smooth import SmoothMethod, SmoothPass
from test_calibration import windows

RTOL, ATOL = 1e-4, 1e-5  # FP32 equivalence, and recollected absmax vs max|X_j| / s_j


def value_scales(scales: dict) -> dict[int, np.ndarray]:
    """Per layer, the scale each v channel was divided by (1 where v -> o was not smoothed)."""
    return {site.layer: s for site, s in scales.items() if isinstance(site, sites.VOSite)}


def cache_in_scaled_basis(feeds: dict, v_scales: dict[int, np.ndarray]) -> dict:
    """Past values as the smoothed graph stores them: V / s per KV channel."""
    feeds = dict(feeds)
    for layer, s in v_scales.items():
        past = feeds[f"past_key_values.{layer}.value"]
        feeds[f"past_key_values.{layer}.value"] = (past / s.reshape(past.shape[1], 1, past.shape[3])).astype(np.float32)
    return feeds


def check_smoothing(model, smooth: SmoothPass, token_windows) -> None:
    feeds = make_feeds(model)
    expected = run(model, feeds)
    scales = smooth.scales_for(model)
    assert {s.name for s in scales} == {s.name for s in sites.find_sites(model).all} - {"final_norm"}
    for site, s in scales.items():  # a pass that did nothing would have every scale at 1
        assert np.max(np.abs(np.log(s))) > 0.05, site.name
    assert smooth(model).modified

    v_scales = value_scales(scales)
    actual = run(model, cache_in_scaled_basis(feeds, v_scales))
    for layer, s in v_scales.items():
        present = actual[f"present.{layer}.value"]
        actual[f"present.{layer}.value"] = present * s.reshape(present.shape[1], 1, present.shape[3])
    assert_outputs_close(actual, expected)  # logits, keys, and values back in the original basis

    after = collect_stats(model, token_windows)
    for site, s in scales.items():
        per_channel = s[site.o_to_v_channel()] if isinstance(site, sites.VOSite) else s
        np.testing.assert_allclose(after[site.name].absmax, smooth.stats[site.name].absmax / per_channel,
                                   rtol=RTOL, atol=ATOL, err_msg=site.name)
    # contract: these statistics are spent on these sites; a second run skips them
    assert not smooth(model).modified


@pytest.mark.parametrize("method", list(SmoothMethod))
def test_smoothing_is_exact(tiny_export, family, method):
    model = load(tiny_export(family))
    give_norms_weights(model)
    token_windows = windows(seed=2)
    stats = collect_stats(model, token_windows)
    check_smoothing(model, SmoothPass(stats=stats, method=method), token_windows)


def test_smoothing_after_fold_norm(tiny_export):
    model = load(tiny_export("qwen2"))
    give_norms_weights(model)
    FoldNormPass()(model)
    token_windows = windows(seed=3)
    stats = collect_stats(model, token_windows)  # collected on the folded graph the pass rewrites
    check_smoothing(model, SmoothPass(stats=stats, alpha=0.7, alphas={"layers.*.up_down": 0.3}), token_windows)


def test_smoothquant_formula_and_per_site_alpha(tiny_export):
    model = load(tiny_export("llama"))
    give_norms_weights(model)
    stats = collect_stats(model, windows())
    smooth = SmoothPass(stats=stats, alpha=0.5, alphas={"layers.1.*": 0.85}, sites=("layers.*.up_down",))
    scales = {site.name: (site, s) for site, s in smooth.scales_for(model).items()}
    assert set(scales) == {"layers.0.up_down", "layers.1.up_down"}
    for name, alpha in (("layers.0.up_down", 0.5), ("layers.1.up_down", 0.85)):
        site, s = scales[name]
        w = np.abs(site.down.weight_in_out()).max(axis=1)
        np.testing.assert_allclose(s, stats[name].absmax**alpha / w ** (1 - alpha), rtol=1e-12)


def test_atq_scales_only_outliers(tiny_export):
    model = load(tiny_export("llama"))
    give_norms_weights(model)
    stats = collect_stats(model, windows())
    smooth = SmoothPass(stats=stats, method="atq", percentile=90.0)
    for site, s in smooth.scales_for(model).items():
        r = stats[site.name].absmax if not isinstance(site, sites.VOSite) else None
        if r is not None:
            tau = np.percentile(r, 90.0)
            np.testing.assert_allclose(s, np.maximum(1.0, r / tau), rtol=1e-12)
            assert np.mean(s == 1.0) >= 0.85, site.name


@pytest.mark.parametrize("settings, key", [({"alpha": 1.5}, "alpha"), ({"method": "magic"}, "method"),
                                           ({"alphas": {"layers.*": -0.1}}, "alphas"), ({"percentile": 0}, "percentile")])
def test_bad_settings_name_the_key(settings, key):
    from qexport.calibration.stats import CalibrationStats

    with pytest.raises(RecipeError, match=key):
        SmoothPass(stats=CalibrationStats({}), **settings)
