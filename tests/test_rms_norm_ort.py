"""OrtRmsNormPass: RMSNormalization nodes compute what the exporter's decomposed RMSNorm computes."""

from __future__ import annotations

import collections

import numpy as np

from pass_testing import give_norms_weights, load, run
from qexport.passes.insert_qdq import QuantizePass
from qexport.passes.lower_ort import LowerOrtPass
from qexport.passes.rms_norm_ort import FUSED, RMS_NORM_OPSET, OrtRmsNormPass
from test_attention_ort import _assert_equal, _decode_steps, _padded_feeds


def _norms(model) -> int:
    return sum(n.op_type == "Pow" for n in model.graph)


def test_fused_equals_decomposed_with_left_padding_and_decode(tiny_export, family):
    model = load(tiny_export(family))
    give_norms_weights(model)  # real gammas: a dropped or misplaced gamma would show
    feeds = _padded_feeds(model)
    expected = _decode_steps(model, feeds)
    norms = _norms(model)
    result = OrtRmsNormPass()(model)
    if family == "opt":  # LayerNorm, not RMSNorm: nothing to fuse
        assert not result.modified and norms == 0
        return
    assert result.modified
    for got, want in zip(_decode_steps(model, feeds), expected):
        _assert_equal(got, want)
    ops = collections.Counter(n.op_type for n in model.graph)
    assert ops["RMSNormalization"] == norms > 0 and ops["Pow"] == ops["Sqrt"] == 0
    assert model.graph.opset_imports[""] == RMS_NORM_OPSET
    assert all(FUSED in n.metadata_props for n in model.graph if n.op_type == "RMSNormalization")
    assert not OrtRmsNormPass()(model).modified


def test_fused_after_lowering_equals_the_lowered_graph(tiny_export):
    model = load(tiny_export("llama"))
    QuantizePass(activations="per_token", windows=(np.arange(3, 67, dtype=np.int64),), include_lm_head=True)(model)
    LowerOrtPass()(model)
    feeds = _padded_feeds(model, seed=3)
    expected = run(model, feeds)
    assert OrtRmsNormPass()(model).modified
    _assert_equal(run(model, feeds), expected)
