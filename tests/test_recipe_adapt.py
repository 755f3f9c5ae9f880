"""A preset by name adapts to the exported graph (issue 14): LayerNorm to RMSNorm before R1 on OPT, R1 with its
post-norms rotated online on Gemma3 (or, for an R1 without Hadamard structure, no R1 and SmoothQuant at the norm
sites in its place when activations are quantized); every change recorded with its sites and reason; a recipe file
is never adapted."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from pass_testing import load
from qexport.recipes import schema as rc
from qexport.recipes.adapt import Action, adapt_recipe, is_preset_name, stream_needs
from qexport.passes.transforms.rotate_residual import PostNorm
from qexport.recipes.preflight import check_recipe_applies

WITH_R1 = [name for name in rc.preset_names() if "rotate-residual" in [e.name for e in rc.load_recipe(name).passes]]
POST_NORMS = ("layers.0.attn.post_norm", "layers.0.mlp.post_norm", "layers.1.attn.post_norm", "layers.1.mlp.post_norm")
NORM_SITES = ("layers.0.attn_norm", "layers.0.mlp_norm", "layers.1.attn_norm", "layers.1.mlp_norm")


def _names(recipe: rc.Recipe) -> list[str]:
    return [e.name for e in recipe.passes]


def test_the_presets_with_r1_include_every_quantization_preset():
    assert {"rotate", "w8a8-dynamic", "w8a8-dynamic-qdq", "w8a8-static", "w8a8-static-ort", "w4a8", "w4a8-ort"} <= set(WITH_R1)


@pytest.mark.parametrize("preset", WITH_R1)
def test_each_family_gets_what_its_graph_needs_and_the_result_applies(tiny_export, family, preset):
    model = load(tiny_export(family))
    written = rc.load_recipe(preset)
    adapted, changes = adapt_recipe(written, model)
    names, before = _names(adapted), _names(written)
    if family in ("llama", "qwen2") or (family == "opt" and "layernorm-to-rms" in before):
        assert adapted is written and changes == ()
    elif family == "opt":
        assert [(c.pass_name, c.action) for c in changes] == [("layernorm-to-rms", Action.INSERTED)]
        assert changes[0].sites == (*NORM_SITES, "final_norm")  # every residual LayerNorm
        fold = before.index("fold-norm")
        assert names == before[:fold + 1] + ["layernorm-to-rms"] + before[fold + 1:]
    else:  # gemma3: R1 kept, with its post-norms rotated online; nothing else changes
        assert [(c.pass_name, c.action) for c in changes] == [("rotate-residual", Action.CHANGED)]
        assert changes[0].sites == POST_NORMS and "post_norm: online" in changes[0].reason
        assert names == before
        for entry, was in zip(adapted.passes, written.passes):
            settings = dict(entry.settings)
            if entry.name == "rotate-residual":
                assert settings.pop("post_norm") is PostNorm.ONLINE and "post_norm" not in dict(was.settings)
            assert settings == dict(was.settings)
    assert all(c.sites and c.reason for c in changes)
    check_recipe_applies(model, adapted)  # every structural pass of the adapted preset finds its sites
    again, more = adapt_recipe(adapted, model)
    assert again is adapted and more == ()  # adapting an adapted recipe changes nothing


def test_an_r1_without_hadamard_structure_is_removed_on_post_norms(tiny_export):
    """An orthogonal R1 would cost a dense hidden x hidden MatMul per post-norm online: it is removed, and norm
    smoothing goes in its place only where activations are quantized and the norm sites are not smoothed yet."""
    model = load(tiny_export("gemma3"))
    prefix = [{"pass": "untie-embeddings"}, {"pass": "fold-norm"}, {"pass": "rotate-residual", "rotation": "orthogonal"}]
    weight_only = rc.Recipe.from_dict({"name": "w8", "passes": prefix + [{"pass": "quantize", "activations": "none"}]})
    _, changes = adapt_recipe(weight_only, model)
    assert [(c.pass_name, c.action) for c in changes] == [("rotate-residual", Action.REMOVED)]
    assert changes[0].sites == POST_NORMS and "post-norms" in changes[0].reason
    smoothed = rc.Recipe.from_dict({"name": "sq", "passes": [{"pass": "smooth", "sites": ["layers.*_norm"]}] + prefix
                                    + [{"pass": "quantize", "activations": "per_tensor"}]})
    adapted, changes = adapt_recipe(smoothed, model)
    assert [c.pass_name for c in changes] == ["rotate-residual"] and _names(adapted).count("smooth") == 1
    default = rc.Recipe.from_dict({"name": "q", "passes": prefix + [{"pass": "quantize"}]})  # per_token by default
    adapted, changes = adapt_recipe(default, model)
    assert [c.pass_name for c in changes] == ["rotate-residual", "smooth"]
    assert changes[1].sites == NORM_SITES and _names(adapted) == ["untie-embeddings", "fold-norm", "smooth", "quantize"]
    check_recipe_applies(model, adapted)


def test_a_recipe_with_online_post_norms_already_is_left_alone(tiny_export):
    model = load(tiny_export("gemma3"))
    online = rc.Recipe.from_dict({"name": "r1", "passes": [
        {"pass": "untie-embeddings"}, {"pass": "fold-norm"}, {"pass": "rotate-residual", "post_norm": "online"}]})
    assert adapt_recipe(online, model) == (online, ())


def test_recipes_without_r1_and_graphs_without_a_residual_stream_are_left_alone(tiny_export):
    smoothquant = rc.load_recipe("smoothquant")
    assert adapt_recipe(smoothquant, load(tiny_export("gemma3"))) == (smoothquant, ())
    value = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2]))
    node = ir.node("Identity", [value], name="id")
    bare = ir.Model(ir.Graph([value], node.outputs, nodes=[node], opset_imports={"": 21}), ir_version=10)
    assert stream_needs(bare) is None  # the preflight check names what is missing
    rotate = rc.load_recipe("rotate")
    assert adapt_recipe(rotate, bare) == (rotate, ())


def test_only_a_preset_by_name_adapts(tmp_path, monkeypatch):
    assert is_preset_name("w8a8-dynamic") and not is_preset_name("no-such-preset")
    written = tmp_path / "w8a8-dynamic.yaml"
    written.write_text(rc.load_recipe("w8a8-dynamic").to_yaml())
    assert not is_preset_name(written) and not is_preset_name(str(written))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rotate").write_text(rc.load_recipe("rotate").to_yaml())
    assert not is_preset_name("rotate")  # load_recipe reads this file, not the preset: it runs as written
