"""AWEQ bias correction: the mean output error of each quantized linear is removed on the calibration data."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from pass_testing import load
from qexport.calibration.calibrator import Calibrator
from qexport.calibration.stats import run_values
from qexport.errors import RecipeError
from qexport.passes.quantize.bias_correction import BiasCorrectPass
from qexport.passes.quantize.insert_qdq import QuantizePass
from qexport.passes.discovery.linear_select import linear_names
from qexport.passes.metadata import Meta
from qexport.passes.discovery import sites as site_matching

CALIB = tuple(np.random.default_rng(i).integers(3, 250, size=48, dtype=np.int64) for i in range(2))  # max_windows: 2


def _quantized(family: str, tiny_export, activations: str = "per_tensor") -> tuple[ir.Model, ir.Model, dict[str, str]]:
    """(quantized graph, float graph before quantization, node name -> role name)."""
    model, reference = load(tiny_export(family)), load(tiny_export(family))
    roles = {node.name: role for node, role in linear_names(reference).items()}
    QuantizePass(activations=activations, calibrator=Calibrator(CALIB))(model)
    return model, reference, roles


def _mean_errors(model: ir.Model, reference: ir.Model) -> dict[str, np.ndarray]:
    """Reference: per quantized linear (node name), mean over the calibration tokens of (its output after any bias
    correction Add or bias Add - x W_float), x being the float input before its activation Q/DQ."""
    weights = {n.name: lin.weight_in_out() for n in reference.graph if (lin := site_matching.match_linear(n)) is not None}
    ios = {}
    for node in model.graph:
        w = node.inputs[1].producer() if node.name in weights else None
        if w is not None and w.metadata_props.get(Meta.QUANT) == "weight":
            x = node.inputs[0].producer().inputs[0].producer().inputs[0]
            y = node.outputs[0]
            add = next((c for c in y.consumers() if c.op_type == "Add"), None)
            ref_bias = 0.0
            if add is not None and any(v.const_value is not None for v in add.inputs):  # corrected, or a float bias
                y = add.outputs[0]
                ref_node = next(n for n in reference.graph if n.name == node.name)
                ref_add = next((c for c in ref_node.outputs[0].consumers() if c.op_type == "Add"), None)
                ref_bias = next((v.const_value.numpy().astype(np.float64) for v in (ref_add.inputs if ref_add else ())
                                 if v.const_value is not None), 0.0)
            ios[node.name] = (x.name, y.name, ref_bias)
    sums: dict[str, np.ndarray] = {}
    tokens = 0
    for outs in run_values(model, sorted({n for x, y, _ in ios.values() for n in (x, y)}), CALIB):
        for name, (x, y, bias) in ios.items():
            xs = outs[x].astype(np.float64).reshape(-1, weights[name].shape[0])
            ys = outs[y].astype(np.float64).reshape(-1, weights[name].shape[1])
            sums[name] = sums.get(name, 0.0) + (ys - (xs @ weights[name] + bias)).sum(axis=0)
        tokens += xs.shape[0]
    return {name: total / tokens for name, total in sums.items()}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_bias_correction_removes_the_mean_output_error(tiny_export, family):
    model, reference, roles = _quantized(family, tiny_export)
    before = _mean_errors(model, reference)
    assert BiasCorrectPass(reference=reference, calibrator=Calibrator(CALIB))(model).modified
    after = _mean_errors(model, reference)
    assert before.keys() == after.keys() and len(after) == len(roles) - 1  # every linear but lm_head
    for name, e in after.items():
        scale = np.abs(before[name]).max()
        if roles[name].endswith(("attn.q", "attn.k", "attn.v")):
            # inputs come only from earlier, already corrected layers: the error is gone up to float32 rounding
            assert np.abs(e).max() <= 1e-3 * scale + 1e-6, (roles[name], np.abs(e).max(), scale)
    total_before = sum(float((e ** 2).sum()) for e in before.values())
    total_after = sum(float((e ** 2).sum()) for e in after.values())
    assert total_after < 0.05 * total_before, (total_after, total_before)


def test_bias_correction_adds_biases_only_where_none_were(tiny_export):
    model, reference, roles = _quantized("qwen2", tiny_export)
    adds = sum(n.op_type == "Add" for n in model.graph)
    BiasCorrectPass(reference=reference, calibrator=Calibrator(CALIB))(model)
    with_bias = [n for n in reference.graph if (lin := site_matching.match_linear(n)) is not None and lin.bias is not None]
    assert with_bias  # qwen2's q/k/v carry a bias: corrected in place, the other linears get a new Add
    assert sum(n.op_type == "Add" for n in model.graph) == adds + len(roles) - 1 - len(with_bias)


def test_bias_correction_leaves_unselected_linears_alone_and_runs_once(tiny_export):
    model, reference, roles = _quantized("llama", tiny_export, activations="per_token")
    before = _mean_errors(model, reference)
    outputs_before = {n.name: [c.name for c in n.outputs[0].consumers()] for n in model.graph if n.name in roles}
    assert BiasCorrectPass(reference=reference, calibrator=Calibrator(CALIB), linears=("layers.1.*",))(model).modified
    after = _mean_errors(model, reference)
    for name, role in roles.items():
        if role.startswith("layers.0.") or role == "lm_head":
            assert [c.name for c in next(n for n in model.graph if n.name == name).outputs[0].consumers()] == outputs_before[name]
            if name in before:
                np.testing.assert_array_equal(after[name], before[name])  # same graph upstream: same values
        elif role.startswith("layers.1.attn.") and role[-1] in "qkv":
            assert np.abs(after[name]).max() <= 1e-3 * np.abs(before[name]).max() + 1e-6
    assert not BiasCorrectPass(reference=reference, calibrator=Calibrator(CALIB), linears=("layers.1.*",))(model).modified


def test_bias_correction_needs_its_run_time_inputs(tiny_export):
    model = load(tiny_export("llama"))
    with pytest.raises(RecipeError, match="reference"):
        BiasCorrectPass(calibrator=Calibrator(CALIB))(model)
    with pytest.raises(RecipeError, match="max_windows"):
        BiasCorrectPass(max_windows=0)
