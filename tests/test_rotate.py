"""R1 (residual), R2 (per-head V/O) and R4 (online Hadamard) keep the tiny models' outputs (FP32 ONNX Runtime)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from pass_testing import give_norms_weights, load, make_feeds, prefill_decode, run, weights_of
from qexport.errors import QexportError
from qexport.passes.discovery import sites
from qexport.passes._ir import const_f64
from qexport.passes.metadata import Meta
from qexport.passes.transforms.fold_norm import FoldNormPass
from qexport.passes.transforms.hadamard import Rotation, rotation_matrix
from qexport.passes.transforms.online_hadamard import OnlineHadamardPass
from qexport.passes.transforms.rotate_heads import RotateHeadsPass
from qexport.passes.transforms.rotate_residual import RotateResidualPass
from qexport.passes.transforms.untie_embeddings import UntieEmbeddingsPass

RTOL, ATOL = 1e-4, 1e-5  # FP32 after float64 folding: one rounding per weight, a few ulps through the network


def _close(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL, err_msg=what)


def _prepared(tiny_export, family: str) -> ir.Model:
    """A tiny export with random norm weights and biases, untied and norm-folded (R1's preconditions)."""
    model = load(tiny_export(family))
    give_norms_weights(model)
    UntieEmbeddingsPass()(model)
    FoldNormPass()(model)
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("rotation", list(Rotation))
def test_rotate_residual_is_exact(tiny_export, family, rotation):
    model = _prepared(tiny_export, family)
    feeds = make_feeds(model)  # R1 leaves keys and values alone, so a random past is fine
    expected = run(model, feeds)
    table = const_f64(sites.find_residual_stream(model).embedding_weight)

    assert RotateResidualPass(rotation=rotation, seed=3)(model).modified
    got = run(model, feeds)
    for name in expected:
        _close(got[name], expected[name], name)
    q = rotation_matrix(rotation, table.shape[1], 3)
    np.testing.assert_allclose(const_f64(sites.find_residual_stream(model).embedding_weight), table @ q, atol=1e-6)

    before = weights_of(model)  # contract: a second run is a no-op
    assert not RotateResidualPass(rotation=rotation, seed=3)(model).modified
    after = weights_of(model)
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)


def test_rotate_residual_flattens_the_stream(tiny_export):
    model = _prepared(tiny_export, "llama")
    stream = sites.find_residual_stream(model)
    table = const_f64(stream.embedding_weight).copy()
    table[:, 5] += 3.0  # an outlier channel in every token
    from qexport.passes._ir import set_const_input

    set_const_input(model.graph, stream.embedding, 0, table)
    RotateResidualPass(rotation=Rotation.RANDOM_HADAMARD)(model)
    rotated = const_f64(sites.find_residual_stream(model).embedding_weight)
    peak = lambda t: np.mean(np.abs(t).max(axis=1) / np.linalg.norm(t, axis=1))  # noqa: E731
    assert peak(rotated) < 0.6 * peak(table)


def test_rotate_residual_refuses_tied_embeddings(tiny_export):
    model = load(tiny_export("llama"))
    before = weights_of(model)
    with pytest.raises(QexportError, match="untie-embeddings"):
        RotateResidualPass()(model)
    assert all(np.array_equal(v, weights_of(model)[k]) for k, v in before.items())


def test_rotate_residual_refuses_unfolded_gamma(tiny_export):
    model = load(tiny_export("qwen2"))
    give_norms_weights(model)
    with pytest.raises(QexportError, match="fold-norm"):
        RotateResidualPass()(model)


@pytest.mark.parametrize(("family", "reason"), [("gemma3", "post-norms"), ("opt", "LayerNorm")])
def test_rotate_residual_refuses_unsupported_streams(tiny_export, family, reason):
    model = _prepared(tiny_export, family)
    before = weights_of(model)
    with pytest.raises(QexportError, match=reason):
        RotateResidualPass()(model)
    after = weights_of(model)
    assert all(np.array_equal(v, after[k]) for k, v in before.items())
    assert Meta.ROTATE_RESIDUAL not in model.metadata_props


