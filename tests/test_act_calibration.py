"""Static activation scales: the MSE-optimal clip against a brute-force numpy search on the raw activations."""

from __future__ import annotations

import numpy as np
import pytest

from pass_testing import load
from qexport.calibration.calibrator import Calibrator
from qexport.calibration.stats import run_values
from qexport.calibration.activation_scales import (
    MSE_CANDIDATES, AbsHistogram, ActCalibration, mse_clip, quantization_mse, static_scales)
from qexport.passes.quantize.insert_qdq import QuantizePass
from qexport.passes.metadata import Meta

CALIB = (np.arange(3, 67, dtype=np.int64), np.arange(100, 164, dtype=np.int64))


def _exact_mse(x: np.ndarray, clip: float) -> float:
    """Reference: int8 symmetric fake quantization with scale clip / 127, mean squared error over all of x."""
    scale = clip / 127.0
    return float(np.mean((x - np.clip(np.round(x / scale), -127, 127) * scale) ** 2))


def _brute_force(x: np.ndarray) -> tuple[float, float]:
    """(best clip, its MSE) over the same candidate grid, on the raw values."""
    absmax = float(np.abs(x).max())
    errors = [(_exact_mse(x, absmax * k / MSE_CANDIDATES), absmax * k / MSE_CANDIDATES) for k in range(1, MSE_CANDIDATES + 1)]
    err, clip = min(errors)
    return clip, err


def test_histogram_range_doubling_is_exact():
    rng = np.random.default_rng(0)
    chunks = [rng.normal(size=1000) * scale for scale in (0.1, 1.0, 30.0, 2.0)]  # max grows: ranges double
    hist = AbsHistogram(bins=256)
    for chunk in chunks:
        hist.update(chunk)
    a = np.abs(np.concatenate(chunks))
    assert hist.top > a.max() and hist.counts.sum() == a.size
    direct = np.bincount(np.minimum((a * (256 / hist.top)).astype(np.int64), 255), minlength=256)
    np.testing.assert_array_equal(hist.counts, direct)


def test_mse_clip_matches_brute_force_on_raw_values():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.laplace(scale=1.0, size=200_000), [30.0, -25.0]])  # heavy tail, two rare outliers
    hist = AbsHistogram()
    for chunk in np.array_split(x, 7):
        hist.update(chunk)
    clip = mse_clip(hist, float(np.abs(x).max()))
    best_clip, best_err = _brute_force(x)
    assert _exact_mse(x, clip) <= 1.01 * best_err, (clip, best_clip)
    assert clip < 0.7 * np.abs(x).max()  # clipping the two outliers is what MSE picks here (exact optimum 17.7)
    assert _exact_mse(x, clip) < 0.6 * _exact_mse(x, float(np.abs(x).max()))  # well below minmax's error


def test_quantization_mse_is_the_fake_quant_error():
    values, weights = np.array([0.1, 0.5, 2.0]), np.array([3.0, 1.0, 2.0])
    raw = np.repeat(values, weights.astype(int))
    np.testing.assert_allclose(quantization_mse(values, weights, np.array([1.0, 2.0])),
                               [_exact_mse(raw, 1.0), _exact_mse(raw, 2.0)], rtol=1e-12)


def test_static_mse_scales_on_a_graph_match_brute_force(tiny_export):
    model = load(tiny_export("llama"))
    readers = [node.inputs[0] for node in model.graph if node.op_type == "MatMul" and node.inputs[1].is_initializer()]
    values = list(dict.fromkeys(readers))[:4]
    scales = static_scales(model, values, CALIB, ActCalibration.MSE)
    raw: dict[str, list[np.ndarray]] = {}
    for outs in run_values(model, [v.name for v in values], CALIB):
        for name, out in outs.items():
            raw.setdefault(name, []).append(out.astype(np.float64).ravel())
    for value in values:
        x = np.concatenate(raw[value.name])
        _, best_err = _brute_force(x)
        found = scales[value]
        assert _exact_mse(x, found.scale * 127.0) <= 1.01 * best_err, value.name
        assert found.method is ActCalibration.MSE and found.absmax == pytest.approx(np.abs(x).max(), rel=1e-6)
        assert found.clip == pytest.approx(found.scale * 127.0) and found.clip <= found.absmax
        assert Meta.ACT_CALIBRATION not in value.meta  # a producer reads the graph; the quantize pass records it


def test_quantize_pass_uses_the_mse_scales(tiny_export):
    model, reference = load(tiny_export("llama")), load(tiny_export("llama"))
    QuantizePass(activations="per_tensor", calibration="mse", calibrator=Calibrator(CALIB))(model)
    q_nodes = [n for n in model.graph if n.op_type == "QuantizeLinear" and n.metadata_props.get(Meta.QUANT) == "per_tensor"]
    assert q_nodes
    by_name = {v.name: v for n in reference.graph for v in n.outputs}
    expected = static_scales(reference, [by_name[q.inputs[0].name] for q in q_nodes], CALIB, ActCalibration.MSE)
    for q in q_nodes:
        got = float(q.inputs[1].const_value.numpy())
        want = expected[by_name[q.inputs[0].name]]
        assert got == pytest.approx(want.scale, rel=1e-6)
        record = q.inputs[0].meta[Meta.ACT_CALIBRATION]  # what the manifest reports for this site
        assert record["method"] == "mse" and record["scale"] == pytest.approx(want.scale, rel=1e-6)
        assert (record["absmax"], record["clip"]) == pytest.approx((want.absmax, want.clip), rel=1e-6)
