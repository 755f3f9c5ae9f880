"""W4A8: int4 / dINT4 per-group weights against numpy references, their graph layout, and the w4a8 preset."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from pass_testing import load, make_feeds
from preset_testing import evaluate_quantized, export_tiny_preset, linears_merged_away, logits_sqnr_db, quantize_smollm2
from qexport.recipes import schema as rc
from qexport.calibration.calibrator import Calibrator
from qexport.errors import RecipeError
from qexport.passes._ir import write_weight
from qexport.passes.quantize.insert_qdq import QuantizePass
from qexport.passes.discovery.linear_select import selected_linears
from qexport.passes.metadata import Meta
from qexport.passes.discovery.names import NameFilter
from qexport.passes.quantize.weight_quant import WeightFormat
from qexport.runtimes.tensorrt.check import check_model, errors

CALIB = (np.arange(3, 67, dtype=np.int64), np.arange(100, 164, dtype=np.int64))
DINT4_LEVELS = np.array([0.0, 0.5, 1, 2, 3, 4, 5, 6])  # magnitudes of the dINT4 grid, in units of the scale


def _run_exact(model: ir.Model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """ONNX Runtime without graph optimizations: ORT's default fuses an INT4 DequantizeLinear -> MatMul into
    MatMulNBits, which (accuracy level 4) also rounds the activation to int8 per block; this runs the QDQ
    graph as written."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def _int4_reference(w: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int4 per (group of input rows, output column) of an [in, out] weight, written out plainly."""
    q, scale = np.zeros_like(w), np.zeros((w.shape[0] // group, w.shape[1]))
    for g in range(w.shape[0] // group):
        rows = w[g * group:(g + 1) * group]
        scale[g] = np.abs(rows).max(axis=0) / 7.0
        q[g * group:(g + 1) * group] = np.clip(np.round(rows / scale[g]), -7, 7)
    return q, scale


def _dint4_reference(y: np.ndarray) -> np.ndarray:
    """Nearest dINT4 level to y = w / scale, by brute force over the 15 levels (weight_quant's dINT4 rounding)."""
    levels = np.concatenate([-DINT4_LEVELS[:0:-1], DINT4_LEVELS])
    return levels[np.abs(y[..., None] - levels).argmin(axis=-1)]


def _weights(seed: int = 0, n_in: int = 128, n_out: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).standard_t(4, size=(n_in, n_out))  # heavy tails, as LLM weights


def test_int4_groups_equal_the_numpy_reference():
    w = _weights()
    fmt = WeightFormat("int4", group_size=32)
    codes, scale = fmt.quantize(w)
    q_ref, s_ref = _int4_reference(w, 32)
    np.testing.assert_allclose(scale, s_ref, rtol=1e-12)
    assert np.mean(codes == q_ref) > 0.999 and codes.dtype == np.int8  # all but float ties at .5
    w_hat = fmt.dequantize(codes, scale)
    assert np.all(np.abs(w - w_hat) <= np.repeat(scale, 32, axis=0) / 2 + 1e-12)  # half a step, never more
    assert np.abs(codes).max() == 7


def test_dint4_rounds_to_the_nearest_level_and_codes_seven_as_half():
    y = np.array([0.2, 0.26, 0.74, 0.76, 1.4, 5.6, 6.0, 9.0, -0.3, -0.8, -6.7])
    fmt = WeightFormat("dint4", group_size=32)
    codes = fmt.codes(y)
    np.testing.assert_array_equal(codes, [0, 7, 7, 1, 1, 6, 6, 6, -7, -1, -6])
    np.testing.assert_array_equal(fmt.levels(codes), [0, 0.5, 0.5, 1, 1, 6, 6, 6, -0.5, -1, -6])
    w = _weights(1)
    q, scale = fmt.quantize(w)
    np.testing.assert_allclose(scale, _int4_reference(w, 32)[1] * 7 / 6, rtol=1e-12)  # q_max 6
    expected = _dint4_reference(w / np.repeat(scale, 32, axis=0))
    assert np.mean(fmt.levels(q) == expected) > 0.999
    # the ±1/2 levels halve int4's worst error near zero, where most weights sit
    small = np.abs(w) < np.repeat(scale, 32, axis=0)
    assert np.abs(w - fmt.dequantize(q, scale))[small].max() <= (np.repeat(scale, 32, axis=0) / 4)[small].max() + 1e-12


@pytest.mark.parametrize("kind", ["int4", "dint4"])
def test_mse_clip_never_loses_to_absmax_and_helps_on_heavy_tails(kind):
    w = _weights(2, n_in=256, n_out=64)
    plain, clipped = WeightFormat(kind, 64), WeightFormat(kind, 64, clip="mse")
    err_plain = (w - plain.dequantize(*plain.quantize(w))) ** 2
    err_clip = (w - clipped.dequantize(*clipped.quantize(w))) ** 2
    per_group = lambda e: e.reshape(4, 64, 64).sum(axis=1)  # noqa: E731
    assert np.all(per_group(err_clip) <= per_group(err_plain) + 1e-12)  # ratio 1 is on the grid
    assert err_clip.sum() < 0.95 * err_plain.sum()  # measured 0.89 (int4), 0.92 (dint4)
    assert np.all(clipped.quantize(w)[1] <= plain.quantize(w)[1] + 1e-15)


def _fake_quant_float_model(model: ir.Model, fmt: WeightFormat, include_lm_head: bool) -> None:
    """Reference graph: each selected weight replaced by its numpy fake-quantized float values."""
    for linear in selected_linears(model, NameFilter(), include_lm_head):
        write_weight(model.graph, linear, fmt.dequantize(*_reference_codes(linear.weight_in_out(), fmt)))


def _reference_codes(w: np.ndarray, fmt: WeightFormat) -> tuple[np.ndarray, np.ndarray]:
    q, scale = _int4_reference(w, fmt.group_size)
    if fmt.kind.value == "dint4":
        scale = scale * 7 / 6
        levels = _dint4_reference(w / np.repeat(scale, fmt.group_size, axis=0))
        return np.where(np.abs(levels) == 0.5, np.sign(levels) * 7, levels), scale
    return q, scale


@pytest.mark.parametrize("family,kind", [("llama", "int4"), ("opt", "int4"), ("opt", "dint4"), ("qwen2", "dint4")])
def test_weight_only_graph_equals_the_numpy_fake_quant_model(tiny_export, family, kind):
    """Gemm transB, a tied lm_head's Transpose and plain MatMul (opt, llama) in the grouped layouts."""
    fmt = WeightFormat(kind, group_size=32)
    model, reference = load(tiny_export(family)), load(tiny_export(family))
    assert QuantizePass(activations="none", weights=kind, group_size=32, include_lm_head=True)(model).modified
    _fake_quant_float_model(reference, fmt, include_lm_head=True)
    feeds = make_feeds(model)
    got, expected = _run_exact(model, feeds)["logits"], _run_exact(reference, feeds)["logits"]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    float_logits = _run_exact(load(tiny_export(family)), feeds)["logits"]
    assert np.abs(got - float_logits).max() > 1e-3 * np.abs(float_logits).max()  # and it is quantized
    assert not QuantizePass(activations="none", weights=kind, group_size=32, include_lm_head=True)(model).modified


def test_int4_weights_are_blocked_dequantize_linear_along_the_input_axis(tiny_export):
    model = load(tiny_export("opt"))
    shapes = {lin.node.name: lin.weight_in_out().shape for lin in selected_linears(model, NameFilter(), False)}
    QuantizePass(activations="none", weights="int4", group_size=64)(model)
    dqs = [n for n in model.graph if n.metadata_props.get(Meta.QUANT) == "weight"]
    assert len(dqs) == len(shapes) and all(n.op_type == "DequantizeLinear" for n in dqs)
    for dq in dqs:
        q, scale = dq.inputs[0].const_value, dq.inputs[1].const_value
        gemm = dq.outputs[0].consumers()[0]
        n_in, n_out = shapes[gemm.name]
        trans = gemm.op_type == "Gemm" and gemm.attributes.get_int("transB", 0)
        assert q.dtype == ir.DataType.INT4 and dq.attributes.get_int("block_size") == 64
        assert dq.attributes.get_int("axis") == (1 if trans else 0)  # the input (reduction) axis
        assert q.shape.dims == ((n_out, n_in) if trans else (n_in, n_out))
        assert scale.shape.dims == ((n_out, n_in // 64) if trans else (n_in // 64, n_out))


def test_dint4_weights_are_codes_through_a_lookup_and_a_group_scale(tiny_export):
    model = load(tiny_export("llama"))
    QuantizePass(activations="none", weights="dint4", group_size=32)(model)
    chains = [n for n in model.graph if n.metadata_props.get(Meta.QUANT) == "weight" and n.op_type == "Reshape"]
    assert len(chains) == 14
    for reshape in chains:
        mul = reshape.inputs[0].producer()
        gather = mul.inputs[0].producer()
        cast = gather.inputs[1].producer()
        assert (mul.op_type, gather.op_type, cast.op_type) == ("Mul", "Gather", "Cast")
        assert cast.inputs[0].const_value.dtype == ir.DataType.INT4
        assert gather.inputs[0].const_value.numpy().shape == (16,)
        assert mul.inputs[1].const_value.numpy().shape[1] == 1  # [groups, 1, out]


def test_group_size_that_does_not_divide_is_a_recipe_error(tiny_export):
    model = load(tiny_export("llama"))
    with pytest.raises(RecipeError, match="group_size 48 does not divide.*64"):
        QuantizePass(weights="int4", group_size=48)(model)
    assert not any(Meta.QUANT in n.metadata_props for n in model.graph)  # refused before anything changed
    with pytest.raises(RecipeError, match="weights must be one of"):
        QuantizePass(weights="int3")
    with pytest.raises(RecipeError, match="weight_clip must be one of"):
        QuantizePass(weight_clip="percentile")
    with pytest.raises(RecipeError, match="group_size must be positive"):
        QuantizePass(weights="int4", group_size=0)


def test_w4a8_static_passes_the_tensorrt_check_and_block_32_does_not(tiny_export):
    model = load(tiny_export("llama"))
    QuantizePass(activations="per_tensor", weights="int4", group_size=64, calibrator=Calibrator(CALIB))(model)
    assert errors(check_model(model)) == []
    model = load(tiny_export("llama"))
    QuantizePass(activations="per_tensor", weights="int4", group_size=32, calibrator=Calibrator(CALIB))(model)
    assert {f.rule.value for f in errors(check_model(model))} == {"block-size"}


W4A8_PRESETS = [name for name in rc.preset_names() if name.startswith("w4a8")]


def test_the_w4a8_preset_exists():
    assert "w4a8" in W4A8_PRESETS


@pytest.mark.parametrize("preset", W4A8_PRESETS)
def test_w4a8_preset_end_to_end_on_tiny_llama(tiny_source, tiny_export, tmp_path, preset):
    _, model = export_tiny_preset(tiny_source("llama"), tmp_path / "q", preset)
    weights = collections.Counter(n.inputs[0].const_value.dtype for n in model.graph if n.op_type == "DequantizeLinear"
                                  and n.inputs[0].const_value is not None and n.metadata_props.get(Meta.QUANT) == "weight")
    ops = collections.Counter(n.op_type for n in model.graph)
    chosen = collections.Counter(v.split(":")[0] for v in Meta.PRECISION.under(model.metadata_props).values())
    eight = chosen.get("8", 0)  # linears the preset's w4_fraction keeps at int8, as recorded
    assert sum(chosen.values()) == 14
    grouped = preset.startswith("w4a8-group")  # per-group activations, lm_head with int8 weights in groups
    merged_away = linears_merged_away(model)
    if grouped and preset.endswith("-ort"):  # every linear in MatMulNBits, which quantizes its input itself
        assert ops["MatMulNBits"] + merged_away == 15 and ops["DequantizeLinear"] == ops["QuantizeLinear"] == 0
        assert collections.Counter(n.metadata_props[Meta.LOWERED] for n in model.graph if n.op_type == "MatMulNBits"
                                   for _ in n.metadata_props.get(Meta.MERGED_LINEARS, n.name).split(",")) == \
            {"int4": 14 - eight, "int8": eight + 1}
    elif grouped:  # per-token-and-group activations: q/k/v, o, gate/up, down in 2 layers, and lm_head's
        assert weights[ir.DataType.INT4] == 14 - eight and weights[ir.DataType.INT8] == eight + 1
        assert ops["QuantizeLinear"] == 9
        assert {n.metadata_props.get(Meta.QUANT) for n in model.graph if n.op_type == "QuantizeLinear"} == {"per_group"}
    elif preset.endswith("-ort"):  # the int4 weights live inside MatMulNBits; int8 ones stay in QDQ form
        assert weights[ir.DataType.INT4] == 0 and ops["MatMulNBits"] == 14 - eight and weights[ir.DataType.INT8] == eight
    else:
        assert weights[ir.DataType.INT4] == 14 - eight and weights[ir.DataType.INT8] == eight
    if not grouped:
        assert ops["QuantizeLinear"] == 8  # per-tensor activations: q/k/v, o, gate/up, down in 2 layers
    if preset == "w4a8":
        assert errors(check_model(model)) == []
    sqnr = logits_sqnr_db(model, tiny_export("llama"), runner=_run_exact)
    # int4 on a random tiny model, 128 calibration tokens: measured 7.7 dB (round-to-nearest int4 9.2, W8A8 26);
    # transposed blocks or wrong scales give about 0 dB or less
    assert 5.0 < sqnr < 40.0, f"{preset}: logits SQNR {sqnr:.1f} dB vs FP32"


@pytest.mark.slow
def test_w4a8_on_smollm2_passes_the_tensorrt_check_and_meets_its_perplexity_target(default_export, tmp_path):
    model = quantize_smollm2(default_export, "w4a8")
    assert errors(check_model(model)) == []
    weights = collections.Counter(n.inputs[0].const_value.dtype for n in model.graph if n.op_type == "DequantizeLinear"
                                  and n.inputs[0].const_value is not None and n.metadata_props.get(Meta.QUANT) == "weight")
    chosen = collections.Counter(v.split(":")[0] for v in Meta.PRECISION.under(model.metadata_props).values())
    eight = chosen.get("8", 0)  # linears the preset's w4_fraction keeps at int8 (none without it)
    assert weights[ir.DataType.INT4] == 7 * 30 - eight and weights[ir.DataType.INT8] == eight  # every layer linear
    # 16 windows, not 4: on 4 the ratio of one preset moves by 1.5 points between graphs equal up to float
    # rounding or a CPU's kernels (docs/measurements.md), on 16 by well under one
    result = evaluate_quantized(default_export, model, tmp_path / "w4a8", windows=16)
    ratio = result["ppl_ratio"]
    # issue 4's target; measured 1.053 on 16 windows (the preset without upstream activations or int8 linears: 1.070)
    assert ratio <= 1.06, f"w4a8: ppl ratio {ratio:.4f} is above issue 4's target 1.06"
    # w4a8-ort = these passes + its ORT lowerings (lossless up to float rounding): lower this graph, not a new one
    qdq_passes = {e.name for e in rc.load_recipe("w4a8").passes}
    lowerings = [e for e in rc.load_recipe("w4a8-ort").passes if e.name not in qdq_passes]
    assert [e.name for e in lowerings] == ["ort-int4", "ort-attention", "ort-rms-norm", "ort-rotary",
                                           "ort-attention-chunks"]
    for entry in lowerings:
        assert entry.build()(model).modified
    lowered = evaluate_quantized(default_export, model, tmp_path / "w4a8-ort", windows=16)["ppl_ratio"]
    # the lowerings are exact up to float rounding (each pass's tiny-model tests), but a rounding difference that
    # flips a per-tensor static activation code cascades: measured 0.04% apart on one CPU, 0.24% on an AMD Zen 5;
    # up to about 0.6% between float-rounding-equal graphs on 4 x 512 tokens, less on 16 (docs/measurements.md)
    assert abs(lowered - ratio) < 6e-3 * ratio, f"w4a8-ort: ppl ratio {lowered:.4f} vs w4a8 {ratio:.4f}"


@pytest.mark.slow
def test_w4a8_group_ort_on_smollm2_meets_the_w4a8_targets_on_two_domains(default_export, tmp_path):
    """The per-group W4A8 preset in its ONNX Runtime form (its QDQ twin computes the same integers: the preset
    matrix checks the lowering on every family), calibrated on its recipe's ``machine`` text (the Python documentation
    mixed with the manual pages) and held to issue 15's w4a8 targets on the documentation's evaluation half and on
    git's notes, a domain no calibration saw."""
    model = quantize_smollm2(default_export, "w4a8-group-ort")
    ops = collections.Counter(n.op_type for n in model.graph)
    merged_away = linears_merged_away(model)
    assert ops["MatMulNBits"] + merged_away == 7 * 30 + 1 and ops["QuantizeLinear"] == ops["DequantizeLinear"] == 0
    # 16 windows per domain; measured on 40 in docs/measurements.md
    for text, target in (("pydoc", 1.06), ("gitnotes", 1.08)):
        ratio = evaluate_quantized(default_export, model, tmp_path / text, windows=16, text=text)["ppl_ratio"]
        assert ratio <= target, f"w4a8-group-ort on {text}: ppl ratio {ratio:.4f} is above issue 15's target {target}"


def _linear_outputs(model: ir.Model, names: list[str], windows) -> dict[str, np.ndarray]:
    from qexport.calibration.stats import run_values

    runs = list(run_values(model, names, windows))
    return {n: np.concatenate([r[n].reshape(-1, r[n].shape[-1]) for r in runs]).astype(np.float64) for n in names}


def test_w4a8_gptq_beats_round_to_nearest_on_the_same_weights(tiny_export):
    """The preset's GPTQ step against round-to-nearest with the same int4 format (groups of 64, MSE clip), both after
    the preset's own lossless prefix and with float activations: the error each graph's linears leave in their
    outputs, on the calibration tokens GPTQ minimises it on, summed over all linears."""
    from qexport.passes.quantize.gptq import GptqPass
    from qexport.recipes.pipeline import PipelineSettings, apply_recipe

    windows = [np.arange(3 + 50 * i, 131 + 50 * i, dtype=np.int64) % 272 for i in range(4)]
    recipe = rc.load_recipe("w4a8")
    gptq = next(e for e in recipe.passes if e.name == "quantize-gptq")
    prefix = rc.Recipe(name="prefix", passes=recipe.passes[:recipe.passes.index(gptq)])
    float_graph = load(tiny_export("llama"))
    apply_recipe(float_graph, prefix, windows, PipelineSettings(measure_difficulty=False))
    names = [lin.node.outputs[0].name for lin in selected_linears(float_graph, NameFilter(), False)]
    expected = _linear_outputs(float_graph, names, windows)
    fmt = dict(weights="int4", group_size=64, weight_clip="mse")
    assert {k: dict(gptq.settings)[k] for k in fmt} == fmt  # the preset's format: the twin below must match it

    errors_of = {}
    for method in ("gptq", "rtn"):
        model = ir.from_proto(ir.to_proto(float_graph))
        quantizer = (GptqPass(calibrator=Calibrator(windows), sequential=True, **fmt) if method == "gptq"
                     else QuantizePass(activations="none", **fmt))
        assert quantizer(model).modified
        got = _linear_outputs(model, names, windows)
        errors_of[method] = sum(float(((got[n] - expected[n]) ** 2).sum()) for n in names)
    # measured on this model: GPTQ leaves 0.63 of round-to-nearest's output error; without its error
    # compensation GPTQ is round-to-nearest (1.0), so the bound fails a GPTQ that compensates nothing or little
    assert errors_of["gptq"] < 0.75 * errors_of["rtn"], errors_of
