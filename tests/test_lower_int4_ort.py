"""LowerInt4OrtPass: MatMulNBits computes what the blocked INT4 QDQ linear computes."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from pass_testing import load, make_feeds, run
from qexport.calibration.calibrator import Calibrator
from qexport import numerics
from qexport.errors import RecipeError
from qexport.passes.quantize.insert_qdq import QuantizePass
from qexport.passes.metadata import Meta
from qexport.passes.ort.int4 import LowerInt4OrtPass, pack_nibbles

CALIB = (np.arange(3, 67, dtype=np.int64), np.arange(100, 164, dtype=np.int64))


def _w4a8(family: str, tiny_export, weights: str = "int4", activations: str = "per_tensor",
          include_lm_head: bool = False) -> ir.Model:
    model = load(tiny_export(family))
    QuantizePass(activations=activations, weights=weights, group_size=32, calibrator=Calibrator(CALIB),
                 include_lm_head=include_lm_head)(model)
    return model


def test_nibbles_are_packed_low_first_with_zero_point_eight():
    codes = np.array([[-8, 7], [1, -1], [0, 3], [2, -5]], dtype=np.int8)  # [K 4, N 2]
    packed = pack_nibbles(np.repeat(codes, 4, axis=0), 16)  # K 16, one block
    assert packed.shape == (2, 1, 8) and packed.dtype == np.uint8
    column0 = np.repeat(codes[:, 0], 4) + 8  # the first output's 16 codes, offset to 0..15
    assert list(packed[0, 0]) == [int(column0[2 * i]) | (int(column0[2 * i + 1]) << 4) for i in range(8)]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_lowered_equals_the_qdq_graph(tiny_export, family):
    model = _w4a8(family, tiny_export)
    feeds = make_feeds(model)
    expected = run(model, feeds, optimize=False)
    dq_before = sum(n.op_type == "DequantizeLinear" for n in model.graph)
    assert LowerInt4OrtPass()(model).modified
    ops = collections.Counter(n.op_type for n in model.graph)
    assert ops["MatMulNBits"] == 14 and all(n.metadata_props.get(Meta.LOWERED) == "int4" for n in model.graph
                                            if n.op_type == "MatMulNBits")  # 7 linears x 2 layers
    assert ops["DequantizeLinear"] == dq_before - 14  # the weight DQs are gone, the activation DQs stay
    got = run(model, feeds, optimize=True)
    for name, value in expected.items():  # float32 in the kernel: only the summation order differs
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-5 * np.abs(value).max())
    assert not LowerInt4OrtPass()(model).modified


def test_an_int4_lm_head_writing_the_logits_is_lowered_and_keeps_the_output_name(tiny_export):
    model = _w4a8("llama", tiny_export, include_lm_head=True)
    feeds = make_feeds(model)
    expected = run(model, feeds, optimize=False)
    assert LowerInt4OrtPass()(model).modified
    assert sum(n.op_type == "MatMulNBits" for n in model.graph) == 15  # 7 linears x 2 layers, and lm_head
    logits = next(v for v in model.graph.outputs if v.name == "logits")
    assert logits.producer().op_type == "MatMulNBits"
    got = run(model, feeds, optimize=True)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-5 * np.abs(value).max())


def test_accuracy_level_four_is_lossy_but_close(tiny_export):
    model = _w4a8("llama", tiny_export, activations="none")
    feeds = make_feeds(model)
    expected = run(model, feeds, optimize=False)["logits"]
    assert LowerInt4OrtPass(accuracy_level=4)(model).modified
    got = run(model, feeds, optimize=True)["logits"]
    sqnr = numerics.sqnr_db(expected, got)
    assert 25.0 < sqnr < 120.0, sqnr  # int8 activations per block: not exact, far better than the int4 weights


def test_dint4_and_int8_weights_are_left_alone(tiny_export):
    for weights in ("dint4", "int8"):
        model = _w4a8("llama", tiny_export, weights=weights)
        assert not LowerInt4OrtPass()(model).modified


def test_accuracy_level_is_validated():
    with pytest.raises(RecipeError, match="accuracy_level"):
        LowerInt4OrtPass(accuracy_level=5)
