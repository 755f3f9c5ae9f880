"""FoldNormPass and UntieEmbeddingsPass keep every output of every tiny family (FP32, tight tolerances)."""

from __future__ import annotations

import numpy as np
import pytest

from pass_testing import assert_outputs_close, give_norms_weights, load, make_feeds, run
from qexport.passes.discovery import sites
from qexport.passes._ir import const_f64
from qexport.passes.transforms.fold_norm import FoldNormPass
from qexport.passes.transforms.untie_embeddings import UntieEmbeddingsPass


@pytest.mark.parametrize("untie_first", [False, True])
def test_fold_norm_is_exact(tiny_export, family, untie_first):
    model = load(tiny_export(family))
    give_norms_weights(model)
    feeds = make_feeds(model)
    expected = run(model, feeds)
    embedding = const_f64(sites.find_residual_stream(model).embedding_weight).copy()
    if untie_first:
        UntieEmbeddingsPass()(model)
    post_norm_gammas = [const_f64(b.post_norm.gamma) for b in sites.find_residual_stream(model).blocks if b.post_norm]

    assert FoldNormPass()(model).modified
    assert_outputs_close(run(model, feeds), expected)  # logits and every present key/value

    found = sites.find_norm_sites(model.graph)
    assert len(found) == 5
    for site in found:
        assert np.all(const_f64(site.norm.gamma) == 1.0), site.name
        if site.norm.beta is not None:
            assert np.all(const_f64(site.norm.beta) == 0.0), site.name
    stream = sites.find_residual_stream(model)
    np.testing.assert_array_equal(const_f64(stream.embedding_weight), embedding)  # the tied table is not scaled
    assert not stream.tied
    for block, gamma in zip([b for b in stream.blocks if b.post_norm], post_norm_gammas):
        np.testing.assert_array_equal(const_f64(block.post_norm.gamma), gamma)  # Gemma3 post-norms stay

    # contract: a second run finds gamma = 1 and beta = 0 everywhere and reports no change
    assert not FoldNormPass()(model).modified


def test_fold_norm_selects_sites_by_glob(tiny_export):
    model = load(tiny_export("llama"))
    give_norms_weights(model)
    feeds = make_feeds(model)
    expected = run(model, feeds)
    assert FoldNormPass(sites=("layers.*.mlp_norm",))(model).modified
    assert_outputs_close(run(model, feeds), expected)
    gammas = {s.name: const_f64(s.norm.gamma) for s in sites.find_norm_sites(model.graph)}
    assert np.all(gammas["layers.0.mlp_norm"] == 1.0) and np.all(gammas["layers.1.mlp_norm"] == 1.0)
    assert not np.all(gammas["layers.0.attn_norm"] == 1.0) and not np.all(gammas["final_norm"] == 1.0)


def test_untie_embeddings(tiny_export, family):
    model = load(tiny_export(family))
    feeds = make_feeds(model)
    expected = run(model, feeds)
    tied = sites.find_residual_stream(model).tied
    result = UntieEmbeddingsPass()(model)
    assert result.modified is tied  # qwen2 has its own lm_head weight already
    stream = sites.find_residual_stream(model)
    assert not stream.tied
    assert stream.lm_head.transpose is None and stream.lm_head.layout == "in_out"
    assert stream.lm_head.weight.const_value.numpy().shape == (64, 272)
    assert not any(n.op_type == "Transpose" and n.inputs[0] is stream.embedding_weight for n in model.graph)
    np.testing.assert_array_equal(run(model, feeds)["logits"], expected["logits"])
    assert not UntieEmbeddingsPass()(model).modified  # contract: nothing left to untie
