"""GPTQ: the blocked Cholesky algorithm against the plain inverse-Hessian (OBQ) update, and in the graph."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from pass_testing import load
from qexport import numerics
from qexport.errors import PatternNotFoundError, RecipeError
from qexport.calibration import layer_sessions
from qexport.passes.quantize.gptq import GptqPass, gptq_quantize, inverse_factor
from qexport.passes.quantize.insert_qdq import QuantizePass
from qexport.calibration.calibrator import Calibrator
from qexport.passes.discovery.linear_select import selected_linears
from qexport.passes.metadata import Meta
from qexport.passes.discovery.names import NameFilter
from qexport.passes.quantize.weight_quant import WeightFormat


def _layer(seed: int = 0, tokens: int = 1500, n_in: int = 48, n_out: int = 24):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(tokens, n_in)) @ rng.normal(size=(n_in, n_in))  # correlated inputs: compensation helps
    x[:, 5] = 0.0  # a dead input channel
    return x, rng.normal(size=(n_in, n_out))


def _obq_reference(w: np.ndarray, h: np.ndarray, damp: float) -> np.ndarray:
    """Column by column, updating the remaining columns with the inverse Hessian and then removing the
    quantized column from it (the OBS update GPTQ's Cholesky form is equivalent to)."""
    w = w.T.copy()
    h = h.copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * np.mean(np.diag(h)) * np.eye(len(h))
    hinv = np.linalg.inv(h)
    scale = numerics.absmax_scale(np.abs(w).max(axis=1))  # per output channel (a row of w here)
    q = np.zeros_like(w)
    for i in range(w.shape[1]):
        q[:, i] = np.clip(np.round(w[:, i] / scale), -127, 127)
        err = (w[:, i] - q[:, i] * scale) / hinv[i, i]
        w[:, i + 1:] -= np.outer(err, hinv[i, i + 1:])
        hinv -= np.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]
    return q.T


def _output_mse(x, w, w_hat) -> float:
    return float(np.mean((x @ w - x @ w_hat) ** 2))


@pytest.mark.parametrize("block_size", [1, 7, 128])
def test_blocked_gptq_equals_the_column_by_column_reference(block_size):
    x, w = _layer()
    h = x.T @ x / len(x)
    q, scale = gptq_quantize(w, h, damp=0.01, block_size=block_size)
    expected = _obq_reference(w, h, 0.01)
    assert q.dtype == np.int8 and np.abs(q).max() <= 127
    assert np.mean(q == expected) > 0.995  # identical but for rare float ties at .5
    np.testing.assert_allclose(scale, np.abs(w).max(axis=0) / 127)
    assert np.all(q[5] == 0)  # the dead input's weights are zeroed


def test_gptq_beats_round_to_nearest_on_the_layer_output():
    x, w = _layer(seed=1)
    h = x.T @ x / len(x)
    rtn = _output_mse(x, w, numerics.fake_quant(w, axis=0))  # round-to-nearest per output channel
    for act_order in (False, True):
        q, s = gptq_quantize(w, h, act_order=act_order)
        assert _output_mse(x, w, q * s) < 0.7 * rtn, f"act_order={act_order}"


def test_gptq_pass_writes_int8_weights_and_quantize_adds_activations(tiny_export):
    windows = tuple(np.arange(3 + 60 * i, 67 + 60 * i, dtype=np.int64) for i in range(3))
    model = load(tiny_export("llama"))
    count = len(selected_linears(model, NameFilter(), False))
    assert GptqPass(calibrator=Calibrator(windows))(model).modified
    weight_dqs = [n for n in model.graph if n.metadata_props.get(Meta.QUANT) == "weight"]
    assert len(weight_dqs) == count
    assert not GptqPass(calibrator=Calibrator(windows))(model).modified  # nothing left to quantize
    before = {dq.name: dq.inputs[0].const_value.numpy().copy() for dq in weight_dqs}
    assert QuantizePass()(model).modified
    after = {n.name: n.inputs[0].const_value.numpy() for n in model.graph if n.metadata_props.get(Meta.QUANT) == "weight"}
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph) == 8  # activations of all 14 linears
    assert not QuantizePass()(model).modified


