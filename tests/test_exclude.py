"""``exclude`` on quantize and quantize-gptq: excluded linears stay float, the rest is quantized exactly as by a
``linears`` glob selecting the complement; a glob matching nothing is an error."""

from __future__ import annotations

import fnmatch

import numpy as np
import onnx_ir as ir
import pytest
import yaml

from pass_testing import load, make_feeds, run
from qexport.calibration.calibrator import Calibrator
from qexport.errors import RecipeError
from qexport.passes.quantize.gptq import GptqPass
from qexport.passes.quantize.insert_qdq import QuantizePass
from qexport.passes.discovery.linear_select import linear_names
from qexport.passes.metadata import Meta
from qexport.recipes.schema import Recipe

CALIBRATOR = Calibrator(tuple(np.arange(3 + 60 * i, 67 + 60 * i, dtype=np.int64) for i in range(2)), threads=1)
# exclude -> the one ``linears`` glob selecting exactly the other (non-lm_head) linears of the tiny 2-layer Llama
COMPLEMENTS = [("layers.*.attn.k", "layers.*[!k]"), ("layers.0.*", "layers.1.*")]
ROLES = [f"layers.{i}.{r}" for i in range(2) for r in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")]


def _by_role(model: ir.Model) -> dict[str, ir.Node]:
    return {role: node for node, role in linear_names(model).items()}


def _float_weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {role: node.inputs[1].const_value.numpy().copy() for role, node in _by_role(model).items() if role != "lm_head"}


def _assert_float(model: ir.Model, roles, weights: dict[str, np.ndarray]) -> None:
    """Each of ``roles`` still multiplies its original float initializer (bit-exact) by an unquantized input."""
    nodes = _by_role(model)
    for role in roles:
        node = nodes[role]
        weight, x = node.inputs[1], node.inputs[0].producer()
        assert weight.producer() is None and weight.const_value is not None, role
        assert np.array_equal(weight.const_value.numpy(), weights[role]), role
        assert x is None or Meta.QUANT not in x.metadata_props, f"{role} reads a quantized activation"


def _assert_quantized(model: ir.Model, roles, activations: bool = True) -> None:
    nodes = _by_role(model)
    for role in roles:
        node = nodes[role]
        assert node.inputs[1].producer().metadata_props.get(Meta.QUANT) == "weight", role
        x = node.inputs[0].producer()
        assert (x is not None and x.metadata_props.get(Meta.QUANT) in ("per_token", "per_tensor")) == activations, role


def _same_graph(a: ir.Model, b: ir.Model) -> bool:
    return ir.to_proto(a).SerializeToString() == ir.to_proto(b).SerializeToString()


@pytest.mark.parametrize("activations", ["per_token", "per_tensor"])
@pytest.mark.parametrize("exclude,complement", COMPLEMENTS)
def test_quantize_exclude_equals_the_complement_glob(tiny_export, exclude, complement, activations):
    """Excluded linears keep their float weights and inputs; with k excluded, q and v still share one activation
    quantizer while k reads the float tensor that quantizer reads. The graph is the one the complement glob gives."""
    settings = dict(activations=activations, calibrator=CALIBRATOR if activations == "per_tensor" else None)
    model, reference = load(tiny_export("llama")), load(tiny_export("llama"))
    weights = _float_weights(model)
    assert QuantizePass(**settings, exclude=(exclude,))(model).modified
    assert QuantizePass(**settings, linears=(complement,))(reference).modified
    excluded = [r for r in ROLES if fnmatch.fnmatchcase(r, exclude)]
    assert 0 < len(excluded) < len(ROLES)
    _assert_float(model, excluded, weights)
    _assert_quantized(model, [r for r in ROLES if r not in excluded])
    assert _same_graph(model, reference)
    feeds = make_feeds(model)
    got, expected = run(model, feeds)["logits"], run(reference, feeds)["logits"]
    assert np.array_equal(got, expected)
    if exclude == "layers.*.attn.k":
        nodes = _by_role(model)
        for i in range(2):
            q, k, v = (nodes[f"layers.{i}.attn.{r}"] for r in "qkv")
            assert q.inputs[0] is v.inputs[0]  # one shared activation quantizer
            quantize = q.inputs[0].producer().inputs[0].producer()  # DequantizeLinear(QuantizeLinear(x, s))
            assert quantize.op_type == "QuantizeLinear" and k.inputs[0] is quantize.inputs[0]  # k reads that x
    assert not QuantizePass(**settings, exclude=(exclude,))(model).modified  # a rerun finds nothing, raises nothing


def test_gptq_exclude_leaves_the_weight_untouched_and_equals_the_complement_glob(tiny_export):
    model, reference = load(tiny_export("llama")), load(tiny_export("llama"))
    weights = _float_weights(model)
    assert GptqPass(calibrator=CALIBRATOR, exclude=("layers.*.attn.k",))(model).modified
    assert GptqPass(calibrator=CALIBRATOR, linears=("layers.*[!k]",))(reference).modified
    _assert_float(model, ["layers.0.attn.k", "layers.1.attn.k"], weights)
    _assert_quantized(model, [r for r in ROLES if not r.endswith("attn.k")], activations=False)
    assert _same_graph(model, reference)


def test_gptq_then_quantize_with_the_same_exclude_leaves_the_linears_float(tiny_export):
    """After GPTQ dequantizes q/v (k excluded) the role names can no longer be matched structurally: they were
    recorded on the nodes, so ``quantize`` with the same ``exclude`` finds the same linears."""
    model = load(tiny_export("llama"))
    weights = _float_weights(model)
    before = {node.name: role for node, role in linear_names(model).items()}
    exclude = ("layers.0.mlp.down", "layers.1.attn.k")
    assert GptqPass(calibrator=CALIBRATOR, exclude=exclude)(model).modified
    assert {node.name: role for node, role in linear_names(model).items()} == before
    assert QuantizePass(activations="per_tensor", calibrator=CALIBRATOR, exclude=exclude)(model).modified
    excluded = ["layers.0.mlp.down", "layers.1.attn.k"]
    _assert_float(model, excluded, weights)
    _assert_quantized(model, [r for r in ROLES if r not in excluded])
    assert not QuantizePass(exclude=exclude)(model).modified
    # without the exclude, quantize would round the two float linears to nearest: they are still selectable
    assert QuantizePass(exclude=("layers.0.mlp.down",))(model).modified
    _assert_float(model, ["layers.0.mlp.down"], weights)
    _assert_quantized(model, ["layers.1.attn.k"])


@pytest.mark.parametrize("make", [lambda **kw: QuantizePass(**kw), lambda **kw: GptqPass(calibrator=CALIBRATOR, **kw)])
def test_an_exclude_glob_that_matches_nothing_is_an_error(tiny_export, make):
    model = load(tiny_export("llama"))
    with pytest.raises(RecipeError, match=r"exclude glob 'layers\.0\.mlp\.dwn' matches none .*layers\.0\.attn\.q"):
        make(exclude=("layers.0.mlp.down", "layers.0.mlp.dwn"))(model)
    with pytest.raises(RecipeError, match="include_lm_head"):
        make(exclude=("lm_head",))(model)
    with pytest.raises(RecipeError, match=r"'layers\.0\.\*' matches none of the 7 linears selected by linears=\['layers\.1\.\*'\]"):
        make(linears=("layers.1.*",), exclude=("layers.0.*",))(model)
    assert not any(Meta.QUANT in node.metadata_props for node in model.graph)  # nothing was quantized


def test_exclude_lm_head_when_included_and_everything_excluded(tiny_export):
    model = load(tiny_export("qwen2"))
    weights = _float_weights(model)
    assert QuantizePass(include_lm_head=True, exclude=("lm_head",))(model).modified
    head = model.graph.outputs[0].producer()
    assert head.inputs[1].producer() is None  # lm_head keeps its float weight
    _assert_quantized(model, ROLES)
    untouched = load(tiny_export("qwen2"))
    assert not QuantizePass(exclude=("layers.*",))(untouched).modified
    _assert_float(untouched, ROLES, weights)


def test_recipe_exclude_maps_onto_both_passes():
    recipe = Recipe.from_dict(yaml.safe_load("""
        name: x
        passes:
          - {pass: quantize-gptq, exclude: [layers.0.mlp.down, "layers.29.*"]}
          - {pass: quantize, exclude: [layers.0.mlp.down, "layers.29.*"]}
    """))
    built = recipe.build({"quantize-gptq": {"calibrator": CALIBRATOR}})
    assert [p.exclude for p in built] == [("layers.0.mlp.down", "layers.29.*")] * 2
    assert [p.linears for p in built] == [("*",)] * 2
    assert Recipe.from_dict(yaml.safe_load(recipe.to_yaml())) == recipe


@pytest.mark.parametrize("key", ["exclude", "linears"])
@pytest.mark.parametrize("name", ["quantize", "quantize-gptq"])
def test_a_comma_separated_string_is_an_error_showing_the_list(name, key):
    """A string is never split at commas (nor taken as one glob): the error names the key and shows the list."""
    with pytest.raises(RecipeError, match=rf"passes\[0\]\.{key}: 'layers\.0\.mlp\.down,layers\.29\.\*' is one string; "
                                          rf"globs are not separated by commas but given as a list: "
                                          rf'{key}: \["layers\.0\.mlp\.down", "layers\.29\.\*"\]'):
        Recipe.from_dict({"name": "x", "passes": [{"pass": name, key: "layers.0.mlp.down,layers.29.*"}]})
    with pytest.raises(RecipeError, match=rf'passes\[0\]\.{key}: \'layers\.0\.\*\' is a string; .*{key}: \["layers\.0\.\*"\]'):
        Recipe.from_dict({"name": "x", "passes": [{"pass": name, key: "layers.0.*"}]})
    make = QuantizePass if name == "quantize" else GptqPass
    with pytest.raises(RecipeError, match=rf"{name} {key}: 'a, b' is one string"):  # from Python too
        make(**{key: "a, b"})