def test_rotate_heads_is_exact(tiny_export, family):
    model = load(tiny_export(family))
    give_norms_weights(model)
    expected_first, expected_next = prefill_decode(model)

    assert RotateHeadsPass(rotation=Rotation.RANDOM_HADAMARD, seed=1)(model).modified
    first, nxt = prefill_decode(model)
    _close(first["logits"], expected_first["logits"], "prefill logits")
    _close(nxt["logits"], expected_next["logits"], "decode logits with the rotated cache")
    head_dim = expected_first["present.0.value"].shape[-1]
    r = rotation_matrix(Rotation.RANDOM_HADAMARD, head_dim, 1)
    for name in expected_first:
        if name.startswith("present."):  # keys unchanged; values rotated per KV head
            want = expected_first[name] @ r if name.endswith(".value") else expected_first[name]
            _close(first[name], want, name)

    before = weights_of(model)
    assert not RotateHeadsPass(rotation=Rotation.RANDOM_HADAMARD, seed=1)(model).modified
    assert all(np.array_equal(v, weights_of(model)[k]) for k, v in before.items())


def test_rotate_heads_selects_sites_by_glob(tiny_export):
    model = load(tiny_export("llama"))
    v_weights = [const_f64(s.v.weight).copy() for s in sites.find_v_o_sites(model.graph)]
    assert RotateHeadsPass(sites=("layers.1.*",))(model).modified
    after = [const_f64(s.v.weight) for s in sites.find_v_o_sites(model.graph)]
    np.testing.assert_array_equal(after[0], v_weights[0])
    assert np.abs(after[1] - v_weights[1]).max() > 1e-3


@pytest.mark.parametrize("max_dense", [256, 32])  # one MatMul with H_128, or H_16 ⊗ H_8 via Reshape
def test_online_hadamard_is_exact(tiny_export, family, max_dense):
    model = load(tiny_export(family))
    give_norms_weights(model)
    feeds = make_feeds(model)
    expected = run(model, feeds)
    count = len(sites.find_up_down_sites(model.graph))
    nodes = len(list(model.graph))

    assert OnlineHadamardPass(max_dense=max_dense)(model).modified
    got = run(model, feeds)
    for name in expected:
        _close(got[name], expected[name], name)
    assert len(list(model.graph)) == nodes + count * (1 if max_dense >= 128 else 5)
    downs = [s.down.node for s in sites.find_up_down_sites(model.graph)]  # only the tagged dense H MatMuls
    assert all(Meta.ONLINE_HADAMARD in node.metadata_props for node in downs)
    assert not OnlineHadamardPass(max_dense=max_dense)(model).modified  # contract: second run is a no-op
    assert len(list(model.graph)) == nodes + count * (1 if max_dense >= 128 else 5)


def _mlp_graph(intermediate: int) -> ir.Model:
    rng = np.random.default_rng(0)
    x = ir.val("x", ir.DataType.FLOAT, [2, 8])
    w1 = ir.val("w1", const_value=ir.tensor(rng.standard_normal((8, intermediate)).astype(np.float32)))
    w2 = ir.val("w2", const_value=ir.tensor(rng.standard_normal((intermediate, 8)).astype(np.float32)))
    up = ir.node("MatMul", [x, w1], name="up")
    relu = ir.node("Relu", [up.outputs[0]], name="act")
    down = ir.node("MatMul", [relu.outputs[0], w2], name="down")
    down.outputs[0].name = "y"
    graph = ir.Graph([x], [down.outputs[0]], nodes=[up, relu, down], initializers=[w1, w2], opset_imports={"": 21})
    return ir.Model(graph, ir_version=10)


def test_online_hadamard_unknown_size_is_refused_before_any_change():
    model = _mlp_graph(44)
    with pytest.raises(QexportError, match=r"size 44\b"):
        OnlineHadamardPass()(model)
    assert [n.op_type for n in model.graph] == ["MatMul", "Relu", "MatMul"]


def test_online_hadamard_kronecker_size(tmp_path):
    model = _mlp_graph(1536)  # SmolLM2's intermediate size: 12 x 128
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    expected = run(model, {"x": x})["y"]
    assert OnlineHadamardPass()(model).modified
    assert [n.op_type for n in model.graph][2:7] == ["Shape", "Reshape", "MatMul", "MatMul", "Reshape"]
    _close(run(model, {"x": x})["y"], expected, "y")


def test_quarot_composition_is_exact(tiny_export):
    model = load(tiny_export("llama"))
    give_norms_weights(model)
    expected_first, expected_next = prefill_decode(model)
    for p in (UntieEmbeddingsPass(), FoldNormPass(), RotateResidualPass(seed=7), RotateHeadsPass(),
              OnlineHadamardPass()):
        assert p(model).modified, type(p).__name__
    first, nxt = prefill_decode(model)
    _close(first["logits"], expected_first["logits"], "prefill logits")
    _close(nxt["logits"], expected_next["logits"], "decode logits")
    for p in (RotateResidualPass(seed=7), RotateHeadsPass(), OnlineHadamardPass()):
        assert not p(model).modified, type(p).__name__