def test_bad_settings():
    with pytest.raises(RecipeError, match="damp"):
        GptqPass(damp=0.0)
    with pytest.raises(RecipeError, match="block_size"):
        GptqPass(block_size=0)


@pytest.mark.parametrize("kind,clip", [("int4", "none"), ("int4", "mse"), ("dint4", "none"), ("dint4", "mse")])
def test_grouped_gptq_without_correlations_is_round_to_nearest(kind, clip):
    """A diagonal Hessian leaves nothing to compensate: codes and group scales equal round-to-nearest's, which
    checks the group bookkeeping (scale fixed at each group's first column, blocks rounded to whole groups)."""
    _, w = _layer(seed=3, n_in=96)
    fmt = WeightFormat(kind, group_size=32, clip=clip)
    h = np.diag(np.random.default_rng(0).uniform(0.5, 2.0, size=96))
    for block_size, act_order in ((128, False), (40, False), (128, True)):
        q, scale = gptq_quantize(w, h, block_size=block_size, act_order=act_order, fmt=fmt)
        q_rtn, s_rtn = fmt.quantize(w)
        np.testing.assert_allclose(scale, s_rtn, rtol=1e-12)
        assert np.mean(q == q_rtn) > 0.995 and scale.shape == (3, 24)


def _plain_gptq(w_in_out, hessian, fmt, block_size=128, act_order=False):
    """The GPTQ loop written plainly on the [out, in] layout, block updates through np.outer (the reference the
    in-place loop of gptq_quantize must equal bit for bit)."""
    rows = fmt.group_rows(w_in_out.shape[0])
    dead, perm, u = inverse_factor(hessian, 0.01, act_order)
    w = np.array(w_in_out, dtype=np.float64).T
    w[:, dead] = 0.0
    if fmt.grouped:
        block_size = max(rows, block_size // rows * rows)
        scales = np.stack([fmt.scale(w[:, g:g + rows].T) for g in range(0, w.shape[1], rows)]) if act_order else \
            np.zeros((w.shape[1] // rows, w.shape[0]))
    else:
        scales = fmt.scale(np.asarray(w_in_out, dtype=np.float64))[None]
    w = w[:, perm]
    q = np.zeros_like(w)
    for start in range(0, w.shape[1], block_size):
        end = min(start + block_size, w.shape[1])
        block, errors = w[:, start:end].copy(), np.zeros((w.shape[0], end - start))
        for i in range(end - start):
            column = perm[start + i]
            if fmt.grouped and not act_order and column % rows == 0:
                scales[column // rows] = fmt.scale(block[:, i:i + rows].T)
            scale = scales[column // rows] if fmt.grouped else scales[0]
            q[:, start + i] = fmt.codes(block[:, i] / scale)
            err = (block[:, i] - fmt.levels(q[:, start + i]) * scale) / u[start + i, start + i]
            block[:, i:] -= np.outer(err, u[start + i, start + i:end])
            errors[:, i] = err
        w[:, end:] -= errors @ u[start:end, end:]
    return q[:, np.argsort(perm)].T.astype(np.int8), (scales if fmt.grouped else scales[0])


@pytest.mark.parametrize("kind,clip", [("int8", "none"), ("int4", "mse"), ("dint4", "mse")])
def test_gptq_loop_equals_the_plain_loop_bit_for_bit(kind, clip):
    x, w = _layer(seed=4, n_in=128, n_out=40)
    h = x.T @ x / len(x)
    fmt = WeightFormat(kind, group_size=32, clip=clip)
    for block_size, act_order in ((48, False), (128, True)):
        q, scale = gptq_quantize(w, h, block_size=block_size, act_order=act_order, fmt=fmt)
        q_ref, scale_ref = _plain_gptq(w, h, fmt, block_size, act_order)
        assert np.array_equal(q, q_ref) and np.array_equal(scale, scale_ref), (block_size, act_order)


@pytest.mark.parametrize("kind", ["int4", "dint4"])
def test_grouped_gptq_beats_round_to_nearest_on_the_layer_output(kind):
    x, w = _layer(seed=1, n_in=96)
    h = x.T @ x / len(x)
    fmt = WeightFormat(kind, group_size=32)
    rtn = _output_mse(x, w, fmt.dequantize(*fmt.quantize(w)))
    for act_order in (False, True):
        q, scale = gptq_quantize(w, h, act_order=act_order, fmt=fmt)
        assert set(np.unique(q)) <= set(range(-7, 8)) and scale.shape == (3, 24)
        assert _output_mse(x, w, fmt.dequantize(q, scale)) < 0.6 * rtn, f"{kind} act_order={act_order}"


def _layer_hessians(model, pattern, settings):
    """One-shot Hessians of the inputs of the linears matching ``pattern``, from the whole graph as it is."""
    inputs = list(dict.fromkeys(lin.input for lin in selected_linears(model, NameFilter((pattern,)), False)))
    return {v.name: h for v, h in next(settings["calibrator"].hessians(model, [inputs])).hessians.items()}


def _spy_hessians(monkeypatch, from_cache: list[bool] | None = None) -> dict[str, np.ndarray]:
    """The Hessians each stage gives GPTQ (by value name); ``from_cache`` gets whether each stage ran from the cache."""
    seen: dict[str, np.ndarray] = {}
    hessians = Calibrator.hessians

    def spy(self, *args, **kwargs):
        for stage in hessians(self, *args, **kwargs):
            seen.update({v.name: h for v, h in stage.hessians.items()})
            if from_cache is not None:
                from_cache.append(stage.from_cache)
            yield stage

    monkeypatch.setattr(Calibrator, "hessians", spy)
    return seen


def test_sequential_gptq_takes_each_layers_hessian_from_the_graph_with_earlier_layers_quantized(tiny_export, monkeypatch):
    windows = tuple(np.arange(3 + 60 * i, 67 + 60 * i, dtype=np.int64) for i in range(3))
    model = load(tiny_export("llama"))
    layer1 = {lin.input.name for lin in selected_linears(model, NameFilter(("layers.1.*",)), False)}
    settings = dict(calibrator=Calibrator(windows), weights="int4", group_size=32)
    float_h = _layer_hessians(model, "layers.1.*", settings)
    seen = _spy_hessians(monkeypatch)
    assert GptqPass(**settings, sequential=True)(model).modified
    monkeypatch.undo()
    # the same Hessians from a graph in which only layer 0 is quantized (one-shot: its Hessians are float's)
    reference = load(tiny_export("llama"))
    GptqPass(**settings, linears=("layers.0.*",))(reference)
    expected = _layer_hessians(reference, "layers.1.*", settings)
    assert len(expected) == len(layer1) == 4  # the inputs of q/k/v, o, gate/up and down
    for name, h in expected.items():
        np.testing.assert_allclose(seen[name], h, rtol=1e-6, atol=1e-9 * np.abs(h).max())
        change = np.abs(seen[name] - float_h[name]).max() / np.abs(float_h[name]).max()
        assert change > 1e-4, f"{name}: layer 1 saw float inputs (relative change {change:.2g})"
    assert sum(n.metadata_props.get(Meta.QUANT) == "weight" for n in model.graph) == 14


def _weight_codes(model) -> dict[str, np.ndarray]:
    return {n.name: n.inputs[0].const_value.numpy().astype(np.int8) for n in model.graph
            if n.metadata_props.get(Meta.QUANT) == "weight"}


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "gemma3"])
def test_sequential_gptq_from_the_cached_residual_stream_equals_whole_graph_runs(tiny_export, monkeypatch, family):
    """Layer by layer from the cached residual stream (each stage runs one layer and a half) gives the Hessians
    and codes of running the whole graph up to each layer's linears (the reference path, forced)."""
    windows = tuple(np.arange(3 + 60 * i, 67 + 60 * i, dtype=np.int64) for i in range(3))
    settings = dict(calibrator=Calibrator(windows), weights="int4", group_size=32, sequential=True)
    results = {}
    for cached in (True, False):
        model = load(tiny_export(family))
        monkeypatch.setattr(GptqPass, "_cached_layers", cached)
        from_cache: list[bool] = []
        seen = _spy_hessians(monkeypatch, from_cache)
        assert GptqPass(**settings)(model).modified
        monkeypatch.undo()
        stages = len(from_cache)
        assert stages >= 2 and sum(from_cache) == (stages - 1 if cached else 0)
        results[cached] = seen, _weight_codes(model)
    (h_cached, codes_cached), (h_whole, codes_whole) = results[True], results[False]
    assert h_cached.keys() == h_whole.keys() and len(codes_cached) == len(codes_whole) > 0
    for name, h in h_whole.items():
        np.testing.assert_allclose(h_cached[name], h, rtol=1e-6, atol=1e-9 * np.abs(h).max())
    assert all(np.array_equal(codes_cached[k], codes_whole[k]) for k in codes_whole)


def test_stage_without_a_cut_runs_the_whole_graph(tiny_export, monkeypatch, caplog):
    """No residual stream found: every stage runs the whole graph, with the same result as the cached path."""
    windows = tuple(np.arange(3 + 60 * i, 67 + 60 * i, dtype=np.int64) for i in range(2))
    settings = dict(calibrator=Calibrator(windows), weights="int4", group_size=32, sequential=True)
    cached = load(tiny_export("llama"))
    caplog.set_level(logging.INFO, logger="qexport")
    GptqPass(**settings)(cached)
    assert "(1 run from the cached residual stream, 1 through the whole graph)" in caplog.text
    caplog.clear()

    def no_stream(model):
        raise PatternNotFoundError("no residual stream (test)")

    monkeypatch.setattr(layer_sessions, "stream_values", no_stream)
    whole = load(tiny_export("llama"))
    GptqPass(**settings)(whole)
    assert "(0 run from the cached residual stream, 2 through the whole graph)" in caplog.text
    assert "no residual stream to cut at" in caplog.text
    a, b = _weight_codes(cached), _weight_codes(whole)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_gptq_weight_settings_are_checked(tiny_export):
    with pytest.raises(RecipeError, match="weights must be one of"):
        GptqPass(weights="int2")
    with pytest.raises(RecipeError, match="group_size 128 does not divide"):
        GptqPass(calibrator=Calibrator((np.arange(3, 20),)), weights="int4")(load(tiny_export("llama")))


def _fake_quant_rows(x: np.ndarray, block: int | None) -> np.ndarray:
    """Symmetric int8 fake quantization of x [..., K], one scale per token (and ``block`` channels)."""
    k = x.shape[-1]
    blocks = x.reshape(*x.shape[:-1], k // (block or k), block or k)
    scale = np.maximum(np.abs(blocks).max(axis=-1, keepdims=True) / numerics.INT8_QMAX, numerics.SCALE_EPS)
    return (np.clip(np.round(blocks / scale), -127, 127) * scale).reshape(x.shape)


@pytest.mark.parametrize("block", [None, 16])
def test_activation_quantizers_equal_numpy_fake_quantization(block):
    """per_token_qdq and per_block_qdq in ONNX Runtime against the numpy reference, on inputs with outliers."""
    import onnx_ir as ir
    from pass_testing import run
    from qexport.passes.quantize.act_qdq import SharedConsts, per_block_qdq, per_token_qdq

    x_in = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 5, 64]))
    ident = ir.node("Identity", [x_in], name="sink")
    ident.outputs[0].name = "y"
    graph = ir.Graph([x_in], [ident.outputs[0]], nodes=[ident], opset_imports={"": 21}, name="g")
    consts = SharedConsts(graph)
    xq, nodes = (per_token_qdq(graph, x_in, 64, ident, consts) if block is None
                 else per_block_qdq(graph, x_in, 64, block, ident, consts))
    ident.replace_input_with(0, xq)
    assert len(nodes) == (6 if block is None else 7) and all(n.graph is graph for n in nodes)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 64)).astype(np.float32)
    x[0, 1, 3] = 40.0  # an outlier: with blocks it widens only its own block's step
    got = run(ir.Model(graph, ir_version=10), {"x": x})["y"]
    expected = _fake_quant_rows(x.astype(np.float64), block)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    assert not np.allclose(got, x, atol=1e-3)  # it did quantize


