"""QuantizePass: W8A8 QDQ graphs checked layer by layer against a numpy fake-quant reference."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest

from pass_testing import load, make_feeds, run
from qexport import numerics
from qexport.calibration.calibrator import Calibrator
from qexport.calibration.stats import prefill_feeds, session_with_outputs
from qexport.errors import RecipeError
from qexport.passes.quantize.insert_qdq import QuantizePass
from qexport.passes.discovery.linear_select import linear_names, selected_linears
from qexport.passes.metadata import Meta
from qexport.passes.discovery.names import NameFilter
from qexport.passes.quantize.weight_quant import WeightFormat

# One float32 rounding per product and accumulation order: the QDQ graph against the float64 reference.
LAYER_RTOL = 1e-4

CALIB = (np.arange(3, 67, dtype=np.int64), np.arange(100, 164, dtype=np.int64))


def _fq_weight(w: np.ndarray) -> np.ndarray:
    """Reference: symmetric int8 per output channel (columns of [in, out])."""
    scale = np.abs(w).max(axis=0) / 127.0
    return np.clip(np.round(w / scale), -127, 127) * scale


def _fq_per_token(x: np.ndarray) -> np.ndarray:
    scale = np.abs(x).max(axis=-1, keepdims=True) / 127.0
    return np.clip(np.round(x / scale), -127, 127) * scale


def _fq_per_tensor(x: np.ndarray, scale: float) -> np.ndarray:
    return np.clip(np.round(x / scale), -128, 127) * scale


def _layer_io(model: ir.Model, weights: dict[str, np.ndarray], feeds) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """For each quantized linear (by node name): (its float input before the activation Q, its output)."""
    names = {}
    for node in model.graph:
        if node.name in weights:
            dq = node.inputs[0].producer()
            assert dq.op_type == "DequantizeLinear" and dq.metadata_props[Meta.QUANT] in ("per_token", "per_tensor")
            names[node.name] = (dq.inputs[0].producer().inputs[0].name, node.outputs[0].name)
    session = session_with_outputs(model, sorted({n for pair in names.values() for n in pair}), None)
    wanted = [o.name for o in session.get_outputs()]
    values = dict(zip(wanted, session.run(wanted, feeds)))
    return {k: (values[x].astype(np.float64), values[y].astype(np.float64)) for k, (x, y) in names.items()}


def _original_weights(model: ir.Model, include_lm_head: bool = False) -> dict[str, np.ndarray]:
    return {lin.node.name: lin.weight_in_out() for lin in selected_linears(model, NameFilter(), include_lm_head)}


def _assert_layers_match(layers, weights, fake_quant_x) -> None:
    assert layers, "no quantized linears were found"
    for name, (x, y) in layers.items():
        expected = fake_quant_x(x) @ _fq_weight(weights[name])
        err = np.abs(y - expected).max() / np.abs(expected).max()
        assert err < LAYER_RTOL, f"{name}: relative error {err:.3g} vs the numpy fake-quant reference"


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_per_token_layers_equal_numpy_fake_quant(tiny_export, family):
    model = load(tiny_export(family))
    weights = _original_weights(model)
    assert QuantizePass()(model).modified
    feeds = make_feeds(model)
    _assert_layers_match(_layer_io(model, weights, feeds), weights, _fq_per_token)


@pytest.mark.parametrize("calibration", ["minmax", "percentile"])
def test_per_tensor_layers_equal_numpy_fake_quant_with_calibrated_scales(tiny_export, calibration):
    fp32 = load(tiny_export("qwen2"))
    model = load(tiny_export("qwen2"))
    weights = _original_weights(model)
    QuantizePass(activations="per_tensor", calibration=calibration, percentile=90.0, calibrator=Calibrator(CALIB))(model)
    # reference scales: the same activations of the float graph on the calibration windows
    inputs = {lin.node.name: lin.input.name for lin in selected_linears(fp32, NameFilter(), False)}
    session = session_with_outputs(fp32, sorted(set(inputs.values())), None)
    graph_inputs = {i.name: i for i in session.get_inputs()}
    per_token: dict[str, list[np.ndarray]] = collections.defaultdict(list)
    for window in CALIB:
        outs = session.run(sorted(set(inputs.values())), prefill_feeds(window, graph_inputs, fp32))
        for value_name, out in zip(sorted(set(inputs.values())), outs):
            per_token[value_name].append(np.abs(out).reshape(-1, out.shape[-1]).max(axis=1))
    clip = {v: np.max(np.concatenate(t)) if calibration == "minmax" else np.percentile(np.concatenate(t), 90.0)
            for v, t in per_token.items()}
    layers = _layer_io(model, weights, make_feeds(model))
    for name, (x, y) in layers.items():
        expected = _fq_per_tensor(x, clip[inputs[name]] / 127.0) @ _fq_weight(weights[name])
        err = np.abs(y - expected).max() / np.abs(expected).max()
        assert err < LAYER_RTOL, f"{name}: relative error {err:.3g}"


def test_weights_are_int8_per_output_channel_without_weight_quantizers(tiny_export):
    model = load(tiny_export("llama"))
    weights = _original_weights(model)
    QuantizePass()(model)
    weight_dqs = [n for n in model.graph if n.metadata_props.get(Meta.QUANT) == "weight"]
    assert len(weight_dqs) == len(weights)
    for dq in weight_dqs:
        q, scale = dq.inputs[0].const_value.numpy(), dq.inputs[1].const_value.numpy()
        assert q.dtype == np.int8 and dq.attributes["axis"].value == 1 and scale.shape == (q.shape[1],)
        assert np.abs(q).max(axis=0).min() == 127  # every output channel uses its full range
        consumer = dq.outputs[0].consumers()[0]
        np.testing.assert_allclose(q * scale, _fq_weight(weights[consumer.name]), rtol=1e-6, atol=1e-7)
    # weights are stored, never quantized in the graph: every QuantizeLinear reads an activation
    assert all(n.inputs[0].const_value is None for n in model.graph if n.op_type == "QuantizeLinear")


def test_quantizers_sit_only_on_weight_linear_inputs(tiny_export):
    model = load(tiny_export("llama"))
    linears = selected_linears(model, NameFilter(), False)
    readers = collections.Counter(lin.input for lin in linears)
    lm_head = next(n for n in model.graph if n.outputs[0] is model.graph.outputs[0])
    QuantizePass()(model)
    counts = collections.Counter((n.op_type, n.metadata_props.get(Meta.QUANT)) for n in model.graph)
    assert counts[("DequantizeLinear", "weight")] == len(linears) == 14  # 2 layers x 7; lm_head left in float
    assert counts[("QuantizeLinear", "per_token")] == counts[("DequantizeLinear", "per_token")] == len(readers) == 8
    for node in model.graph:
        if node.op_type == "DequantizeLinear" and node.metadata_props[Meta.QUANT] == "per_token":
            assert {c.op_type for c in node.outputs[0].consumers()} == {"MatMul"}
        if node.op_type in ("MatMul", "Softmax", "Add") and Meta.QUANT not in node.metadata_props:
            producers = [i.producer() for i in node.inputs if i is not None and i.producer() is not None]
            activation_dq = [p for p in producers if p.metadata_props.get(Meta.QUANT) == "per_token"]
            if node.op_type != "MatMul":
                assert not activation_dq, f"{node.op_type} {node.name} reads a quantized activation"
            elif activation_dq:  # a quantized linear: B is an int8 weight's dequantizer
                assert node.inputs[1].producer().metadata_props.get(Meta.QUANT) == "weight"
            else:  # QK, AV and lm_head stay float
                assert all(p.op_type != "DequantizeLinear" for p in producers), node.name
    assert lm_head.op_type == "MatMul" and lm_head.inputs[1].producer().op_type == "Transpose"


def test_lm_head_and_glob_selection_by_role_name(tiny_export):
    model = load(tiny_export("qwen2"))
    QuantizePass(include_lm_head=True)(model)
    head = model.graph.outputs[0].producer()
    assert head.inputs[1].producer().metadata_props.get(Meta.QUANT) == "weight"
    model = load(tiny_export("qwen2"))
    names = linear_names(model)
    assert sorted(names.values())[:7] == [f"layers.0.{r}" for r in
                                          ("attn.k", "attn.o", "attn.q", "attn.v", "mlp.down", "mlp.gate", "mlp.up")]
    downs = {node for node, name in names.items() if name.endswith("mlp.down")}
    assert all(n.inputs[0].producer().op_type == "Mul" for n in downs)  # act(gate) * up feeds down_proj
    QuantizePass(linears=("layers.*.mlp.down",))(model)
    quantized = {n.outputs[0].consumers()[0] for n in model.graph if n.metadata_props.get(Meta.QUANT) == "weight"}
    assert quantized == downs and len(downs) == 2


def test_second_run_changes_nothing_and_output_stays_close(tiny_export):
    model = load(tiny_export("gemma3"))
    feeds = make_feeds(model)
    expected = run(model, feeds)["logits"].astype(np.float64)
    assert QuantizePass()(model).modified
    got = run(model, feeds)["logits"].astype(np.float64)
    sqnr_db = numerics.sqnr_db(expected, got)
    assert 25.0 < sqnr_db < 80.0  # quantized: close to, but not equal to, float (measured ~40 dB)
    assert not QuantizePass()(model).modified


def test_int8_weight_quantizer_by_hand():
    w = np.array([[0.5, -2.0], [-1.0, 1.0], [0.25, 0.0]])  # [in, out]: one scale per column
    q, scale = WeightFormat().quantize(w)
    np.testing.assert_array_equal(q, [[64, -127], [-127, 64], [32, 0]])  # 63.5 rounds half to even
    np.testing.assert_allclose(scale, [[1.0 / 127, 2.0 / 127]])


def test_bad_settings_are_recipe_errors(tiny_export):
    with pytest.raises(RecipeError, match="activations must be one of"):
        QuantizePass(activations="per_channel")
    with pytest.raises(RecipeError, match="percentile"):
        QuantizePass(percentile=0.0)
    with pytest.raises(RecipeError, match="calibration windows"):
        QuantizePass(activations="per_tensor")(load(tiny_export("llama")))


def test_weight_settings_default_to_int8_and_map_from_a_recipe(tiny_export):
    from qexport.recipes.schema import Recipe
    from qexport.passes.quantize.weight_quant import WeightClip, WeightQuant

    default, explicit = load(tiny_export("llama")), load(tiny_export("llama"))
    QuantizePass()(default)
    QuantizePass(weights="int8", group_size=32, weight_clip="none")(explicit)  # group_size is for int4/dint4 only
    ints = lambda m: {n.name: n.inputs[0].const_value.numpy() for n in m.graph if n.metadata_props.get(Meta.QUANT) == "weight"}  # noqa: E731
    assert ints(default).keys() == ints(explicit).keys()
    assert all(np.array_equal(ints(default)[k], ints(explicit)[k]) for k in ints(default))
    built = Recipe.from_dict({"name": "w4", "passes": [{"pass": "quantize", "weights": "dint4", "group_size": 64,
                                                         "weight_clip": "mse"}]}).build()[0]
    assert (built.weights, built.group_size, built.weight_clip) == (WeightQuant.DINT4, 64, WeightClip.MSE)


@pytest.mark.parametrize("kind, group, clip", [("int8", None, "none"), ("int4", 64, "none"), ("dint4", 64, "mse")])
def test_weights_quantized_in_column_blocks_equal_one_block(monkeypatch, kind, group, clip):
    """Large weights are quantized a block of output columns at a time (bounded float64 temporaries): each column
    has its own scales, so the codes and scales are exactly those of one block."""
    import qexport.passes.quantize.weight_quant as wq

    w = np.random.default_rng(0).standard_normal((256, 301)).astype(np.float32)
    settings = {"kind": wq.WeightQuant(kind), "clip": wq.WeightClip(clip)} | ({"group_size": group} if group else {})
    fmt = wq.WeightFormat(**settings)
    monkeypatch.setattr(wq, "_CHUNK_ELEMENTS", 1 << 40)
    whole = fmt.quantize(w)
    monkeypatch.setattr(wq, "_CHUNK_ELEMENTS", 256 * 7)  # 7 columns per block, the last block shorter
    blocks = fmt.quantize(w)
    assert blocks[0].dtype == np.int8 and np.array_equal(blocks[0], whole[0]) and np.array_equal(blocks[1], whole[1])
