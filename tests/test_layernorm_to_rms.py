"""LayerNorm -> RMSNorm conversion keeps the tiny OPT's outputs, lets R1 run on it, and refuses what it cannot centre."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from pass_testing import give_norms_weights, load, prefill_decode, run, weights_of
from qexport.recipes import schema as rc
from qexport.errors import QexportError
from qexport.passes.discovery import sites
from qexport.passes._ir import const_f64
from qexport.passes.transforms.fold_norm import FoldNormPass
from qexport.passes.transforms.layernorm_to_rms import LayerNormToRmsPass
from qexport.passes.transforms.online_hadamard import OnlineHadamardPass
from qexport.passes.transforms.rotate_heads import RotateHeadsPass
from qexport.passes.transforms.rotate_residual import RotateResidualPass
from qexport.passes.transforms.untie_embeddings import UntieEmbeddingsPass

RTOL, ATOL = 1e-4, 1e-5  # FP32 after float64 rewrites: one rounding per weight, a few ulps through the network


def _close(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray], what: str) -> None:
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=RTOL, atol=ATOL, err_msg=f"{what}: {name}")


def _folded_opt(tiny_export) -> ir.Model:
    """Tiny OPT with random gamma, beta and biases, untied and norm-folded (the conversion's precondition)."""
    model = load(tiny_export("opt"))
    give_norms_weights(model)
    UntieEmbeddingsPass()(model)
    FoldNormPass()(model)
    return model


def _assert_unchanged(model: ir.Model, weights: dict[str, np.ndarray], ops: list[str]) -> None:
    after = weights_of(model)
    assert weights.keys() == after.keys() and all(np.array_equal(weights[k], after[k]) for k in weights)
    assert [n.op_type for n in model.graph] == ops


def test_conversion_is_exact_on_opt(tiny_export):
    model = _folded_opt(tiny_export)
    expected_first, expected_next = prefill_decode(model)
    layer_norms = sum(n.op_type == "LayerNormalization" for n in model.graph)
    assert layer_norms == 5  # two per layer and the final norm

    assert LayerNormToRmsPass()(model).modified
    first, nxt = prefill_decode(model)
    _close(first, expected_first, "prefill")
    _close(nxt, expected_next, "decode with the KV cache")
    diff = float(np.abs(first["logits"] - expected_first["logits"]).max())
    print(f"max |logits diff| after LayerNorm -> RMSNorm: {diff:.3g}")

    assert not any(n.op_type == "LayerNormalization" for n in model.graph)
    stream = sites.find_residual_stream(model)
    assert [n.kind for n in stream.norms] == [sites.NormKind.RMS_DECOMPOSED] * 5
    assert all(np.all(const_f64(n.gamma) == 1.0) for n in stream.norms)
    assert len(sites.find_norm_sites(model.graph)) == 5  # the site matcher still sees every norm site
    for table in (stream.embedding_weight, stream.position_embedding.inputs[0]):
        np.testing.assert_allclose(const_f64(table).mean(axis=1), 0.0, atol=1e-7)
    for writer in stream.writers:
        np.testing.assert_allclose(writer.weight_in_out().mean(axis=1), 0.0, atol=1e-7)
        assert abs(writer.bias_array().mean()) < 1e-7 and np.abs(writer.bias_array()).max() > 1e-2

    weights, ops = weights_of(model), [n.op_type for n in model.graph]  # contract: a second run is a no-op
    assert not LayerNormToRmsPass()(model).modified
    _assert_unchanged(model, weights, ops)


def test_quarot_rotations_are_exact_on_converted_opt(tiny_export):
    model = _folded_opt(tiny_export)
    expected_first, expected_next = prefill_decode(model)
    positions = const_f64(sites.find_residual_stream(model).position_embedding.inputs[0]).copy()
    for p in (LayerNormToRmsPass(), RotateResidualPass(seed=5)):
        assert p(model).modified, type(p).__name__
    first, nxt = prefill_decode(model)
    _close(first, expected_first, "prefill after R1")
    _close(nxt, expected_next, "decode after R1")
    print(f"max |logits diff| after R1: {np.abs(first['logits'] - expected_first['logits']).max():.3g}")
    rotated = const_f64(sites.find_residual_stream(model).position_embedding.inputs[0])
    centred = positions - positions.mean(axis=1, keepdims=True)
    np.testing.assert_allclose(np.linalg.norm(rotated, axis=1), np.linalg.norm(centred, axis=1), rtol=1e-5)
    assert np.abs(rotated - centred).max() > 1e-2  # the position table was rotated with the residual stream

    for p in (RotateHeadsPass(), OnlineHadamardPass()):
        assert p(model).modified, type(p).__name__
    first, nxt = prefill_decode(model)
    np.testing.assert_allclose(first["logits"], expected_first["logits"], rtol=RTOL, atol=ATOL, err_msg="R1+R2+R4")
    np.testing.assert_allclose(nxt["logits"], expected_next["logits"], rtol=RTOL, atol=ATOL, err_msg="decode R1+R2+R4")


def test_rotate_opt_preset_runs_losslessly_on_tiny_opt(tiny_export):
    model = load(tiny_export("opt"))
    give_norms_weights(model)
    expected_first, expected_next = prefill_decode(model)
    passes = rc.load_recipe("rotate-opt").build()
    assert [type(p).__name__ for p in passes][1:4] == ["FoldNormPass", "LayerNormToRmsPass", "RotateResidualPass"]
    for p in passes:
        assert p(model).modified, type(p).__name__
    first, nxt = prefill_decode(model)
    np.testing.assert_allclose(first["logits"], expected_first["logits"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(nxt["logits"], expected_next["logits"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_rms_models_are_left_alone(tiny_export, family):
    model = load(tiny_export(family))
    give_norms_weights(model)
    UntieEmbeddingsPass()(model)
    FoldNormPass()(model)
    weights, ops = weights_of(model), [n.op_type for n in model.graph]
    assert not LayerNormToRmsPass()(model).modified
    _assert_unchanged(model, weights, ops)


def test_unfolded_layer_norm_is_refused(tiny_export):
    model = load(tiny_export("opt"))
    give_norms_weights(model)
    weights, ops = weights_of(model), [n.op_type for n in model.graph]
    with pytest.raises(QexportError, match="gamma = 1 and beta = 0.*fold-norm"):
        LayerNormToRmsPass()(model)
    _assert_unchanged(model, weights, ops)


def test_writer_read_elsewhere_is_refused(tiny_export):
    model = _folded_opt(tiny_export)
    writer = sites.find_residual_stream(model).writers[0]
    model.graph.outputs.append(writer.output)  # a second reader of out_proj's output would see the centring
    weights, ops = weights_of(model), [n.op_type for n in model.graph]
    with pytest.raises(QexportError, match=f"cannot centre the residual writer {writer.node.name}"):
        LayerNormToRmsPass()(model)
    _assert_unchanged(model, weights, ops)


def test_branch_without_a_linear_writer_is_refused(tiny_export):
    model = _folded_opt(tiny_export)
    block = sites.find_residual_stream(model).blocks[1]  # fc2 -> residual add becomes fc2 -> Tanh -> add
    tanh = ir.node("Tanh", [block.writer.output], name="test_tanh")
    model.graph.insert_after(block.writer.bias_node or block.writer.node, tanh)
    block.add.replace_input_with(list(block.add.inputs).index(block.writer.output), tanh.outputs[0])
    weights, ops = weights_of(model), [n.op_type for n in model.graph]
    with pytest.raises(QexportError, match=f"layernorm-to-rms.*{block.add.name}.*does not end in a weight linear"):
        LayerNormToRmsPass()(model)
    _assert_unchanged(model, weights, ops)


def test_direct_reader_of_the_stream_is_refused(tiny_export):
    model = _folded_opt(tiny_export)
    residual = sites.find_residual_stream(model).blocks[0].add.outputs[0]
    probe = ir.node("ReduceMax", [residual], name="test_probe")
    model.graph.insert_after(residual.producer(), probe)
    model.graph.outputs.append(probe.outputs[0])
    weights, ops = weights_of(model), [n.op_type for n in model.graph]
    with pytest.raises(QexportError, match="ReduceMax test_probe reads the residual stream"):
        LayerNormToRmsPass()(model)
    _assert_unchanged(model, weights, ops)


def test_conversion_of_an_fp16_export_normalizes_in_fp32(tiny_source, tmp_path):
    import qexport

    model = load(qexport.export(str(tiny_source("opt")), tmp_path / "model", dtype="fp16"))
    ids = np.random.default_rng(2).integers(3, 200, size=(2, 5), dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for value in model.graph.inputs:
        if value.name.startswith("past_key_values."):
            feeds[value.name] = np.zeros((2, value.shape[1], 0, value.shape[3]), dtype=np.float16)
    expected = run(model, feeds)["logits"].astype(np.float32)
    assert LayerNormToRmsPass()(model).modified
    assert [n.op_type for n in model.graph].count("Pow") == 5
    got = run(model, feeds)["logits"].astype(np.float32)
    # FP16 weights are re-rounded after centring: a few fp16 ulps (2^-10 relative) through two layers
    assert np.abs(got - expected).max() < 4e-3 * np.abs(expected).max()
