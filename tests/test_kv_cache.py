"""quantize-kv: an INT8 KV cache equal to a float fake-quant reference, bounded against the float cache, in recipes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from pass_testing import decode_steps, load, padded_feeds, run
from qexport import numerics
from qexport.calibration.calibrator import Calibrator
from qexport.calibration.stats import prefill_feeds
from qexport.errors import PatternNotFoundError, RecipeError
from qexport.passes._ir import copy_model, new_initializer
from qexport.passes.metadata import Meta
from qexport.passes.ort.attention import OrtAttentionPass
from qexport.passes.ort.attention_chunks import OrtAttentionChunksPass
from qexport.passes.ort.group_query_attention import OrtGqaPass
from qexport.passes.ort.rotary import OrtRotaryPass
from qexport.passes.quantize.kv_cache import QuantizeKvPass
from qexport.recipes.schema import KvCache, Recipe, load_recipe

# The int8 graph and the float fake-quant reference compute the same codes and the same products code * s:
# they differ only in float summation order.
RTOL, ATOL = 1e-5, 1e-5


def _calibrator(seed: int = 10, windows: int = 4, length: int = 48) -> Calibrator:
    """Random-token windows from the same range as the test feeds (ids 3..199)."""
    rng = np.random.default_rng(seed)
    return Calibrator(tuple(rng.integers(3, 200, length, dtype=np.int64) for _ in range(windows)))


def _cache_concats(model: ir.Model) -> dict[str, ir.Node]:
    """present name -> the exporter's Concat(past, new) that writes it."""
    return {n.outputs[0].name: n for n in model.graph
            if n.op_type == "Concat" and n.inputs[0] is not None and n.inputs[0].name.startswith("past_key_values.")}


def _reference_scales(model: ir.Model, calibrator: Calibrator, per_head: bool) -> dict[str, np.ndarray]:
    """present name -> absmax / 127 of the new K / V over the windows (numpy), [H, 1, D] or [H, 1, 1]."""
    probe = copy_model(model)
    news = {name: node.inputs[1] for name, node in _cache_concats(probe).items()}
    probe.graph.outputs.extend(news.values())
    inputs = {v.name: v for v in probe.graph.inputs}
    peaks: dict[str, np.ndarray] = {}
    for window in calibrator.windows:
        outs = run(probe, prefill_feeds(window, inputs, probe))
        for name, value in news.items():
            peak = np.abs(outs[value.name]).max(axis=(0, 2))
            peaks[name] = np.maximum(peaks[name], peak) if name in peaks else peak
    return {name: (peak.max(axis=1, keepdims=True) if per_head else peak)[:, None, :] / numerics.INT8_QMAX
            for name, peak in peaks.items()}


def _fake_quant_reference(model: ir.Model, scales: dict[str, np.ndarray]) -> ir.Model:
    """The float graph with each new K / V replaced by clip(round(x / s), -128, 127) * s before its cache concat."""
    ref = copy_model(model)
    graph = ref.graph
    low = new_initializer(graph, "test.kv_low", np.array(-128, np.float32))
    high = new_initializer(graph, "test.kv_high", np.array(127, np.float32))
    for name, node in _cache_concats(ref).items():
        s = new_initializer(graph, f"{name}.test_scale", scales[name].astype(np.float32))
        div = ir.node("Div", [node.inputs[1], s])
        rnd = ir.node("Round", [div.outputs[0]])
        clip = ir.node("Clip", [rnd.outputs[0], low, high])
        mul = ir.node("Mul", [clip.outputs[0], s])
        graph.insert_before(node, [div, rnd, clip, mul])
        node.replace_input_with(1, mul.outputs[0])
    return ref


def _split_feeds(feeds: dict[str, np.ndarray], scales: dict[str, np.ndarray]):
    """(int8 feeds, float feeds) holding the same cache: codes of the random past, and codes * s."""
    codes, floats = dict(feeds), dict(feeds)
    for name, past in feeds.items():
        if name.startswith("past_key_values."):
            s = scales[name.replace("past_key_values.", "present.")][None]
            q = np.clip(np.round(past / s), -128, 127)
            codes[name], floats[name] = q.astype(np.int8), (q * s).astype(np.float32)
    return codes, floats


def _pass_scales(model: ir.Model) -> dict[str, np.ndarray]:
    """present name -> the scales quantize-kv wrote for it, as [H, 1, D] or [H, 1, 1]."""
    found = {}
    for out in model.graph.outputs:
        if out.name.startswith("present."):
            array = model.graph.initializers[f"{out.name}.kv_scale"].const_value.numpy()
            found[out.name] = array.reshape(array.shape[0], 1, -1)
    return found


