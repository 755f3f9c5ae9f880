"""qexport.numerics against straightforward numpy references and values worked by hand."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest

from qexport import numerics


def _rows(seed: int = 0, tokens: int = 16, n: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, n))
    x[3] *= 50.0  # one loud token: per-token scales differ from the per-tensor one
    x[5, 7] = 40.0  # and an outlier entry
    return x


def _reference_rows(x: np.ndarray, qmax: int) -> np.ndarray:
    """Row by row: s = max|row| / qmax, clip(round(row / s), -qmax, qmax) * s; all-zero rows stay zero."""
    out = np.zeros_like(x)
    for i, row in enumerate(x):
        s = np.abs(row).max() / qmax
        out[i] = np.clip(np.round(row / s), -qmax, qmax) * s if s > 0 else 0.0
    return out


def test_qmax_of_symmetric_grids():
    assert numerics.INT8_QMAX == numerics.int_qmax(8) == 127
    assert numerics.int_qmax(4) == 7 and numerics.int_qmax(2) == 1
    with pytest.raises(ValueError, match="at least 2"):
        numerics.int_qmax(1)


def test_rtn_by_hand_4bit():
    # Row 0: absmax 7, qmax 7 -> step 1: [7, round(1.2), round(-3.6)] = [7, 1, -4]. Row 1 is all zero.
    x = np.array([[7.0, 1.2, -3.6], [0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(numerics.fake_quant(x, axis=1, qmax=numerics.int_qmax(4)), [[7.0, 1.0, -4.0], [0, 0, 0]])
    np.testing.assert_array_equal(numerics.absmax_scale(np.abs(x).max(axis=1), qmax=7), [1.0, 1.0])  # 1 where absmax 0


@pytest.mark.parametrize("bits", [8, 4])
def test_per_token_equals_the_row_by_row_reference(bits):
    x = _rows()
    x[9] = 0.0  # an all-zero token
    qmax = numerics.int_qmax(bits)
    got = numerics.fake_quant(x, qmax=qmax)  # axis=-1: per token
    np.testing.assert_array_equal(got, _reference_rows(x, qmax))
    assert np.all(got[9] == 0.0) and np.all(np.isfinite(got))
    step = np.abs(x).max(axis=1, keepdims=True) / qmax
    codes = got[[i for i in range(len(x)) if i != 9]] / np.delete(step, 9, axis=0)
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-9)  # integers...
    assert np.abs(np.round(codes)).max() == qmax  # ...within [-qmax, qmax], the absmax on the grid's end
    assert np.all(np.abs(got - x) <= step / 2 * (1 + 1e-12))  # round-to-nearest: at most half a step off


def test_per_tensor_and_per_channel_scales():
    x = _rows(seed=1)
    step = np.abs(x).max() / 127
    per_tensor = numerics.fake_quant(x, axis=None)
    np.testing.assert_array_equal(per_tensor, np.clip(np.round(x / step), -127, 127) * step)
    per_token = numerics.fake_quant(x)
    quiet = [i for i in range(len(x)) if i not in (3, 5)]
    # the loud token sets the per-tensor step: the quiet tokens lose far more than with their own scales
    assert np.sum((per_tensor[quiet] - x[quiet]) ** 2) > 100 * np.sum((per_token[quiet] - x[quiet]) ** 2)
    w = x.T  # [in, out]: axis 0 is one scale per output channel (column)
    np.testing.assert_array_equal(numerics.fake_quant(w, axis=0), _reference_rows(x, 127).T)


def test_a_given_scale_clips_and_rounds_half_to_even():
    x = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 200.0, -300.0])
    np.testing.assert_array_equal(numerics.fake_quant(x, scale=1.0), [0.0, 2.0, 2.0, -0.0, -2.0, 127.0, -127.0])
    scales = np.array([[0.5], [2.0]])  # one row per scale, as the MSE clip search
    np.testing.assert_array_equal(numerics.fake_quant(np.array([[3.3, -1.1]]), scale=scales),
                                  [[3.5, -1.0], [4.0, -2.0]])
    np.testing.assert_array_equal(numerics.fake_quant(x, scale=0.1, qmax=7), np.clip(np.round(x / 0.1), -7, 7) * 0.1)


def test_eps_floors_the_scale_instead_of_replacing_a_zero_one():
    x = np.array([[1e-12, 0.4e-12], [0.0, 0.0], [1.0, -0.5]])
    step = np.abs(x).max(axis=1, keepdims=True) / 127
    np.testing.assert_array_equal(numerics.absmax_scale(np.abs(x).max(axis=1), eps=1e-12), [1e-12, 1e-12, 1 / 127])
    floored = numerics.fake_quant(x, eps=1e-12)
    np.testing.assert_array_equal(floored[0], [1e-12, 0.0])  # step floored at 1e-12: 0.4 rounds to 0
    np.testing.assert_array_equal(numerics.fake_quant(x)[0], np.round(x[0] / step[0]) * step[0])  # its own step
    assert np.all(floored[1] == 0.0)
    np.testing.assert_array_equal(floored[2], numerics.fake_quant(x)[2])  # above eps both are absmax / 127


def test_sqnr_against_numpy_and_by_hand():
    rng = np.random.default_rng(2)
    ref = rng.standard_normal((8, 16))
    cand = ref + 0.01 * rng.standard_normal(ref.shape)
    expected = 10 * np.log10(np.sum(ref**2) / np.sum((cand - ref) ** 2))
    assert numerics.sqnr_db(ref, cand) == float(expected)
    assert numerics.sqnr_db(np.ones(100), np.ones(100) + 0.01) == pytest.approx(40.0, abs=1e-9)  # 10 log10(1 / 1e-4)
    # running sums over chunks give the whole-array figure
    sums = [numerics.signal_noise(r, c) for r, c in zip(np.split(ref, 4), np.split(cand, 4))]
    total = numerics.sqnr_db_from_sums(sum(s for s, _ in sums), sum(n for _, n in sums))
    assert total == pytest.approx(float(expected), rel=1e-12)


def test_sqnr_edge_cases():
    x = np.array([1.0, -2.0])
    assert numerics.sqnr_db(x, x) == math.inf  # no noise
    assert numerics.sqnr_db(np.zeros(2), np.zeros(2)) == math.inf
    assert numerics.sqnr_db(np.zeros(2), x) == -math.inf  # noise, no signal
    assert numerics.sqnr_db_from_sums(0.0, 0.0) == math.inf and numerics.sqnr_db_from_sums(0.0, 1.0) == -math.inf
    assert numerics.sqnr_db_from_sums(1000.0, 1.0) == pytest.approx(30.0, abs=1e-12)


def test_signal_noise_sums_in_float64():
    ref = np.full(4, 1e20, dtype=np.float32)  # its square overflows float32
    signal, noise = numerics.signal_noise(ref, ref)
    assert signal == pytest.approx(4e40, rel=1e-6) and noise == 0.0


def test_cosine_whole_array():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((4, 6)), rng.standard_normal((4, 6))
    assert numerics.cosine(a, b) == float(np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b)))
    assert numerics.cosine([1.0, 0.0], [0.0, 3.0]) == 0.0
    assert numerics.cosine([1.0, 2.0], [2.0, 4.0]) == pytest.approx(1.0, abs=1e-15)
    assert numerics.cosine([1.0, 2.0], [-1.0, -2.0]) == pytest.approx(-1.0, abs=1e-15)
    assert numerics.cosine(np.zeros(3), np.zeros(3)) == 1.0 and numerics.cosine(np.zeros(3), np.ones(3)) == 0.0


@pytest.mark.parametrize("floor", ["max", "add"])
def test_row_cosines_against_the_row_by_row_reference(floor):
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((10, 8)).astype(np.float32), rng.standard_normal((10, 8)).astype(np.float32)
    a[2] = 0.0  # an all-zero token
    got = numerics.row_cosines(a, b, floor=floor)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    for i in range(len(a)):
        norms = np.linalg.norm(a64[i]) * np.linalg.norm(b64[i])
        assert got[i] == pytest.approx(np.dot(a64[i], b64[i]) / norms if norms else 0.0, rel=1e-14, abs=1e-300)
    assert got[2] == 0.0 and got.dtype == np.float64


def test_row_cosine_guards_differ_only_below_eps():
    a = np.array([[1e-16, 0.0], [3.0, 4.0]])  # row 0: norm product 1e-32, under eps
    np.testing.assert_allclose(numerics.row_cosines(a, a, floor="max"), [1e-32 / 1e-30, 1.0], rtol=1e-15)
    np.testing.assert_allclose(numerics.row_cosines(a, a, floor="add"), [1e-32 / (1e-32 + 1e-30), 1.0], rtol=1e-15)
    with pytest.raises(ValueError, match="floor"):
        numerics.row_cosines(a, a, floor="where")


def test_max_abs_diff_keeps_the_inputs_precision():
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal(1000).astype(np.float32) * 30, rng.standard_normal(1000).astype(np.float32) * 30
    assert numerics.max_abs_diff(a, b) == float(np.abs(a - b).max())  # the float32 difference, as before
    assert numerics.max_abs_diff(np.array([1.0, -2.0]), np.array([1.5, 2.0])) == 4.0
    assert numerics.max_abs_diff(np.zeros((0, 3)), np.zeros((0, 3))) == 0.0


def test_numerics_imports_numpy_only():
    tree = ast.parse((Path(numerics.__file__)).read_text())
    modules = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert modules <= {"__future__", "math", "typing", "numpy"}, modules
