"""qexport.difficulty against hand-computed values, and the smoothing/rotation claims they support."""

from __future__ import annotations

import numpy as np
import pytest

from qexport import difficulty as dif
from qexport.passes.transforms.hadamard import hadamard_matrix

# Hand example: X = [[3, 0], [4, 1]], W = [[1, 0], [0, 2]].
X = np.array([[3.0, 0.0], [4.0, 1.0]])
W = np.array([[1.0, 0.0], [0.0, 2.0]])


def test_channel_magnitudes_and_difficulties_by_hand():
    np.testing.assert_allclose(dif.channel_magnitudes(X), [5.0, 1.0])
    assert dif.activation_difficulty(X) == pytest.approx(2.0)  # std of [5, 1]
    assert dif.weight_difficulty(W) == pytest.approx(0.5)  # std of [1, 2]


def test_layer_error_by_hand_2bit():
    # 2 bits: qmax 1. Q(X) rows: step 3 -> [3, 0]; step 4 -> [4, round(0.25)=0] = [4, 0]. Q(W) = W.
    # X Wᵀ = [[3, 0], [4, 2]], Q(X)Q(W)ᵀ = [[3, 0], [4, 0]] -> error 2² = 4.
    assert dif.layer_error(X, W, bits=2) == pytest.approx(4.0)


def test_estimate_by_hand_2bit():
    # (1/12)(‖W‖² Σ Δ_t² + ‖X‖² Σ Δ_o²) = (5 * (9 + 16) + 26 * (1 + 4)) / 12 = 255 / 12.
    assert dif.error_estimate(X, W, bits=2) == pytest.approx(255 / 12)


def test_rtn_rows_by_hand_4bit():
    q, step = dif.rtn_rows(np.array([[7.0, 1.2, -3.6], [0.0, 0.0, 0.0]]), bits=4)
    np.testing.assert_allclose(step, [1.0, 0.0])
    np.testing.assert_allclose(q, [[7.0, 1.0, -4.0], [0.0, 0.0, 0.0]])


def _outlier_layer(seed: int = 0, tokens: int = 256, n: int = 64, out: int = 48):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, n))
    x[:, [3, 17]] *= 40.0  # activation outlier channels
    w = rng.standard_normal((out, n)) * 0.05
    return x, w


def test_estimate_tracks_error_at_8bit():
    x, w = _outlier_layer()
    d = dif.measure(x, w, bits=8)
    assert 0.5 < d.error / d.estimate < 2.0


def test_l2_smoothing_lowers_the_product_to_the_cauchy_schwarz_bound():
    x, w = _outlier_layer()
    s = dif.l2_smoothing_scales(x, w)
    before, after = dif.norm_product(x, w), dif.norm_product(x / s, w * s)
    bound = np.sum(dif.channel_magnitudes(x) * dif.channel_magnitudes(w)) ** 2
    assert after == pytest.approx(bound, rel=1e-10)
    assert after < 0.3 * before
    assert dif.activation_difficulty(x / s) < 0.1 * dif.activation_difficulty(x)
    # Output unchanged: the transform is exact in floating point.
    np.testing.assert_allclose((x / s) @ (w * s).T, x @ w.T, rtol=1e-10, atol=1e-12)


def test_smooth_then_rotate_beats_rotate_alone():
    x, w = _outlier_layer()
    h = hadamard_matrix(x.shape[1])
    s = dif.l2_smoothing_scales(x, w)
    rotated = dif.layer_error(x @ h, w @ h, bits=4)
    smoothed_rotated = dif.layer_error((x / s) @ h, (w * s) @ h, bits=4)
    assert smoothed_rotated < 0.5 * rotated


def test_rotation_flattens_peaky_rows():
    n = 64
    x = np.random.default_rng(1).standard_normal((32, n))
    x[np.arange(32), np.arange(32) % n] = 20.0  # one outlier per token sets a coarse per-token step
    rotated = x @ hadamard_matrix(n)
    np.testing.assert_allclose(np.linalg.norm(rotated, axis=1), np.linalg.norm(x, axis=1))  # norms kept
    _, step = dif.rtn_rows(x, bits=4)
    _, step_rot = dif.rtn_rows(rotated, bits=4)
    assert np.all(step_rot < 0.5 * step)
    w = np.random.default_rng(2).standard_normal((16, n))
    assert dif.layer_error(rotated, w @ hadamard_matrix(n)) < 0.3 * dif.layer_error(x, w)


def test_rotation_cannot_fix_a_massive_token():
    # a token that is almost one huge entry keeps its norm; after rotation its whole row is coarse.
    n = 64
    x = np.random.default_rng(1).standard_normal((32, n)) * 0.1
    x[np.arange(32), np.arange(32) % n] = 50.0
    w = np.random.default_rng(2).standard_normal((16, n))
    assert dif.layer_error(x @ hadamard_matrix(n), w @ hadamard_matrix(n)) > dif.layer_error(x, w)


def test_format_table():
    table = dif.format_table({"layers.0.down_proj": dif.measure(X, W, bits=2), "q": dif.measure(X, W, bits=2)})
    lines = table.splitlines()
    assert lines[0].split() == ["layer", "D(X)", "D(W)", "error", "estimate", "bits"]
    assert lines[2].split() == ["layers.0.down_proj", "2", "0.5", "4", "21.25", "2"]
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1


def test_rejects_non_matrix():
    with pytest.raises(ValueError, match="2-D"):
        dif.channel_magnitudes(np.zeros(3))
