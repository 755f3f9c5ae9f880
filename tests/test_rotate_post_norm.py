"""R1 on a post-norm (sandwich-norm) stream, Gemma3: ``post_norm: online`` rotates the residual exactly by applying
each post-norm's gamma times Q online, leaves the branch writers alone, and changes nothing on other families."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest

from pass_testing import apply_and_check_decode, give_norms_weights, load, padded_feeds, prefill_decode, run, weights_of
from qexport.errors import QexportError, RecipeError
from qexport.passes.discovery import sites
from qexport.passes._ir import const_f64
from qexport.passes.metadata import Meta
from qexport.passes.transforms.fold_norm import FoldNormPass
from qexport.passes.transforms.hadamard import Rotation, hadamard_matrix
from qexport.passes.transforms.rotate_residual import PostNorm, RotateResidualPass
from qexport.passes.transforms.untie_embeddings import UntieEmbeddingsPass

RTOL, ATOL = 1e-4, 1e-5  # FP32 logits after float64 folding: one rounding per weight, a few ulps through the network
HIDDEN = 64  # tests/tiny_models.py
SETTINGS = [  # the full Q (one dense 64 x 64 MatMul, or H_8 ⊗ H_8 as two), and I ⊗ H_16
    dict(rotation=Rotation.RANDOM_HADAMARD, seed=3),
    dict(rotation=Rotation.RANDOM_HADAMARD, seed=3, max_dense=16),
    dict(rotation=Rotation.HADAMARD, block=16),
    dict(rotation=Rotation.RANDOM_HADAMARD, seed=5, block=16),
]


def _prepared(tiny_export, family: str = "gemma3") -> ir.Model:
    """A tiny export with random norm weights (post-norm gammas far from 1), untied and norm-folded."""
    model = load(tiny_export(family))
    give_norms_weights(model)
    UntieEmbeddingsPass()(model)
    FoldNormPass()(model)
    return model


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{k}={getattr(v, 'value', v)}" for k, v in s.items()))
def test_online_post_norm_rotation_is_exact(tiny_export, settings):
    model = _prepared(tiny_export)
    expected_first, expected_next = prefill_decode(model)
    rotate = RotateResidualPass(post_norm=PostNorm.ONLINE, **settings)
    result = apply_and_check_decode(model, rotate, padded_feeds(model), rtol=RTOL, atol=ATOL)  # left-padded, 3 decodes
    assert result.modified
    first, nxt = prefill_decode(model)
    for got, want, what in ((first, expected_first, "prefill"), (nxt, expected_next, "decode")):
        np.testing.assert_allclose(got["logits"], want["logits"], rtol=RTOL, atol=ATOL, err_msg=what)

    stream = sites.find_residual_stream(model)  # still found through the inserted transforms
    assert len(stream.blocks) == 4 and all(b.post_norm is not None for b in stream.blocks)
    before, nodes = weights_of(model), len(list(model.graph))  # contract: a second run is a no-op
    assert not RotateResidualPass(post_norm=PostNorm.ONLINE, **settings)(model).modified
    after = weights_of(model)
    assert len(list(model.graph)) == nodes and before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("block", [0, 16])
def test_the_residual_values_become_x_q_and_the_writers_stay(tiny_export, block):
    """Every residual add's output is the unrotated one times Q (Q = H or I ⊗ H_16, built here), so a pass that
    rotated nothing, or by another Q, fails; o_proj/down_proj keep their weights, the post-norms carry Q."""
    model = _prepared(tiny_export)
    stream = sites.find_residual_stream(model)
    for b in stream.blocks:
        model.graph.outputs.append(b.add.outputs[0])
    writers = [const_f64(b.writer.weight).copy() for b in stream.blocks]
    feeds = padded_feeds(model)
    expected = run(model, feeds)

    RotateResidualPass(rotation=Rotation.HADAMARD, post_norm=PostNorm.ONLINE, block=block)(model)
    got = run(model, feeds)
    q = np.kron(np.eye(HIDDEN // block), hadamard_matrix(block)) if block else hadamard_matrix(HIDDEN)
    for b in stream.blocks:
        name = b.add.outputs[0].name
        x = expected[name].astype(np.float64)
        scale = np.abs(x).max()
        np.testing.assert_allclose(got[name], x @ q, rtol=0, atol=1e-5 * scale, err_msg=name)
        assert np.abs(got[name] - x).max() > 0.1 * scale  # Q is far from the identity
    np.testing.assert_allclose(got["logits"], expected["logits"], rtol=RTOL, atol=ATOL)
    rotated = sites.find_residual_stream(model)
    assert all(np.array_equal(const_f64(b.writer.weight), w) for b, w in zip(rotated.blocks, writers))
    online = collections.Counter(n.op_type for n in model.graph if Meta.ONLINE_HADAMARD in n.metadata_props)
    assert online["MatMul"] == len(stream.blocks)  # one MatMul per post-norm (64 <= max_dense, or one block MatMul)
    assert model.metadata_props[Meta.ROTATE_RESIDUAL] == "hadamard:0" + (f":block={block}" if block else "") + ":post_norm=online"


def test_random_signs_fold_into_the_post_norm_gamma(tiny_export):
    model = _prepared(tiny_export)
    gammas = [const_f64(b.post_norm.gamma).copy() for b in sites.find_residual_stream(model).blocks]
    RotateResidualPass(rotation=Rotation.RANDOM_HADAMARD, seed=1, post_norm=PostNorm.ONLINE, block=16)(model)
    signs = np.random.default_rng(1).choice([-1.0, 1.0], size=HIDDEN)
    for b, gamma in zip(sites.find_residual_stream(model).blocks, gammas):
        np.testing.assert_allclose(const_f64(b.post_norm.gamma), gamma * signs, rtol=1e-6)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_other_families_are_unaffected_by_the_setting(tiny_export, family):
    plain, online = _prepared(tiny_export, family), _prepared(tiny_export, family)
    RotateResidualPass(seed=2)(plain)
    RotateResidualPass(seed=2, post_norm=PostNorm.ONLINE)(online)
    a, b = weights_of(plain), weights_of(online)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert [n.op_type for n in plain.graph] == [n.op_type for n in online.graph]


@pytest.mark.parametrize(("settings", "error", "match"), [
    (dict(), QexportError, "post_norm: online"),
    (dict(post_norm=PostNorm.ONLINE, rotation=Rotation.ORTHOGONAL), QexportError, "hadamard"),
    (dict(post_norm=PostNorm.ONLINE, block=128), RecipeError, "does not divide the hidden size 64"),
])
def test_what_cannot_apply_fails_before_anything_changes(tiny_export, settings, error, match):
    model = _prepared(tiny_export)
    before = weights_of(model)
    with pytest.raises(error, match=match):
        RotateResidualPass(**settings)(model)
    after = weights_of(model)
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    assert Meta.ROTATE_RESIDUAL not in model.metadata_props


@pytest.mark.parametrize(("settings", "match"), [
    (dict(block=3), "power of two"), (dict(block=16, rotation=Rotation.ORTHOGONAL), "orthogonal"),
    (dict(post_norm="folded"), "post_norm must be one of"),
])
def test_bad_settings_name_the_setting(settings, match):
    with pytest.raises(RecipeError, match=match):
        RotateResidualPass(**settings)
