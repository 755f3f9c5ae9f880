"""AffinePass keeps the tiny models' outputs (FP32 ONNX Runtime, KV cache included) and its fit lowers the
site's fake-quantized output error with a full, strictly diagonally dominant matrix at v -> o."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from pass_testing import give_norms_weights, load, make_feeds, prefill_decode, run
from qexport import numerics
from qexport.calibration.calibrator import Calibrator
from qexport.calibration.stats import collect_stats
from qexport.errors import QexportError, RecipeError
from qexport.passes.discovery import sites
from qexport.passes._ir import const_f64
from qexport.passes.metadata import Meta
from qexport.passes.transforms.affine import AffinePass, problem_for
from qexport.calibration.affine_fit import FitSettings, band_mask, fit, is_strictly_dominant
from qexport.passes.transforms.smooth import SmoothPass
from qexport.recipes.schema import load_recipe

RTOL, ATOL = 1e-4, 1e-5  # FP32 after float64 folding: one rounding per weight, a few ulps through the network
# 128 sample rows, 2 steps per epoch; the band still reaches full width, and 10x the default lr makes the
# folded matrices far from diagonal (a harder exactness check; the default lr is tested on a single site)
FAST = dict(epochs=4, batch_tokens=64, lr=0.05)


def windows(seed: int = 0, count: int = 4, length: int = 32) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 250, size=length, dtype=np.int64) for _ in range(count)]


def folded_blocks(site: sites.VOSite, w_o_before: np.ndarray, w_o_after: np.ndarray) -> np.ndarray:
    """A per query head, read back from o_proj: B_o'[h] = A B_o[h], B_o[h] [head_dim, hidden] of full row rank."""
    hd = site.head_dim
    return np.stack([w_o_after[h * hd:(h + 1) * hd] @ np.linalg.pinv(w_o_before[h * hd:(h + 1) * hd])
                     for h in range(site.num_heads)])


def off_diagonal(a: np.ndarray) -> np.ndarray:
    return a * (1 - np.eye(a.shape[-1]))


def weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {name: v.const_value.numpy().copy() for name, v in model.graph.initializers.items() if v.const_value is not None}


def test_affine_is_exact_with_kv_cache(tiny_export, family):
    model = load(tiny_export(family))
    give_norms_weights(model)
    first, decoded = prefill_decode(model)
    v_o = {s.name: s for s in sites.find_sites(model).v_o}
    w_o = {name: s.o.weight_in_out() for name, s in v_o.items()}
    w_v = {name: s.v.weight_in_out() for name, s in v_o.items()}
    gamma = {s.layer: const_f64(s.norm.gamma) for s in sites.find_sites(model).norm_sites if s.role == "attn"}
    affine = AffinePass(calibrator=Calibrator(windows()), **FAST)

    assert affine(model).modified
    assert set(Meta.AFFINE.under(model.metadata_props)) == {
        s.name for s in sites.find_sites(model).all if not isinstance(s, sites.UpDownSite) and s.name != "final_norm"}
    first_after, decoded_after = prefill_decode(model)  # the decode step reads the transformed model's own cache
    for name in ("logits", *[k for k in first if ".key" in k]):
        np.testing.assert_allclose(first_after[name], first[name], rtol=RTOL, atol=ATOL, err_msg=name)
    np.testing.assert_allclose(decoded_after["logits"], decoded["logits"], rtol=RTOL, atol=ATOL, err_msg="decode logits")

    for site in sites.find_sites(model).v_o:
        a = folded_blocks(site, w_o[site.name], site.o.weight_in_out())
        group = site.num_heads // site.num_kv_heads
        kv_blocks = a[::group]
        np.testing.assert_allclose(a, np.repeat(kv_blocks, group, axis=0), atol=1e-5, err_msg=f"{site.name}: GQA replication")
        assert is_strictly_dominant(kv_blocks), site.name
        assert np.abs(off_diagonal(kv_blocks)).max() > 1e-3, f"{site.name}: only a diagonal was folded"
        hd, kv = site.head_dim, site.num_kv_heads  # v_proj holds diag(s) B_v A⁻¹: s from attn_norm, A⁻¹ per KV head
        norm = next(n for n in sites.find_sites(model).norm_sites if n.name == f"layers.{site.layer}.attn_norm")
        s = gamma[site.layer] / const_f64(norm.norm.gamma)
        w_v_after = site.v.weight_in_out().reshape(-1, kv, hd)
        np.testing.assert_allclose(np.einsum("rkd,kde->rke", w_v_after, kv_blocks).reshape(-1, kv * hd) / s[:, None],
                                   w_v[site.name], rtol=RTOL, atol=ATOL, err_msg=site.name)
        present = first_after[f"present.{site.layer}.value"]  # the cache stores V A⁻¹
        np.testing.assert_allclose(np.einsum("bktd,kde->bkte", present, kv_blocks), first[f"present.{site.layer}.value"],
                                   rtol=RTOL, atol=ATOL, err_msg=site.name)

    before = weights(model)  # contract: a second run with the same windows changes nothing
    assert not affine(model).modified
    after = weights(model)
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)


