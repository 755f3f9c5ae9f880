"""The W8A8 presets run end to end through `qexport.export` on a tiny model, and on SmolLM2 (slow)."""

from __future__ import annotations

import collections
import json

import pytest

import qexport
from preset_testing import evaluate_quantized, export_tiny_preset, linears_merged_away, logits_sqnr_db, quantize_smollm2
from qexport.recipes import schema as rc

QUANT_PRESETS = [name for name in rc.preset_names() if name.startswith("w8a8")]


def test_the_documented_quant_presets_exist():
    assert {"w8a8-dynamic", "w8a8-dynamic-qdq", "w8a8-static"} <= set(QUANT_PRESETS)


def test_export_measures_difficulty_up_to_the_lossy_passes(tiny_source, tmp_path):
    out = qexport.export(str(tiny_source("llama")), tmp_path / "q", recipe="w8a8-dynamic", calib_windows=2, calib_seq_len=64)
    report = json.loads((out / "qexport.json").read_text())["recipe"]
    stages = [stage["stage"] for stage in report["difficulty"]]
    lossy = [i for i, step in enumerate(report["steps"]) if not step["lossless"]]
    assert stages[0] == "export" and len(stages) > 1
    assert all(int(stage.split(":")[0]) < lossy[0] for stage in stages[1:])


@pytest.mark.parametrize("preset", QUANT_PRESETS)
def test_quant_preset_end_to_end_on_tiny_llama(tiny_source, tiny_export, tmp_path, preset):
    steps, model = export_tiny_preset(tiny_source("llama"), tmp_path / "q", preset)
    ops = collections.Counter(n.op_type for n in model.graph)
    settings = dict(rc.load_recipe(preset).passes[[e.name for e in rc.load_recipe(preset).passes].index("quantize")].settings)
    linears = 14 + bool(settings.get("include_lm_head"))  # 2 layers x 7, and lm_head if the preset says so
    ran = [s["pass"] for s in steps]
    merged_away = linears_merged_away(model)
    if "ort-nbits" in ran:  # the kernels quantize their activations: no quantizer left
        assert ops["MatMulNBits"] + merged_away == linears and ops["DequantizeLinear"] == ops["QuantizeLinear"] == 0
    elif "ort-merge-linears" in ran:  # per layer: q/k/v merged, o, gate/up merged, down
        assert ops["MatMulIntegerToFloat"] == linears - 2 * 3 and ops["Split"] >= 2 * 2 and ops["DequantizeLinear"] == 0
    elif "ort-int8" in ran:
        assert ops["MatMulIntegerToFloat"] == linears and ops["DequantizeLinear"] == 0
    else:
        assert ops["DequantizeLinear"] == linears + ops["QuantizeLinear"]  # weights, and one DQ per activation Q
    sqnr = logits_sqnr_db(model, tiny_export("llama"))
    assert 20.0 < sqnr < 80.0, f"{preset}: logits SQNR {sqnr:.1f} dB vs FP32"  # quantized, and still the model


# targets: perplexity ratio to PyTorch FP32 on SmolLM2-135M, evaluation text never used for calibration (issue 14
# tightened w8a8-static from 1.05 to 1.02); the QDQ twin of w8a8-dynamic and the ORT-kernel form of w8a8-static are
# held to their twins' targets; w8a8-group to issue 16's 1.005 (measured 0.999 to 1.001 on 8 windows of two domains)
TARGETS = {"w8a8-dynamic": 1.01, "w8a8-dynamic-qdq": 1.01, "w8a8-static": 1.02, "w8a8-static-ort": 1.02,
           "w8a8-group": 1.005, "w8a8-group-ort": 1.005}


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(TARGETS))
def test_quant_preset_meets_its_perplexity_target_on_smollm2(default_export, tmp_path, preset):
    model = quantize_smollm2(default_export, preset)
    result = evaluate_quantized(default_export, model, tmp_path / preset)
    assert result["ppl_ratio"] <= TARGETS[preset], f"{preset}: ppl ratio {result['ppl_ratio']:.4f}"
    ops = collections.Counter(n.op_type for n in model.graph)
    merged = linears_merged_away(model)  # linears inside merged nodes
    assert ops["MatMulIntegerToFloat"] + merged + ops["DequantizeLinear"] + ops["MatMulNBits"] >= 7 * 30  # quantized
    # for real: every layer linear
