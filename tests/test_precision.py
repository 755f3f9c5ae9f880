"""Per-linear weight precision: GPTQ's ``w4_fraction`` keeps the linears that 4-bit weights hurt most at int8."""

from __future__ import annotations

import numpy as np
import pytest

from pass_testing import load, make_feeds, run
from qexport.calibration.calibrator import Calibrator
from qexport.errors import RecipeError
from qexport.passes.discovery.linear_select import linear_names, selected_linears
from qexport.passes.discovery.names import NameFilter
from qexport.passes.metadata import Meta
from qexport.passes.quantize.gptq import GptqPass
from qexport.passes.quantize.precision import choose_precision, relative_error
from qexport.passes.quantize.weight_quant import WeightFormat

WINDOWS = tuple(np.arange(3 + 60 * i, 67 + 60 * i, dtype=np.int64) for i in range(3))
INT4 = dict(weights="int4", group_size=32, weight_clip="mse")


def _weight_dtypes(model) -> dict[str, str]:
    """role -> the stored dtype of its dequantized weight (INT8 or INT4)."""
    roles = {n: r for n, r in ((n, n.metadata_props.get(Meta.ROLE)) for n in model.graph) if r}
    found = {}
    for node, role in roles.items():
        dq = node.inputs[1].producer() if len(node.inputs) > 1 and node.inputs[1] is not None else None
        if dq is not None and dq.op_type == "DequantizeLinear":
            found[role] = dq.inputs[0].const_value.dtype.name
    return found


def _float_hessians(model):
    chosen = selected_linears(model, NameFilter(), False)
    inputs = list(dict.fromkeys(lin.input for lin in chosen))
    return chosen, next(iter(Calibrator(WINDOWS).hessians(model, [inputs], cached=False))).hessians


def test_relative_error_is_zero_on_the_grid_and_grows_with_coarser_groups():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 64))
    h = x.T @ x / len(x)
    fmt = WeightFormat("int4", group_size=32)
    on_grid = fmt.dequantize(*fmt.quantize(rng.normal(size=(64, 8))))
    assert relative_error(on_grid, h, fmt) < 1e-20
    w = rng.normal(size=(64, 8))
    assert 0 < relative_error(w, h, fmt) < relative_error(w, h, WeightFormat("int4", group_size=64))


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_the_budget_goes_to_the_most_sensitive_linears(tiny_export, family):
    model = load(tiny_export(family))
    chosen, hessians = _float_hessians(model)
    fmt = WeightFormat("int4", group_size=32, clip="mse")
    choices = choose_precision(chosen, linear_names(model), hessians, fmt, w4_fraction=0.6)
    total = sum(c.params for c in choices)
    eight = [c for c in choices if c.bits == 8]
    spent = sum(c.params for c in eight)
    assert eight and spent <= 0.4 * total
    fitting = [c for c in choices if c.params <= 0.4 * total]
    assert max(fitting, key=lambda c: c.relative_error).bits == 8  # the most sensitive linear that fits
    assert all(c.bits == 8 or spent + c.params > 0.4 * total for c in choices)  # no 4-bit linear still fits
    for c in choices:  # a 4-bit linear more sensitive than an int8 one was passed over for lack of room only
        if c.bits == 4 and any(e.relative_error < c.relative_error for e in eight):
            assert c.params > 0.4 * total - sum(e.params for e in eight if e.relative_error > c.relative_error)


def test_gptq_with_w4_fraction_writes_both_formats_and_records_the_choice(tiny_export):
    model = load(tiny_export("llama"))
    assert GptqPass(calibrator=Calibrator(WINDOWS), w4_fraction=0.6, **INT4)(model).modified
    dtypes = _weight_dtypes(model)
    recorded = Meta.PRECISION.under(model.metadata_props)
    assert set(recorded) == set(dtypes) and len(dtypes) == 14
    for role, value in recorded.items():
        bits = int(value.split(":")[0])
        assert dtypes[role] == {8: "INT8", 4: "INT4"}[bits]
    assert {v.split(":")[0] for v in recorded.values()} == {"4", "8"}
    assert not GptqPass(calibrator=Calibrator(WINDOWS), w4_fraction=0.6, **INT4)(model).modified


def test_measured_choice_beats_the_opposite_choice_at_the_same_budget(tiny_export, monkeypatch):
    """The logits error of the measured selection is below that of giving int8 to the least sensitive linears."""
    import qexport.passes.quantize.precision as precision

    folder = tiny_export("llama")
    feeds = make_feeds(load(folder), seed=3)
    reference = run(load(folder), feeds)["logits"]

    def error(fraction: float, invert: bool = False) -> float:
        model = load(folder)
        if invert:  # rank by the negated error: the least sensitive linears get the int8 budget
            original = precision.relative_error
            monkeypatch.setattr(precision, "relative_error", lambda *args: -original(*args))
        GptqPass(calibrator=Calibrator(WINDOWS), w4_fraction=fraction, **INT4)(model)
        monkeypatch.undo()
        return float(np.abs(run(model, feeds)["logits"] - reference).mean())

    all4, measured, opposite = error(1.0), error(0.6), error(0.6, invert=True)
    assert measured < opposite and measured < all4


def test_w4_fraction_settings_are_checked():
    with pytest.raises(RecipeError, match="w4_fraction must be within"):
        GptqPass(w4_fraction=0.0, **INT4)
    with pytest.raises(RecipeError, match="w4_fraction must be within"):
        GptqPass(w4_fraction=1.5, **INT4)
    with pytest.raises(RecipeError, match="set weights to int4 or dint4"):
        GptqPass(w4_fraction=0.5)
