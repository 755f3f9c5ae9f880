"""Site discovery on the exported graphs of every tiny family."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
import pytest

from qexport.errors import PatternNotFoundError
from qexport.passes.discovery import sites
from qexport.passes.discovery.names import NameFilter
from tiny_models import tiny_config

ALL_KINDS = ("attn_norm", "mlp_norm", "v_o", "up_down", "final_norm")
LINEARS_PER_NORM = {"llama": (3, 2), "qwen2": (3, 2), "gemma3": (3, 2), "opt": (3, 1)}
RESIDUAL_NORMS = {"llama": 5, "qwen2": 5, "gemma3": 9, "opt": 5}  # 2 per layer (Gemma3: 4) + final
TIED = {"llama": True, "qwen2": False, "gemma3": True, "opt": True}


def load(folder) -> ir.Model:
    return ir.load(folder / "model.onnx")


def test_finds_every_site_with_the_expected_shape(tiny_export, family):
    model = load(tiny_export(family))
    config = tiny_config(family)
    found = sites.find_sites(model)
    found.require(config.num_hidden_layers, kinds=ALL_KINDS)
    names = [s.name for s in found.norm_sites]
    assert names == ["layers.0.attn_norm", "layers.0.mlp_norm", "layers.1.attn_norm", "layers.1.mlp_norm", "final_norm"]
    attn, mlp = LINEARS_PER_NORM[family]
    assert [len(s.linears) for s in found.norm_sites] == [attn, mlp, attn, mlp, 1]
    assert [s.name for s in found.v_o] == ["layers.0.v_o", "layers.1.v_o"]
    assert [s.name for s in found.up_down] == ["layers.0.up_down", "layers.1.up_down"]
    kv_heads = getattr(config, "num_key_value_heads", config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for site in found.v_o:
        assert (site.num_heads, site.num_kv_heads, site.head_dim) == (config.num_attention_heads, kv_heads, head_dim)
        assert site.v.out_features == kv_heads * head_dim and site.o.in_features == config.num_attention_heads * head_dim
        # the v linear is the third consumer of the attention norm (q, k, v in graph order)
        norm_site = next(s for s in found.norm_sites if s.name == f"layers.{site.layer}.attn_norm")
        assert site.v.node is norm_site.linears[2].node
    for site in found.up_down:
        assert (site.gate is None) == (family == "opt")
        assert site.up.out_features == site.down.in_features == (config.ffn_dim if family == "opt" else config.intermediate_size)
    assert found.select(NameFilter(("layers.*.up_down",))) == list(found.up_down)


def test_residual_stream(tiny_export, family):
    model = load(tiny_export(family))
    stream = sites.find_residual_stream(model)
    assert len(stream.blocks) == 4
    assert len(stream.norms) == RESIDUAL_NORMS[family]
    assert stream.tied is TIED[family]
    assert stream.lm_head.output.name == "logits"
    assert (stream.embed_scale is not None) == (family == "gemma3")
    assert (stream.position_embedding is not None) == (family == "opt")
    for block in stream.blocks:
        assert (block.post_norm is not None) == (family == "gemma3")
    writers = {s.o.node for s in sites.find_v_o_sites(model.graph)} | {s.down.node for s in sites.find_up_down_sites(model.graph)}
    assert {w.node for w in stream.writers} == writers


def test_linear_weight_layouts(tiny_export):
    model = load(tiny_export("opt"))
    found = sites.find_sites(model)
    fc1 = found.up_down[0].up
    assert fc1.node.op_type == "Gemm" and fc1.layout == "out_in"
    assert fc1.weight_in_out().shape == (64, 128)
    head = found.norm_sites[-1].linears[0]
    assert head.transpose is not None and head.weight_in_out().shape == (64, 272)
    np.testing.assert_array_equal(head.weight_in_out(), head.weight.const_value.numpy().T.astype(np.float64))


def test_matching_does_not_mutate(tiny_export):
    model = load(tiny_export("llama"))
    before = ir.to_proto(model).SerializeToString()
    sites.find_sites(model)
    sites.find_residual_stream(model)
    assert ir.to_proto(model).SerializeToString() == before


def test_missing_site_is_named(tiny_export, caplog):
    model = load(tiny_export("llama"))
    v = sites.find_v_o_sites(model.graph)[1].v
    # a second reader of v's output makes smoothing v -> o unsafe, so the site must be rejected
    probe = ir.node("Identity", [v.output], num_outputs=1)
    model.graph.append(probe)
    model.graph.outputs.append(probe.outputs[0])
    probe.outputs[0].name = "probe"
    with caplog.at_level(logging.DEBUG, logger="qexport.passes.discovery.sites"):
        found = sites.find_sites(model)
    assert [s.name for s in found.v_o] == ["layers.0.v_o"]
    assert "v output has 2 consumers" in caplog.text
    with pytest.raises(PatternNotFoundError, match=r"layers\.1\.v_o"):
        found.require(2)


@pytest.mark.slow
def test_real_default_model_sites(default_export):
    """SmolLM2-135M: 30 layers, 9 heads / 3 KV heads of 64, tied embeddings (about a minute to export)."""
    model = load(default_export)
    found = sites.find_sites(model)
    found.require(30, kinds=ALL_KINDS)
    assert len(found.norm_sites) == 61 and len(found.v_o) == 30 and len(found.up_down) == 30
    assert [len(s.linears) for s in found.norm_sites] == [3, 2] * 30 + [1]
    assert {(s.num_heads, s.num_kv_heads, s.head_dim) for s in found.v_o} == {(9, 3, 64)}
    stream = sites.find_residual_stream(model)
    assert len(stream.blocks) == 60 and len(stream.norms) == 61 and stream.tied


def test_online_hadamard_nodes_do_not_rename_sites(tiny_export):
    """A Kronecker online Hadamard (Reshape, MatMul, MatMul, Reshape) before down_proj is not a head split."""
    from qexport.passes.transforms.online_hadamard import OnlineHadamardPass

    model = load(tiny_export("llama"))
    before = [s.name for s in sites.find_sites(model).all]
    OnlineHadamardPass(max_dense=16)(model)  # 128 = 16 x 8: the reshape-based form
    after = [s.name for s in sites.find_sites(model).all]
    assert after == [name for name in before if not name.endswith("up_down")]
