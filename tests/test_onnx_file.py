"""The one-initializer-at-a-time single-file writer parses to exactly the ModelProto that ``ir.save`` writes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx_ir.tensor_adapters import TorchTensor

from qexport.artifact.onnx_file import _varint, write_single_file


def _with_subgraph_and_odd_types() -> ir.Model:
    """A small model with int4, int8, float16, bfloat16, bool and int64 initializers, a strided view, an empty
    tensor, torch-backed tensors, metadata, and an If whose branch holds its own initializer."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 3]))
    weights = {
        "w_int4": ir.Tensor(np.array([[-8, 7, 0], [1, -1, 3]], dtype=np.int8).astype(np.int8), dtype=ir.DataType.INT4),
        "w_int8": ir.tensor(np.arange(6, dtype=np.int8).reshape(2, 3)),
        "w_fp16": ir.tensor(np.linspace(-1, 1, 6, dtype=np.float16).reshape(2, 3)),
        "shape": ir.tensor(np.array([3, 2], dtype=np.int64)),
        "big": ir.tensor(np.random.default_rng(0).standard_normal((300, 700)).astype(np.float32)),
        "strided": ir.tensor(np.arange(12, dtype=np.float32).reshape(3, 4).T),  # a transposed view
        "empty": ir.tensor(np.zeros((0, 3), dtype=np.float32)),
        "flags": ir.tensor(np.array([True, False, True])),
        "torch_fp32": TorchTensor(torch.randn(5, 3)),
        "torch_bf16": TorchTensor(torch.randn(2, 2, dtype=torch.bfloat16)),
    }
    weights["big"].doc_string = "documented"
    weights["big"].metadata_props["origin"] = "test"
    inits = {name: ir.Value(name=name, shape=ir.Shape(t.shape), type=ir.TensorType(t.dtype), const_value=t)
             for name, t in weights.items()}
    inner_w = ir.Value(name="inner_w", shape=ir.Shape([2, 3]), type=ir.TensorType(ir.DataType.FLOAT),
                       const_value=ir.tensor(np.ones((2, 3), dtype=np.float32)))
    inner_add = ir.node("Add", [x, inner_w], num_outputs=1)
    inner_add.outputs[0].name = "then_out"
    branch = ir.Graph([], [inner_add.outputs[0]], nodes=[inner_add], initializers=[inner_w], name="then")
    other = ir.node("Identity", [x], num_outputs=1)
    other.outputs[0].name = "else_out"
    other_branch = ir.Graph([], [other.outputs[0]], nodes=[other], name="else")
    cond = ir.node("Constant", [], attributes={"value": ir.tensor(np.array(True))}, num_outputs=1)
    branched = ir.node("If", [cond.outputs[0]], attributes={"then_branch": branch, "else_branch": other_branch},
                       num_outputs=1)
    cast = ir.node("Cast", [inits["w_int8"]], attributes={"to": ir.DataType.FLOAT}, num_outputs=1)
    for node, name in ((cond, "cond"), (branched, "branched"), (cast, "cast")):
        node.outputs[0].name = name
    out = ir.node("Add", [branched.outputs[0], cast.outputs[0]], num_outputs=1)
    out.outputs[0].name = "y"
    graph = ir.Graph([x], [out.outputs[0]], nodes=[cond, branched, cast, out], initializers=list(inits.values()),
                     opset_imports={"": 21}, name="g", metadata_props={"k": "v"})
    return ir.Model(graph, ir_version=10, producer_name="test", metadata_props={"m": "1"})


@pytest.mark.parametrize("number", [0, 1, 127, 128, 300, 2**31 + 5])
def test_varint_matches_protobuf(number):
    from google.protobuf.internal import encoder

    chunks = []
    encoder._EncodeVarint(chunks.append, number)
    assert _varint(number) == b"".join(chunks)


def _same_as_ir_save(model: ir.Model, tmp_path) -> None:
    before = {name: v.const_value for name, v in model.graph.initializers.items()}
    write_single_file(model, tmp_path / "streamed.onnx")
    ir.save(model, tmp_path / "plain.onnx")
    streamed, plain = onnx.load(tmp_path / "streamed.onnx"), onnx.load(tmp_path / "plain.onnx")
    assert streamed == plain
    assert len(streamed.graph.initializer) == len(model.graph.initializers)
    assert {name: v.const_value for name, v in model.graph.initializers.items()} == before  # the model is untouched


def test_streamed_file_equals_ir_save_on_odd_types_and_subgraphs(tmp_path):
    _same_as_ir_save(_with_subgraph_and_odd_types(), tmp_path)


def test_streamed_file_equals_ir_save_on_a_quantized_export(tiny_source, tmp_path):
    import qexport

    out = qexport.export(str(tiny_source("qwen2")), tmp_path / "q", recipe="w8a8-dynamic", calib_windows=2,
                         calib_seq_len=32, measure_difficulty=False)
    _same_as_ir_save(ir.load(out / "model.onnx"), tmp_path)


def test_streamed_file_runs_in_onnxruntime(tmp_path):
    import onnxruntime as ort

    model = _with_subgraph_and_odd_types()
    write_single_file(model, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], x + 1 + np.arange(6).reshape(2, 3))
