"""Every quantization preset on every family, end to end on the tiny models (issue 14).

Each case exports with the preset by name through `qexport.export` (so the preset adapts to the family's graph),
and checks: the passes that ran are the preset's with exactly the recorded adaptations; the lossless prefix kept
the export's logits; the graph is quantized; a preset that lowers onto ONNX Runtime kernels computes what its own
QDQ form computes; `qexport.evaluate` gives a finite perplexity. The torch trace is most of an export's time and
the same for every recipe of a family, so it runs once per family (`qexport.api.export_graph` memoised here);
each distinct recipe is exported once per family and shared between the cases that need it.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

import qexport
from pass_testing import load, make_feeds, max_rel_diff, padded_feeds, run
from preset_testing import logits_sqnr_db
from qexport.evaluation.perplexity import EvalSettings
from qexport.passes.metadata import Meta
from qexport.recipes import schema as rc
from test_lower_ort import LOWERED_RTOL

QUANT_PRESETS = [name for name in rc.preset_names() if name.startswith(("w8a8", "w4a8"))]
# what each family's graph needs for R1, as (pass, action) in the order recorded (presets without R1: nothing)
EXPECTED_ADAPTATIONS = {
    "llama": [],
    "qwen2": [],
    "opt": [("layernorm-to-rms", "inserted")],  # LayerNorm stream: converted exactly, then R1
    "gemma3": [("rotate-residual", "changed")],  # post-norms: R1 with post_norm: online
}
# the transforms that must find their sites on every family (fold-norm has nothing to fold: the tiny gammas are 1)
TRANSFORMS = ("smooth", "layernorm-to-rms", "rotate-residual", "rotate-heads", "online-hadamard")
# logits SQNR vs FP32 from an empty cache, as the tiny-llama preset tests bound it (quantized, and still the model)
SQNR_DB = {"w8a8": (20.0, 80.0), "w4a8": (5.0, 40.0)}


class Exports:
    """Each (family, recipe) exported once: by preset name, or a recipe written out as a file (runs as written)."""

    def __init__(self, tiny_source, root: Path) -> None:
        self.tiny_source, self.root = tiny_source, root
        self.by_name: dict[tuple[str, str], Path] = {}
        self.by_passes: dict[tuple[str, str], Path] = {}

    def preset(self, family: str, preset: str) -> Path:
        if (family, preset) not in self.by_name:
            out = qexport.export(str(self.tiny_source(family)), self.root / f"{family}-{preset}", recipe=preset,
                                 calib_windows=2, calib_seq_len=64, measure_difficulty=False)
            self.by_name[family, preset] = out
            self.by_passes.setdefault((family, _passes_key(_manifest(out)["recipe"]["recipe"]["passes"])), out)
        return self.by_name[family, preset]

    def recipe(self, family: str, recipe: rc.Recipe) -> Path:
        key = (family, _passes_key([e.to_dict() for e in recipe.passes]))
        if key not in self.by_passes:
            path = self.root / f"{family}-{recipe.name}.yaml"
            path.write_text(recipe.to_yaml())
            self.by_passes[key] = qexport.export(str(self.tiny_source(family)), self.root / f"{family}-{recipe.name}",
                                                 recipe=str(path), calib_windows=2, calib_seq_len=64,
                                                 measure_difficulty=False)
        return self.by_passes[key]


def _passes_key(passes: list[dict]) -> str:
    return json.dumps(passes, sort_keys=True)


def _manifest(out: Path) -> dict:
    return json.loads((out / "qexport.json").read_text())


@pytest.fixture(scope="module")
def exports(tiny_source, tmp_path_factory):
    import qexport.api as api

    traced: dict[tuple, tuple] = {}
    trace = api.export_graph

    def export_graph(hf_model, family, settings):
        key = (family.name, settings)
        if key not in traced:
            model, signature = trace(hf_model, family, settings)
            traced[key] = (ir.to_proto(model), signature)
        proto, signature = traced[key]
        return ir.from_proto(proto), signature

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(api, "export_graph", export_graph)
        yield Exports(tiny_source, tmp_path_factory.mktemp("matrix"))


@pytest.mark.parametrize("preset", QUANT_PRESETS)
def test_preset_on_family_end_to_end(exports, tiny_export, family, preset):
    out = exports.preset(family, preset)
    manifest = _manifest(out)
    report, changes = manifest["recipe"], manifest["recipe_adaptations"]
    ran = [s["pass"] for s in report["steps"]]
    assert ran == [p["pass"] for p in report["recipe"]["passes"]]
    written = [e.name for e in rc.load_recipe(preset).passes]
    expected = EXPECTED_ADAPTATIONS[family] if "rotate-residual" in written else []  # all of them are for R1
    assert [(c["pass"], c["action"]) for c in changes] == expected
    assert all(c["sites"] and c["reason"] for c in changes)
    by_action = {a: collections.Counter(c["pass"] for c in changes if c["action"] == a) for a in ("inserted", "removed")}
    assert collections.Counter(ran) == collections.Counter(written) - by_action["removed"] + by_action["inserted"]
    kept = iter(ran)
    assert all(p in kept for p in written if p not in by_action["removed"])  # in order: nothing unrecorded
    if ("layernorm-to-rms", "inserted") in expected:
        assert ran[ran.index("fold-norm") + 1] == "layernorm-to-rms"
    assert all(s["modified"] for s in report["steps"] if not s["lossless"] or s["pass"] in TRANSFORMS)
    assert report["verify"]["max_abs_logit_diff"] < 1e-3  # the lossless prefix stayed exact

    model = load(out)
    low, high = SQNR_DB[preset[:4]]
    if preset.endswith("-ort"):  # its QDQ form is its twin preset, as adapted to this family (exported first, so
        twin = exports.preset(family, preset.removesuffix("-ort"))  # the QDQ form below is found as its passes)
        assert exports.recipe(family, _twin(report)) == twin
    qdq = _qdq_form(exports, family, report)
    sqnr = logits_sqnr_db(qdq or model, tiny_export(family), runner=_as_written)
    assert low < sqnr < high, f"{preset} on {family}: logits SQNR {sqnr:.1f} dB vs FP32"
    if qdq is not None:
        _assert_lowered_equals_qdq(model, qdq, load(tiny_export(family)), f"{preset} on {family}")

    result = qexport.evaluate(out, settings=EvalSettings(windows=1, seq_len=64, greedy_tokens=4))
    assert math.isfinite(result["ppl"]) and math.isfinite(result["ppl_reference"])
    assert result["ppl_ratio"] < 1.2, f"{preset} on {family}: ppl ratio {result['ppl_ratio']:.3f}"


def _as_written(model: ir.Model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return run(model, feeds, optimize=False)


def _assert_lowered_equals_qdq(lowered: ir.Model, qdq: ir.Model, fp32: ir.Model, case: str) -> None:
    """Every output within LOWERED_RTOL of max |output| (float summation order only), on a left-padded batch after
    cached tokens and on a 16-token prefill (past Gemma3's sliding window of 8). Prompts of 128+ rows take the
    chunked attention branch, checked exactly per family in test_attention_chunks_ort: on those, one rounding tie
    of a per-token or static activation code, flipped by a float summation difference, cascades through the KV
    cache to the later tokens (up to 1e-2 of max |logit| on 130 random tokens, measured)."""
    prefill = make_feeds(qdq, seq=16, past=0)
    outputs = [v.name for v in qdq.graph.outputs]
    assert outputs == [v.name for v in lowered.graph.outputs]
    low, low_q = _with_quantizer_values(lowered)
    ref, ref_q = _with_quantizer_values(qdq)
    for feeds in (padded_feeds(qdq), prefill):
        expected, got = _as_written(ref, feeds), run(low, feeds)
        if _first_code_flip_is_a_tie(got, expected, low_q, ref_q, qdq, case, _kernel_quantized_inputs(lowered, qdq)):
            continue  # past a flipped tie the two graphs round differently: nothing downstream compares tightly
        for name in outputs:
            diff = max_rel_diff(got, expected, name)
            assert diff < LOWERED_RTOL, f"{case}: {name} lowered vs QDQ relative difference {diff:.3g}"
    quant_error = max_rel_diff(_as_written(qdq, prefill), _as_written(fp32, prefill))  # same basis: empty cache
    assert quant_error > 100 * LOWERED_RTOL, f"{case}: the bound means nothing next to the quantization error"


def _kernel_quantized_inputs(lowered: ir.Model, qdq: ir.Model) -> dict[str, tuple[str, int]]:
    """QDQ activation name -> (the lowered graph's name for it, block), for each MatMulNBits at accuracy level 4
    (``ort-nbits``): the kernel rounds that input to int8 per token and block itself (absmax / 127), so its codes are
    not a graph value but follow from the input. The lowered input may have another name (a fused skip-norm's or
    GroupQueryAttention's output), so each kernel is paired with its QDQ linear through the weight it lowered
    (``ort-nbits`` names the kernel ``<weight DequantizeLinear>.nbits``; a merged one lists them)."""
    by_weight = {}
    for n in lowered.graph:
        if n.op_type == "MatMulNBits" and n.attributes["accuracy_level"].value == 4:
            names = n.metadata_props.get(Meta.MERGED_LINEARS, n.name).split(",")
            for name in names:
                by_weight[name.removesuffix(".nbits")] = (n.inputs[0].name, n.attributes["block_size"].value)
    pairs = {}
    for n in qdq.graph:
        if n.op_type == "DequantizeLinear" and n.name in by_weight:
            for linear, _ in n.outputs[0].uses():
                act_dq = linear.inputs[0].producer()
                if act_dq is not None and act_dq.op_type == "DequantizeLinear":
                    pairs[act_dq.inputs[0].producer().inputs[0].name] = by_weight[n.name]
    return pairs


def _with_quantizer_values(model: ir.Model) -> tuple[ir.Model, list[tuple[str, str, str]]]:
    """A copy of ``model`` that also outputs each QuantizeLinear's input, computed scale (if any) and codes, in
    graph order: [(input, scale or '', codes)]; and each input a MatMulNBits quantizes in its kernel."""
    model = ir.from_proto(ir.to_proto(model))
    found, outputs = [], set(model.graph.outputs)
    for node in model.graph:
        if node.op_type == "MatMulNBits" and node.inputs[0] not in outputs:
            model.graph.outputs.append(node.inputs[0])
            outputs.add(node.inputs[0])
        if node.op_type == "QuantizeLinear":
            x, scale, codes = node.inputs[0], node.inputs[1], node.outputs[0]
            for v in (x, codes) + (() if scale.const_value is not None else (scale,)):
                if v not in outputs:
                    model.graph.outputs.append(v)
                    outputs.add(v)
            found.append((x.name, "" if scale.const_value is not None else scale.name, codes.name))
    return model, found


def _block_codes(x: np.ndarray, block: int) -> np.ndarray:
    """Symmetric int8 codes of ``x`` per token and ``block`` channels (absmax / 127), as MatMulNBits at accuracy
    level 4 and ``quantize``'s per_group quantizer compute them."""
    blocks = x.astype(np.float32).reshape(*x.shape[:-1], -1, block)
    scale = np.maximum(np.abs(blocks).max(-1, keepdims=True) / np.float32(127), np.float32(1e-12))
    return np.clip(np.round(blocks / scale), -127, 127).astype(np.int32).reshape(x.shape)


def _first_code_flip_is_a_tie(got: dict[str, np.ndarray], expected: dict[str, np.ndarray], low_q: list,
                              ref_q: list, qdq: ir.Model, case: str, in_kernel: dict[str, tuple[str, int]] | None = None) -> bool:
    """Whether the two graphs' activation codes differ somewhere (False: they agree on every quantizer both keep,
    so the outputs must agree tightly). Where they first differ (graph order), each differing code must be a
    rounding tie: the quantizer's input equal within LOWERED_RTOL in both graphs, and x / scale within 1e-3 of a
    half step, so only a float summation difference flipped it; a lowering that computed something else fails.
    ``got`` / ``expected``: the runs of the lowered and QDQ graphs with their quantizer values (``low_q``, ``ref_q``
    from :func:`_with_quantizer_values`)."""
    low_inputs = {codes: x for x, _, codes in low_q}
    in_kernel = in_kernel or {}
    constant_scales = {n.outputs[0].name: n.inputs[1].const_value.numpy() for n in qdq.graph
                       if n.op_type == "QuantizeLinear" and n.inputs[1].const_value is not None}
    for x, scale, codes in ref_q:
        if codes in low_inputs:
            low_codes, x_low = got[codes], got[low_inputs[codes]]
        elif x in in_kernel:  # the lowered kernel quantizes x itself: its codes follow from its input
            x_name, block = in_kernel[x]
            low_codes, x_low = _block_codes(got[x_name], block), got[x_name]
            block_scale = np.repeat(expected[scale], block, axis=-1) if scale else None
        else:
            continue
        flipped = low_codes.astype(np.int32) != expected[codes].astype(np.int32)
        if not flipped.any():
            continue
        x_ref, x_low = expected[x].astype(np.float64), x_low.astype(np.float64)
        assert np.abs(x_low - x_ref).max() <= LOWERED_RTOL * np.abs(x_ref).max(), (
            f"{case}: the input of {codes} differs beyond float rounding")
        if x in in_kernel and codes not in low_inputs:
            step = block_scale
        else:
            step = np.broadcast_to(expected[scale] if scale else constant_scales[codes], x_ref.shape)
        frac = np.abs(x_ref / step) % 1.0
        assert (np.abs(frac[flipped] - 0.5) < 1e-3).all(), f"{case}: {codes} flipped codes that were not ties"
        return True
    return False


def _qdq_form(exports: Exports, family: str, report: dict) -> ir.Model | None:
    """The QDQ graph a lowering preset lowers: its passes before the first lowering, exported with the same
    calibration (shared with the QDQ twin preset's own export when the passes are the same); None for a QDQ preset."""
    twin = _twin(report)
    return None if twin is None else load(exports.recipe(family, twin))


def _twin(report: dict) -> rc.Recipe | None:
    """The recipe that ran, up to its first ONNX Runtime lowering (``ort-*``); None when it has none."""
    recipe = rc.Recipe.from_dict(report["recipe"])
    first = next((i for i, e in enumerate(recipe.passes) if e.name.startswith("ort-")), None)
    if first is None:
        return None
    assert all(e.name.startswith("ort-") for e in recipe.passes[first:])  # only lowerings follow
    return dataclasses.replace(recipe, name=f"{recipe.name}-qdq-form", passes=recipe.passes[:first], checks=())
