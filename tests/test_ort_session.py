"""In-memory ONNX Runtime sessions (qexport.runtimes.ort_session): same outputs as a fully serialized model, model untouched."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from qexport.calibration.stats import prefill_feeds, session_with_outputs
from qexport.runtimes.ort_session import IN_MEMORY, PAGE, cpu_session, serialize_without_weights


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_in_memory_session_equals_the_serialized_model_and_keeps_its_values(tiny_export, family):
    model = ir.load(tiny_export(family) / "model.onnx")
    before = {name: (value.const_value, value.const_value.numpy().copy()) for name, value in model.graph.initializers.items()}
    full = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    fast = cpu_session(model)
    ids = np.random.default_rng(0).integers(3, 250, size=(2, 9))
    feeds = prefill_feeds(ids, {i.name: i for i in fast.get_inputs()}, model)
    for a, b in zip(full.run(None, feeds), fast.run(None, feeds)):
        np.testing.assert_array_equal(a, b)
    for name, value in model.graph.initializers.items():  # the same data; large ones now on page-aligned buffers
        np.testing.assert_array_equal(value.const_value.numpy(), before[name][1])
        assert value.const_value.dtype == before[name][0].dtype and value.const_value.name == name
        if value.const_value is not before[name][0]:  # adopted: a large one, on a page-aligned copy
            assert value.const_value.size >= 1024 and value.const_value.numpy().ctypes.data % PAGE == 0, name
    assert any(value.const_value is not before[name][0] for name, value in model.graph.initializers.items())
    adopted = {name: value.const_value for name, value in model.graph.initializers.items()}
    again = cpu_session(model)  # a second session adopts nothing more: the aligned arrays are used in place
    assert all(value.const_value is adopted[name] for name, value in model.graph.initializers.items())
    for a, b in zip(full.run(None, feeds), again.run(None, feeds)):
        np.testing.assert_array_equal(a, b)


def test_large_initializers_leave_the_protobuf_and_small_or_overridable_ones_stay(tiny_export):
    model = ir.load(tiny_export("llama") / "model.onnx")
    data, names, arrays = serialize_without_weights(model)
    full = len(ir.to_proto(model).SerializeToString())
    assert names and full - len(data) >= 0.95 * sum(a.nbytes for a in arrays) > 0  # their bytes are not in it (stubs: a few)
    stubs = {t.name for t in ir.from_proto(__import__("onnx").load_from_string(data)).graph.initializers.values()
             if isinstance(t.const_value, ir.ExternalTensor) and t.const_value.location == IN_MEMORY}
    assert stubs == set(names)
    assert all(a.size >= 1024 for a in arrays)
    bias = next(n for n, v in model.graph.initializers.items() if v.const_value.size >= 1024)
    session = session_with_outputs(model, [], None, inputs=[bias])  # an overridable initializer is fed at run time
    feeds = prefill_feeds(np.arange(3, 10), {i.name: i for i in session.get_inputs()}, model)
    zero = np.zeros_like(model.graph.initializers[bias].const_value.numpy())
    assert not np.array_equal(session.run(["logits"], feeds)[0], session.run(["logits"], {**feeds, bias: zero})[0])


def test_a_tensor_read_from_protobuf_is_always_adopted_and_the_session_gets_that_copy(monkeypatch):
    # a protobuf tensor's numpy() copies its bytes to a new address on every call, so whether it is page-aligned
    # is chance: it is always adopted, and the array handed to ONNX Runtime is the adopted one. The lucky case
    # (every copy happens to be page-aligned) is forced here: it must still be adopted.
    import onnx

    from qexport.runtimes.ort_session import page_aligned

    copy = ir.serde.TensorProtoTensor.numpy
    monkeypatch.setattr(ir.serde.TensorProtoTensor, "numpy", lambda self: page_aligned(copy(self)))

    weight = np.arange(64 * 32, dtype=np.float32).reshape(64, 32)
    proto = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 64])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 32])],
        [onnx.numpy_helper.from_array(weight, "w")]))
    model = ir.from_proto(proto)
    assert isinstance(model.graph.initializers["w"].const_value, ir.serde.TensorProtoTensor)
    _, names, arrays = serialize_without_weights(model)
    adopted = model.graph.initializers["w"].const_value
    assert names == ["w"] and isinstance(adopted, ir.Tensor) and adopted.numpy() is arrays[0]
    assert arrays[0].ctypes.data % PAGE == 0
    np.testing.assert_array_equal(arrays[0], weight)
    serialize_without_weights(model)
    assert model.graph.initializers["w"].const_value is adopted  # adopted once