@pytest.mark.parametrize("granularity", ["per_channel", "per_head"])
def test_int8_cache_equals_the_fake_quant_reference_with_left_padding_and_decode(tiny_export, family, granularity):
    model = load(tiny_export(family))
    calibrator = _calibrator()
    scales = _reference_scales(model, calibrator, per_head=granularity == "per_head")
    reference = _fake_quant_reference(model, scales)
    assert QuantizeKvPass(granularity=granularity, calibrator=calibrator)(model).modified
    pasts = [v for v in model.graph.inputs if v.name.startswith("past_key_values.")]
    presents = [v for v in model.graph.outputs if v.name.startswith("present.")]
    assert pasts and all(v.dtype == ir.DataType.INT8 for v in pasts + presents)
    got_scales = _pass_scales(model)
    for name in scales:  # the pass's calibration equals numpy's absmax / 127
        np.testing.assert_allclose(got_scales[name], scales[name], rtol=1e-6, err_msg=name)
    assert not QuantizeKvPass(granularity=granularity, calibrator=calibrator)(model).modified

    int8_feeds, float_feeds = _split_feeds(padded_feeds(model, seed=3), scales)
    got, want = decode_steps(model, int8_feeds, steps=3), decode_steps(reference, float_feeds, steps=3)
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_allclose(g["logits"], w["logits"], rtol=RTOL, atol=ATOL, err_msg=f"step {step}")
        for name in scales:
            assert g[name].dtype == np.int8
            np.testing.assert_allclose(g[name] * scales[name][None], w[name], rtol=RTOL, atol=ATOL,
                                       err_msg=f"{name} step {step}")


def _logit_sqnr(model: ir.Model, float_model: ir.Model, seed: int = 7) -> float:
    """SQNR (dB) of the logits of a prefill and 3 decode steps from an empty cache, against the float cache."""
    feeds = padded_feeds(float_model, seed=seed)
    feeds = {k: (v[:, :, :0] if k.startswith("past_key_values.") else v) for k, v in feeds.items()}
    feeds["attention_mask"] = feeds["attention_mask"][:, 3:]
    if "position_ids" in feeds:
        feeds["position_ids"] = np.where(feeds["attention_mask"] == 0, 1, np.cumsum(feeds["attention_mask"], -1) - 1)
    want = decode_steps(float_model, feeds, steps=3)
    past_type = {v.name: v.dtype.numpy() for v in model.graph.inputs}
    got = decode_steps(model, {k: v.astype(past_type[k]) for k, v in feeds.items()}, steps=3)
    return numerics.sqnr_db(np.concatenate([w["logits"] for w in want], 1), np.concatenate([g["logits"] for g in got], 1))


def test_error_against_the_float_cache_is_bounded_and_calibration_matters(tiny_export):
    float_model = load(tiny_export("llama"))
    calibrator = _calibrator()
    sqnr = {}
    for label, settings in {"per_channel": {}, "per_head": {"granularity": "per_head"},
                            "too_small": {"margin": 0.125}, "too_large": {"margin": 16.0}}.items():
        model = copy_model(float_model)
        QuantizeKvPass(calibrator=calibrator, **settings)(model)
        sqnr[label] = _logit_sqnr(model, float_model)
    # int8 with calibrated scales stays far below the logits' own size; scales 8x off either way lose much more
    assert sqnr["per_channel"] > 30.0 and sqnr["per_head"] > 30.0, sqnr
    assert min(sqnr["per_channel"], sqnr["per_head"]) > max(sqnr["too_small"], sqnr["too_large"]) + 10.0, sqnr


def test_ort_attention_rotary_and_chunks_still_match_the_int8_cache(tiny_export):
    model = load(tiny_export("llama"))
    calibrator = _calibrator()
    QuantizeKvPass(calibrator=calibrator)(model)
    scales = _pass_scales(model)
    feeds, _ = _split_feeds(padded_feeds(model, seed=5), scales)
    expected = decode_steps(model, feeds, steps=2)
    layers = len(scales) // 2
    for rewrite in (OrtRotaryPass(), OrtAttentionPass(), OrtAttentionChunksPass(chunks=2, min_rows=4)):
        assert rewrite(model).modified, type(rewrite).__name__
    # every core fused (its Softmax gone) and chunked (an If per layer, the Attention nodes inside it)
    assert not any(n.op_type == "Softmax" for n in model.graph)
    assert sum(Meta.ATTENTION_CHUNKS in n.metadata_props for n in model.graph) == layers
    assert sum(Meta.KV_CACHE in n.metadata_props for n in model.graph) == 4 * len(scales)  # Div, Q, DQ, Mul
    for got, want in zip(decode_steps(model, feeds, steps=2), expected, strict=True):
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=RTOL, atol=ATOL, err_msg=name)


