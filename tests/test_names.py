"""One way to select by name: :class:`NameFilter` on its own, every glob setting of every pass a list of globs
(a string, comma-separated or not, is an error showing the list), and one glob selecting the same linears and
sites through every pass that takes it."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from pass_testing import load
from qexport.calibration.calibrator import Calibrator
from qexport.calibration.stats import collect_stats
from qexport.errors import RecipeError
from qexport.passes.discovery import sites as site_matching
from qexport.passes.discovery.linear_select import linear_names, selected_linears
from qexport.passes.discovery.names import NameFilter
from qexport.passes.quantize.bias_correction import BiasCorrectPass, quantized_linears
from qexport.passes.quantize.gptq import GptqPass
from qexport.passes.quantize.insert_qdq import QuantizePass
from qexport.passes.transforms.affine import AffinePass
from qexport.passes.transforms.smooth import SmoothPass
from qexport.recipes.registry import PASSES, pass_class, settable_fields
from qexport.recipes.schema import Recipe

WINDOWS = tuple(np.arange(3 + 60 * i, 67 + 60 * i, dtype=np.int64) for i in range(2))
CALIBRATOR = Calibrator(WINDOWS, threads=1)
GLOB_SETTINGS = {"fold-norm": {"sites"}, "smooth": {"sites"}, "rotate-heads": {"sites"}, "online-hadamard": {"sites"},
                 "affine": {"sites"}, "aqas": {"sites"}, "quantize": {"linears", "exclude"},
                 "quantize-gptq": {"linears", "exclude"}, "bias-correct": {"linears"}}


def test_include_and_exclude_globs():
    names = NameFilter(("layers.1.*", "lm_head"), ("layers.1.mlp.*",))
    assert names.matches("layers.1.attn.q") and names.matches("lm_head")
    assert not names.matches("layers.1.mlp.down")  # included, then excluded
    assert not names.matches("layers.0.attn.q") and not names.matches("Layers.1.attn.q")  # case-sensitive
    assert names.matches("node_7", "layers.1.attn.o")  # a candidate matches by any of its names
    assert not names.matches("layers.1.attn.o", "layers.1.mlp.up")  # ... and is excluded by any of them
    assert NameFilter().matches("anything") and not NameFilter(()).matches("anything")  # no include glob: nothing


def test_lists_become_tuples_and_strings_are_rejected():
    names = NameFilter(["layers.*"], ["layers.0.*"])  # type: ignore[arg-type]
    assert names == NameFilter(("layers.*",), ("layers.0.*",)) and hash(names) == hash(NameFilter(("layers.*",), ("layers.0.*",)))
    with pytest.raises(RecipeError, match=r"exclude: 'a,b' is one string; .*exclude: \[\"a\", \"b\"\]"):
        NameFilter(exclude="a,b")  # type: ignore[arg-type]
    with pytest.raises(RecipeError, match=r"include: 'layers\.\*' is a string; .*include: \[\"layers\.\*\"\]"):
        NameFilter("layers.*")  # type: ignore[arg-type]
    with pytest.raises(RecipeError, match="expected a list of globs"):
        NameFilter((1,))  # type: ignore[arg-type]


def test_an_exclude_glob_matching_nothing_is_an_error_naming_it():
    names = NameFilter(("layers.*",), ("layers.0.*", "layers.9.*"))
    candidates = [["layers.0.attn.q", "node_1"], ["layers.1.attn.q", "node_2"]]
    with pytest.raises(RecipeError, match=r"exclude glob 'layers\.9\.\*' matches none of the 2 linears selected by "
                                          r"linears=\['layers\.\*'\]; role names look like: layers\.0\.attn\.q, "
                                          r"layers\.1\.attn\.q\. Fix the glob"):
        names.check_excludes(candidates, what="linears", key="linears", shown_as="role names")
    NameFilter(("layers.*",), ("layers.0.*", "node_2")).check_excludes(candidates)  # each matches something


@pytest.mark.parametrize("name", sorted(GLOB_SETTINGS))
def test_every_glob_setting_is_a_list_of_globs_and_a_string_is_an_error(name):
    fields = settable_fields(pass_class(name))
    assert {k for k in fields if k in ("sites", "linears", "exclude")} == GLOB_SETTINGS[name]
    for key in GLOB_SETTINGS[name]:
        assert fields[key] == tuple[str, ...], (name, key)
        with pytest.raises(RecipeError, match=rf"passes\[0\]\.{key}: 'layers\.0\.\*, layers\.1\.\*' is one string; "
                                              rf'.*{key}: \["layers\.0\.\*", "layers\.1\.\*"\]'):
            Recipe.from_dict({"name": "t", "passes": [{"pass": name, key: "layers.0.*, layers.1.*"}]})
        with pytest.raises(RecipeError, match=rf'passes\[0\]\.{key}: \'layers\.\*\' is a string; .*{key}: \["layers\.\*"\]'):
            Recipe.from_dict({"name": "t", "passes": [{"pass": name, key: "layers.*"}]})
        entry = Recipe.from_dict({"name": "t", "passes": [{"pass": name, key: ["layers.*"]}]}).passes[0]
        assert dict(entry.settings)[key] == ("layers.*",)


def test_no_other_pass_selects_by_name():
    for name in sorted(set(PASSES) - set(GLOB_SETTINGS)):
        assert not {"sites", "linears", "exclude"} & set(settable_fields(pass_class(name))), name


def _dequantized_roles(model: ir.Model, roles: dict[str, str]) -> set[str]:
    """Role names (from the float graph, by node name) of the linears whose weight is now a DequantizeLinear."""
    return {roles[n.name] for n in model.graph if n.name in roles and len(n.inputs) > 1 and n.inputs[1] is not None
            and n.inputs[1].producer() is not None and n.inputs[1].producer().op_type == "DequantizeLinear"}


@pytest.mark.parametrize("linears, exclude", [(("layers.1.*", "layers.0.mlp.*"), ()),
                                              (("layers.*.attn.*",), ("layers.0.attn.k", "layers.1.attn.o"))])
def test_the_same_globs_select_the_same_linears_through_every_pass(tiny_export, linears, exclude):
    fresh = lambda: load(tiny_export("llama"))  # noqa: E731
    float_graph = fresh()
    roles = {node.name: role for node, role in linear_names(float_graph).items()}
    names = NameFilter(linears, exclude)
    expected = {role for role in roles.values() if role != "lm_head" and names.matches(role)}
    assert 0 < len(expected) < len(roles) - 1
    assert {roles[lin.node.name] for lin in selected_linears(fresh(), names, False)} == expected

    quantized = fresh()
    assert QuantizePass(activations="none", linears=linears, exclude=exclude)(quantized).modified
    assert _dequantized_roles(quantized, roles) == expected
    gptq = fresh()
    assert GptqPass(calibrator=CALIBRATOR, linears=linears, exclude=exclude)(gptq).modified
    assert _dequantized_roles(gptq, roles) == expected

    everything = fresh()  # bias-correct selects among quantized linears: quantize them all first
    QuantizePass(activations="per_tensor", calibrator=CALIBRATOR)(everything)
    pending = lambda: {t.name for t in quantized_linears(everything, float_graph)}  # noqa: E731  (not yet corrected)
    before = pending()
    include_only = NameFilter(linears)
    assert BiasCorrectPass(reference=float_graph, calibrator=CALIBRATOR, linears=linears)(everything).modified
    assert before - pending() == {r for r in before if include_only.matches(r)}


def test_the_same_globs_select_the_same_sites_through_every_pass(tiny_export):
    model = load(tiny_export("llama"))
    globs = ("layers.1.*", "layers.0.v_o")
    expected = {s.name for s in site_matching.find_sites(model).select(NameFilter(globs))}
    assert expected == {"layers.0.v_o", "layers.1.attn_norm", "layers.1.mlp_norm", "layers.1.v_o", "layers.1.up_down"}
    stats = collect_stats(model, WINDOWS)
    assert {s.name for s in SmoothPass(stats=stats, sites=globs).scales_for(model)} == expected
    assert {s.name for s in AffinePass(calibrator=CALIBRATOR, sites=globs).pending(model)} == expected
