"""The metadata keys are part of the saved format: their strings are pinned here, so a rename fails a test."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from qexport.artifact.runtime import Runtime
from qexport.errors import QexportError
from qexport.passes.metadata import PREFIXES, Meta

SAVED = {
    Meta.QUANT: "qexport.quant",
    Meta.ROLE: "qexport.role",
    Meta.BIAS_CORRECTED: "qexport.bias_corrected",
    Meta.ROTATE_HEADS: "qexport.rotate_heads",
    Meta.ONLINE_HADAMARD: "qexport.online_hadamard",
    Meta.LOWERED: "qexport.lowered",
    Meta.MERGED_LINEARS: "qexport.merged_linears",
    Meta.ATTENTION: "qexport.attention",
    Meta.ATTENTION_CHUNKS: "qexport.attention_chunks",
    Meta.RMS_NORM: "qexport.rms_norm",
    Meta.ROTARY: "qexport.rotary",
    Meta.KV_CACHE: "qexport.kv_cache",
    Meta.GQA: "qexport.gqa",
    Meta.SKIP_NORM: "qexport.skip_norm",
    Meta.ONLINE: "qexport.online_",
    Meta.ROTATE_RESIDUAL: "qexport.rotate_residual",
    Meta.SMOOTHED: "qexport.smoothed.",
    Meta.AFFINE: "qexport.affine.",
    Meta.AQAS_ALPHA: "qexport.aqas.",
    Meta.PRECISION: "qexport.precision.",
    Meta.ACT_CALIBRATION: "qexport.act_calibration",
}


def test_every_key_keeps_its_saved_string():
    assert set(SAVED) == set(Meta)
    for key, text in SAVED.items():
        assert key.value == text and key == text and hash(key) == hash(text) and f"{key}" == str(key) == text


def test_keys_round_trip_through_a_saved_model():
    node = ir.node("Identity", [ir.Value(name="x")], name="n")
    node.metadata_props[Meta.QUANT] = "weight"
    model = ir.Model(ir.Graph([], node.outputs, nodes=[node]), ir_version=10)
    model.metadata_props[Meta.SMOOTHED.key("layers.0.attn_norm")] = "abc"
    loaded = ir.from_proto(ir.to_proto(model))
    assert next(iter(loaded.graph)).metadata_props.get(Meta.QUANT) == "weight"
    assert Meta.SMOOTHED.under(loaded.metadata_props) == {"layers.0.attn_norm": "abc"}


def test_prefix_helpers_refuse_plain_keys():
    assert Meta.AQAS_ALPHA.key("layers.1.v_o") == "qexport.aqas.layers.1.v_o"
    assert all(p.value.endswith((".", "_")) for p in PREFIXES)
    with pytest.raises(ValueError, match="QUANT is a key"):
        Meta.QUANT.key("x")


def test_runtime_accepts_its_name_and_names_the_choices():
    assert Runtime.parse("ort-cuda") is Runtime.ORT_CUDA and Runtime.parse(Runtime.TENSORRT) is Runtime.TENSORRT
    assert [r.value for r in Runtime] == ["ort-cpu", "ort-cuda", "tensorrt", "genai"]
    with pytest.raises(QexportError, match="unknown runtime 'ort-gpu'; choose one of ort-cpu, ort-cuda, tensorrt"):
        Runtime.parse("ort-gpu")