def numpy_loss(problem, a: np.ndarray, bits: int = 8) -> float:
    """Reference in float64 with symmetric RTN: per token for X A⁻¹, per output channel for A B."""
    full = np.zeros((problem.w.shape[0],) * 2)
    d = a.shape[-1]
    for k, block in enumerate(problem.block_of):
        full[k * d:(k + 1) * d, k * d:(k + 1) * d] = a[block]
    x, w = problem.x.astype(np.float64), problem.w
    qmax = numerics.int_qmax(bits)
    qx = numerics.fake_quant(x @ np.linalg.inv(full), axis=1, qmax=qmax)
    qw = numerics.fake_quant((full @ w).T, axis=1, qmax=qmax)  # torch layout rows = output channels
    return float(np.mean((qx @ qw.T - x @ w) ** 2))


@pytest.fixture(scope="module")
def v_o_problem(tiny_export):
    model = load(tiny_export("qwen2"))
    give_norms_weights(model)
    site = sites.find_sites(model).v_o[0]
    rows = Calibrator(windows(seed=5, count=8, length=64)).sample_rows(model, [site.activation.name], tokens=512)
    return problem_for(site, rows[site.activation.name].astype(np.float32))


def test_fit_lowers_the_quantized_loss_with_a_full_matrix(v_o_problem):
    result = fit(v_o_problem, FitSettings(batch_tokens=128))  # default lr and epochs, 4 steps per epoch
    print(f"layers.0.v_o W8A8 loss {result.loss_init:.4g} -> {result.loss_final:.4g}")
    assert result.loss_final < 0.95 * result.loss_init
    start = np.stack([np.diag(row) for row in v_o_problem.init])
    np.testing.assert_allclose(numpy_loss(v_o_problem, start), result.loss_init, rtol=1e-3)
    np.testing.assert_allclose(numpy_loss(v_o_problem, result.matrix), result.loss_final, rtol=1e-3)
    assert is_strictly_dominant(result.matrix)
    assert np.abs(off_diagonal(result.matrix)).max() > 1e-3 * np.abs(result.matrix).max()
    # a single epoch never widens the band: the result is diagonal
    assert not np.any(off_diagonal(fit(v_o_problem, FitSettings(epochs=1)).matrix))


def test_large_steps_keep_strict_diagonal_dominance(v_o_problem):
    result = fit(v_o_problem, FitSettings(lr=0.5))
    assert result.shrunk_rows > 0  # the steps did break dominance, and it was restored
    assert is_strictly_dominant(result.matrix)
    assert np.abs(off_diagonal(result.matrix)).max() > 0.1


def test_band_mask_widens_to_full():
    np.testing.assert_array_equal(band_mask(5, 0, 3, 0.1).numpy(), np.eye(5))
    middle = band_mask(5, 1, 3, 0.1).numpy()  # width floor(4 * 1 / 2) = 2
    distance = np.abs(np.subtract.outer(np.arange(5), np.arange(5)))
    np.testing.assert_allclose(middle, np.where(distance == 0, 1.0, np.where(distance <= 2, 0.1, 0.0)))
    np.testing.assert_allclose(band_mask(5, 2, 3, 0.1).numpy(), np.where(distance == 0, 1.0, 0.1))


def test_samples_are_rows_of_the_site_activation(tiny_export):
    model = load(tiny_export("opt"))
    token_windows = windows(count=3, length=12)
    found = sites.find_sites(model)
    names = [site.activation.name for site in found.all]
    samples = Calibrator(token_windows).sample_rows(model, names, tokens=10_000)
    stats = collect_stats(model, token_windows)
    for site in found.all:
        assert samples[site.activation.name].shape[0] == 36, site.name
        np.testing.assert_allclose(np.abs(samples[site.activation.name]).max(axis=0), stats[site.name].absmax, rtol=1e-6,
                                   err_msg=site.name)
    assert all(s.shape[0] == 20 for s in Calibrator(token_windows).sample_rows(model, names, tokens=20).values())


def test_smooth_affine_preset_is_exact(tiny_export):
    model = load(tiny_export("llama"))
    give_norms_weights(model)
    token_windows = windows(seed=7)
    feeds = make_feeds(model, past=0)
    expected = run(model, feeds)
    passes = load_recipe("smooth-affine").build(
        {"smooth": {"stats": collect_stats(model, token_windows)}, "affine": {"calibrator": Calibrator(token_windows)}})
    assert [type(p) for p in passes] == [SmoothPass, AffinePass]
    for p in passes:
        assert p(model).modified
    assert {k for k in model.metadata_props if k.startswith(Meta.AFFINE)} == {
        Meta.AFFINE.key(f"layers.{i}.{kind}") for i in (0, 1) for kind in ("attn_norm", "mlp_norm", "v_o")}
    np.testing.assert_allclose(run(model, feeds)["logits"], expected["logits"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("settings, key", [
    ({"epochs": 0}, "epochs"), ({"mask_scale": 1.5}, "mask_scale"), ({"act_bits": 1}, "act_bits"), ({"sites": "layers.*"}, "sites"),
])
def test_bad_settings_name_the_key(settings, key):
    with pytest.raises(RecipeError, match=key):
        AffinePass(calibrator=Calibrator(windows()), **settings)


def test_missing_windows_is_an_error(tiny_export):
    with pytest.raises(QexportError, match="windows"):
        AffinePass()(load(tiny_export("llama")))
    with pytest.raises(QexportError, match="no calibration windows"):
        AffinePass(calibrator=Calibrator(()))
