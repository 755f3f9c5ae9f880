"""A preset by name adapts to the exported graph (issue 14): LayerNorm to RMSNorm before R1 on OPT, no R1 on
Gemma3's post-norms (SmoothQuant at the norm sites in its place when activations are quantized); every change
recorded with its sites and reason; a recipe file is never adapted."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from pass_testing import load
from qexport.recipes import schema as rc
from qexport.recipes.adapt import Action, adapt_recipe, is_preset_name, stream_needs
from qexport.recipes.preflight import check_recipe_applies

WITH_R1 = [name for name in rc.preset_names() if "rotate-residual" in [e.name for e in rc.load_recipe(name).passes]]
POST_NORMS = ("layers.0.attn.post_norm", "layers.0.mlp.post_norm", "layers.1.attn.post_norm", "layers.1.mlp.post_norm")
NORM_SITES = ("layers.0.attn_norm", "layers.0.mlp_norm", "layers.1.attn_norm", "layers.1.mlp_norm")


def _names(recipe: rc.Recipe) -> list[str]:
    return [e.name for e in recipe.passes]


def _quantizes_activations(recipe: rc.Recipe) -> bool:
    return any(e.name == "quantize" for e in recipe.passes)  # every preset's quantize has int8 activations


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
    else:  # gemma3
        r1 = before.index("rotate-residual")
        assert changes[0].pass_name == "rotate-residual" and changes[0].action is Action.REMOVED
        assert changes[0].sites == POST_NORMS and "post-norms" in changes[0].reason
        if _quantizes_activations(written):
            lm_head = any(dict(e.settings).get("include_lm_head") for e in written.passes)
            assert [(c.pass_name, c.action) for c in changes[1:]] == [("smooth", Action.INSERTED)]
            assert changes[1].sites == NORM_SITES + (("final_norm",) if lm_head else ())
            smooth = adapted.passes[r1]
            assert smooth.name == "smooth" and dict(smooth.settings)["alpha"] == 0.5
            assert names == before[:r1] + ["smooth"] + before[r1 + 1:]
        else:  # nothing is quantized: the rotations that apply, nothing in R1's place
            assert len(changes) == 1 and names == before[:r1] + before[r1 + 1:]
        assert {"rotate-heads", "online-hadamard"} <= set(names)
    assert all(c.sites and c.reason for c in changes)
    check_recipe_applies(model, adapted)  # every structural pass of the adapted preset finds its sites
    again, more = adapt_recipe(adapted, model)
    assert again is adapted and more == ()  # adapting an adapted recipe changes nothing


def test_norm_smoothing_is_inserted_only_where_activations_are_quantized_and_unsmoothed(tiny_export):
    model = load(tiny_export("gemma3"))
    prefix = [{"pass": "untie-embeddings"}, {"pass": "fold-norm"}, {"pass": "rotate-residual"}]
    weight_only = rc.Recipe.from_dict({"name": "w8", "passes": prefix + [{"pass": "quantize", "activations": "none"}]})
    _, changes = adapt_recipe(weight_only, model)
    assert [c.pass_name for c in changes] == ["rotate-residual"]  # smoothing would only make the weights harder
    smoothed = rc.Recipe.from_dict({"name": "sq", "passes": [{"pass": "smooth", "sites": ["layers.*_norm"]}] + prefix
                                    + [{"pass": "quantize", "activations": "per_tensor"}]})
    adapted, changes = adapt_recipe(smoothed, model)
    assert [c.pass_name for c in changes] == ["rotate-residual"] and _names(adapted).count("smooth") == 1
    default = rc.Recipe.from_dict({"name": "q", "passes": prefix + [{"pass": "quantize"}]})  # per_token by default
    assert [c.pass_name for c in adapt_recipe(default, model)[1]] == ["rotate-residual", "smooth"]


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