@pytest.mark.parametrize("granularity", ["per_channel", "per_head"])
def test_ort_gqa_keeps_the_int8_cache_in_its_kernel(tiny_export, family, granularity):
    """GroupQueryAttention with k_quant_type / v_quant_type PER_CHANNEL (the per-head scales repeated over the
    channels) stores round(k / s) as quantize-kv's QuantizeLinear does and attends over the dequantized cache: the
    same int8 presents and logits, prefill with left padding and decode steps on its own cache."""
    model = load(tiny_export(family))
    QuantizeKvPass(granularity=granularity, calibrator=_calibrator())(model)
    scales = _pass_scales(model)
    feeds, _ = _split_feeds(padded_feeds(model, seed=5), scales)
    expected = decode_steps(model, feeds, steps=3)
    assert OrtGqaPass()(model).modified
    nodes = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert len(nodes) == len(scales) // 2 and not any(n.op_type in ("Softmax", "Concat") and
                                                      Meta.KV_CACHE in n.metadata_props for n in model.graph)
    assert all(n.attributes["kv_cache_bit_width"].value == 8 and n.attributes["k_quant_type"].value == "PER_CHANNEL"
               for n in nodes)
    assert all(v.dtype == ir.DataType.INT8 for v in model.graph.outputs if v.name.startswith("present."))
    for step, (got, want) in enumerate(zip(decode_steps(model, feeds, steps=3), expected, strict=True)):
        for name in want:
            if name.startswith("present."):  # the same codes
                np.testing.assert_array_equal(got[name], want[name], err_msg=f"{name} step {step}")
            else:
                np.testing.assert_allclose(got[name], want[name], rtol=RTOL, atol=ATOL, err_msg=f"{name} step {step}")


def test_a_lowered_cache_or_no_cache_is_a_clear_error(tiny_export):
    model = load(tiny_export("qwen2"))
    assert OrtGqaPass()(model).modified
    with pytest.raises(PatternNotFoundError, match="before the ORT lowerings"):
        QuantizeKvPass(calibrator=_calibrator())(model)
    ids = ir.Value(name="input_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch", "sequence"]))
    no_cache = ir.Model(ir.Graph([ids], [ids], nodes=[], opset_imports={"": 21}), ir_version=10)
    with pytest.raises(RecipeError, match="no KV cache"):
        QuantizeKvPass(calibrator=_calibrator())(no_cache)
    with pytest.raises(RecipeError, match="bits must be 8"):
        QuantizeKvPass(bits=4)


def test_kv_cache_key_places_the_pass_before_the_ort_lowerings():
    base = load_recipe("w8a8-dynamic")
    recipe = Recipe.from_dict({**base.to_dict(), "kv_cache": "int8"})
    names = [e.name for e in recipe.passes]
    assert names.index("quantize") + 1 == names.index("quantize-kv") == names.index("ort-int8") - 1
    assert recipe.kv_cache is KvCache.INT8 and Recipe.from_dict(recipe.to_dict()) == recipe
    assert base.with_kv_cache("int8") == recipe and base.with_kv_cache("float") is base
    assert [e.name for e in Recipe.from_dict({"name": "x", "kv_cache": "int8", "passes": [{"pass": "fold-norm"}]}
                                             ).passes] == ["fold-norm", "quantize-kv"]


@pytest.mark.parametrize("data, message", [
    ({"kv_cache": "int4", "passes": [{"pass": "quantize"}]}, "kv_cache: 'int4' is not allowed"),
    ({"kv_cache": "int8", "check": "tensorrt", "passes": [{"pass": "quantize"}]}, "TensorRT"),
    ({"passes": [{"pass": "ort-int8"}, {"pass": "quantize-kv"}]}, "before the ORT lowerings"),
    ({"passes": [{"pass": "quantize-kv"}, {"pass": "quantize"}]}, "quantize follows it"),
    ({"kv_cache": "int8", "passes": [{"pass": "quantize-kv"}]}, "already include"),
    ({"kv_cache": "float", "passes": [{"pass": "quantize-kv"}]}, "kv_cache is float"),
    ({"passes": [{"pass": "quantize-kv", "granularity": "per_token"}]}, "per_channel"),
    ({"passes": [{"pass": "quantize-kv", "margin": 0}]}, "margin must be positive"),
])
def test_recipes_that_cannot_hold_an_int8_cache_are_refused_when_read(data, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict({"name": "x", **data})
