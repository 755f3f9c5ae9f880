"""TensorRT: what runs on any machine (profiles, refusals, missing-TensorRT errors), and GPU tests that build an
engine from a tiny export and compare it with ONNX Runtime. The GPU tests skip, with the reason, where TensorRT or a
CUDA GPU is missing."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from qexport.artifact.folder import Artifact
from qexport.evaluation.compare import Tolerances, compare_causal_lms
from qexport.errors import QexportError
from qexport.runtimes.causal_lm import CausalLM
from qexport.runtimes.tensorrt.engine import (
    ENGINE_FILE, INSTALL_HINT, EngineSettings, TensorRTRunner, build_engine, model_input_shapes, profile_shapes,
    settings_path,
)
from qexport.runtimes.tensorrt.check import Rule, TensorRTIncompatibleError


@pytest.fixture
def no_tensorrt(monkeypatch):
    """Make ``import tensorrt`` fail, whether or not it is installed."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def test_prefill_and_decode_profiles_on_the_exported_signature(tiny_export):
    model = ir.load(Artifact.open(tiny_export("llama")).model_path)
    prefill, decode = profile_shapes(model_input_shapes(model), EngineSettings(max_seq_len=256, max_batch=4))
    assert prefill["input_ids"] == ((1, 1), (1, 128), (4, 256))
    assert prefill["attention_mask"] == ((1, 1), (1, 128), (4, 256))
    assert prefill["past_key_values.0.key"] == ((1, 2, 0, 16), (1, 2, 0, 16), (4, 2, 0, 16))  # empty past
    assert decode["position_ids"] == ((1, 1), (1, 1), (4, 1))
    assert decode["past_key_values.1.value"] == ((1, 2, 0, 16), (1, 2, 128, 16), (4, 2, 255, 16))
    assert decode["attention_mask"] == ((1, 1), (1, 129), (4, 256))  # past + 1 <= max_seq_len
    assert set(prefill) == set(decode) == {v.name for v in model.graph.inputs}


def test_profiles_refuse_inputs_outside_the_signature():
    with pytest.raises(QexportError, match="pixel_values"):
        profile_shapes({"pixel_values": ("batch", 3, 224, 224)}, EngineSettings())


def test_engine_settings_are_validated():
    with pytest.raises(QexportError):
        EngineSettings(max_seq_len=1)
    with pytest.raises(QexportError):
        EngineSettings(max_seq_len=64, opt_seq_len=65)
    assert EngineSettings(max_seq_len=64).opt_seq == 64


def _asymmetric_qdq_model(path) -> None:
    """x -> Q/DQ with zero point 7 -> MatMul: breaks TensorRT's symmetric-quantization rule."""
    nodes = [helper.make_node("QuantizeLinear", ["input_ids", "s", "zp"], ["q"], name="q_asym"),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["logits"], name="dq_asym")]
    inits = [numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.int8(7), "zp")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input_ids", TensorProto.FLOAT, ["b", "s"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s"])], initializer=inits)
    ir.save(ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])), path)


def test_build_refuses_an_incompatible_model_with_its_findings(tmp_path, no_tensorrt):
    _asymmetric_qdq_model(tmp_path / "bad.onnx")
    with pytest.raises(TensorRTIncompatibleError) as info:
        build_engine(tmp_path / "bad.onnx", tmp_path / ENGINE_FILE)
    assert {(f.rule, f.node) for f in info.value.findings} == {(Rule.ZERO_POINT, "q_asym"), (Rule.ZERO_POINT, "dq_asym")}
    assert not (tmp_path / ENGINE_FILE).exists()


def test_build_without_tensorrt_says_how_to_install_it(tiny_export, tmp_path, no_tensorrt):
    artifact = Artifact.open(tiny_export("llama"))
    with pytest.raises(QexportError, match="TensorRT is not installed") as info:
        build_engine(artifact.model_path, tmp_path / ENGINE_FILE, int8=False, max_seq_len=64)
    assert INSTALL_HINT in str(info.value)


def test_runner_without_tensorrt_says_how_to_install_it(tmp_path, no_tensorrt):
    with pytest.raises(QexportError, match="pip install qexport\\[tensorrt\\]"):
        TensorRTRunner(tmp_path / ENGINE_FILE)


# ---- GPU tests: need TensorRT and a CUDA GPU ----

FP32_ENGINE = Tolerances(max_abs=5e-3, min_cosine=0.99999, min_snr_db=50.0)  # TensorRT enables TF32 for FP32 layers


@pytest.fixture(scope="module")
def trt_engine(tiny_export, tmp_path_factory):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (" + INSTALL_HINT + ")")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU; none is visible here")
    artifact = Artifact.open(tiny_export("llama"))
    engine = build_engine(artifact.model_path, tmp_path_factory.mktemp("trt") / ENGINE_FILE, int8=False,
                          max_seq_len=64, max_batch=2, workspace_mb=1024)
    return artifact, engine


@pytest.mark.tensorrt
def test_engine_and_settings_are_saved(trt_engine):
    _, engine = trt_engine
    record = json.loads(settings_path(engine).read_text())
    assert engine.stat().st_size > 0
    assert record["settings"]["max_seq_len"] == 64 and record["strongly_typed"] is True
    assert set(record["profiles"]) == {"prefill", "decode"}


@pytest.mark.tensorrt
def test_engine_matches_onnxruntime_prefill_and_decode(trt_engine):
    artifact, engine = trt_engine
    runner = TensorRTRunner(engine)
    ids = np.random.default_rng(0).integers(3, 250, size=(2, 9), dtype=np.int64)
    result = compare_causal_lms(artifact.causal_lm("ort-cpu"), CausalLM(runner, artifact.signature), ids,
                                tolerances=FP32_ENGINE, decode_steps=4)
    assert result.passed, result.summary()
    prefill = {"input_ids": (2, 9), "attention_mask": (2, 9), "position_ids": (2, 9)}
    decode = {"input_ids": (2, 1), "attention_mask": (2, 10), "position_ids": (2, 1)}
    assert runner.select_profile(prefill | {n: (2, 2, 0, 16) for n in artifact.signature.past_names}) == 0
    assert runner.select_profile(decode | {n: (2, 2, 9, 16) for n in artifact.signature.past_names}) == 1


@pytest.mark.tensorrt
def test_shapes_outside_every_profile_are_refused(trt_engine):
    artifact, engine = trt_engine
    lm = CausalLM(TensorRTRunner(engine), artifact.signature)
    with pytest.raises(QexportError, match="no optimization profile"):
        lm.forward(np.ones((3, 4), np.int64))  # batch 3 > max_batch 2