@pytest.mark.parametrize("upstream", ["per_token", "per_group"])
def test_upstream_activations_give_later_layers_the_quantized_activations_and_leave_no_trace(tiny_export, monkeypatch,
                                                                                             upstream):
    """With ``upstream_activations``, layer 1's Hessians are those of a graph whose layer 0 has GPTQ weights and
    int8 activations (per token, or per token and group); afterwards the graph equals a float-upstream run's
    structure (no quantizer, no constant left), and layer 0's codes are the same (it saw float inputs either way)."""
    from qexport.passes.quantize.act_qdq import SharedConsts, per_block_qdq, per_token_qdq

    windows = tuple(np.arange(3 + 60 * i, 67 + 60 * i, dtype=np.int64) for i in range(3))
    settings = dict(calibrator=Calibrator(windows), weights="int4", group_size=32)
    float_seq = load(tiny_export("llama"))
    float_seen = _spy_hessians(monkeypatch)
    GptqPass(**settings, sequential=True)(float_seq)
    float_seen = dict(float_seen)
    monkeypatch.undo()
    model = load(tiny_export("llama"))
    seen = _spy_hessians(monkeypatch)
    assert GptqPass(**settings, sequential=True, upstream_activations=upstream)(model).modified
    monkeypatch.undo()
    # the reference: layer 0 quantized by GPTQ, its linears' inputs through the quantizer, kept in the graph
    reference = load(tiny_export("llama"))
    GptqPass(**settings, linears=("layers.0.*",))(reference)
    consts = SharedConsts(reference.graph)
    layer0 = [n for n in reference.graph if n.metadata_props.get(Meta.QUANT) == "weight"]
    readers: dict = {}
    for node in reference.graph:
        if node.op_type in ("MatMul", "Gemm") and node.inputs[1] is not None and node.inputs[1].producer() in layer0:
            readers.setdefault(node.inputs[0], []).append(node)
    assert len(readers) == 4  # q/k/v, o, gate/up, down
    for x, nodes in readers.items():
        width = x.shape[-1]
        xq, _ = (per_token_qdq(reference.graph, x, width, nodes[0], consts) if upstream == "per_token"
                 else per_block_qdq(reference.graph, x, width, 32, nodes[0], consts))
        for node in nodes:
            node.replace_input_with(0, xq)
    expected = _layer_hessians(reference, "layers.1.*", settings)
    assert len(expected) == 4
    for name, h in expected.items():
        np.testing.assert_allclose(seen[name], h, rtol=1e-5, atol=1e-8 * np.abs(h).max())
        change = np.abs(seen[name] - float_seen[name]).max() / np.abs(float_seen[name]).max()
        assert change > 1e-4, f"{name}: layer 1 saw float activations (relative change {change:.2g})"
    assert [n.op_type for n in model.graph] == [n.op_type for n in float_seq.graph]
    assert set(model.graph.initializers) == set(float_seq.graph.initializers)
    assert not any(n.metadata_props.get(Meta.QUANT) in ("per_token", "per_block") for n in model.graph)
    codes, float_codes = _weight_codes(model), _weight_codes(float_seq)
    layer0_codes = [k for k in codes if any(k == n.name for n in layer0)]
    assert layer0_codes and all(np.array_equal(codes[k], float_codes[k]) for k in layer0_codes)


def test_upstream_activations_settings_are_checked():
    with pytest.raises(RecipeError, match="set sequential: true"):
        GptqPass(upstream_activations="per_token")
    with pytest.raises(RecipeError, match="upstream_activations must be one of"):
        GptqPass(sequential=True, upstream_activations="per_tensor")
    with pytest.raises(RecipeError, match="per_group takes its groups"):
        GptqPass(sequential=True, upstream_activations="per_group", weights="int8")
