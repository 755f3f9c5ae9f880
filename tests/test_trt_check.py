"""TensorRT compatibility check: a well-formed QDQ graph passes, and each rule catches a graph built to break it."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qexport.artifact.folder import Artifact
from qexport.runtimes.tensorrt.check import (
    Rule, Severity, TensorRTIncompatibleError, check_model, check_path, errors, require_compatible,
)

IN, OUT = 128, 32
RNG = np.random.default_rng(0)


def const(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def int4(name: str, array: np.ndarray) -> TensorProto:
    return helper.make_tensor(name, TensorProto.INT4, array.shape, array.flatten().tolist())


def build(nodes, inits, *, opset: int = 21, inputs=None, functions=(), infer_shapes: bool = True) -> ir.Model:
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", IN])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=inits)
    domains = {n.domain for n in nodes if n.domain} | {f.domain for f in functions}
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in sorted(domains)]
    proto = helper.make_model(graph, opset_imports=opsets, functions=list(functions))
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto) if infer_shapes else proto)


def act_qdq(src: str = "x", *, scale=np.float32(0.05), zp=np.int8(0), axis: int | None = None,
            to_type: int | None = None):
    """Static activation Q/DQ: (nodes, initializers), output 'x_dq'."""
    q_inputs = [src, "act_scale"] + ([] if zp is None else ["act_zp"])
    attrs = {} if axis is None else {"axis": axis}
    if to_type is not None:
        attrs["output_dtype"] = to_type
    nodes = [helper.make_node("QuantizeLinear", q_inputs, ["x_q"], name="q_act", **attrs),
             helper.make_node("DequantizeLinear", ["x_q", "act_scale"] + q_inputs[2:], ["x_dq"], name="dq_act",
                              **({} if axis is None else {"axis": axis}))]
    return nodes, [const("act_scale", scale)] + ([] if zp is None else [const("act_zp", zp)])


def weight_dq(w: TensorProto, scale: np.ndarray, *, axis: int = 1, zp: np.ndarray | None = None,
              block_size: int | None = None):
    attrs = {"axis": axis} | ({} if block_size is None else {"block_size": block_size})
    inputs = ["w", "w_scale"] + ([] if zp is None else ["w_zp"])
    node = helper.make_node("DequantizeLinear", inputs, ["w_dq"], name="dq_w", **attrs)
    return [node], [w, const("w_scale", scale)] + ([] if zp is None else [const("w_zp", zp)])


def per_channel_weight(shape=(IN, OUT)) -> tuple[TensorProto, np.ndarray]:
    w = RNG.integers(-127, 128, size=shape, dtype=np.int8)
    return const("w", w), (RNG.random(shape[1]) * 0.01 + 1e-3).astype(np.float32)


def qdq_matmul(act=None, weight=None, matmul_inputs=("x_dq", "w_dq")) -> ir.Model:
    """x -> Q/DQ (per-tensor int8) -> MatMul <- DQ(int8 weight [in, out], per-channel axis 1)."""
    act_nodes, act_inits = act or act_qdq()
    w_nodes, w_inits = weight or weight_dq(*per_channel_weight(), axis=1)
    matmul = helper.make_node("MatMul", list(matmul_inputs), ["y"], name="matmul")
    return build(act_nodes + w_nodes + [matmul], act_inits + w_inits)


def gemm_trans_b(weight) -> ir.Model:
    """x -> Q/DQ -> Reshape [-1, in] -> Gemm(transB=1) <- DQ(weight [out, in])."""
    act_nodes, act_inits = act_qdq()
    flat = helper.make_node("Reshape", ["x_dq", "flat_shape"], ["x2"], name="flatten")
    gemm = helper.make_node("Gemm", ["x2", "w_dq"], ["y"], name="gemm", transB=1)
    return build(act_nodes + [flat] + weight[0] + [gemm], act_inits + weight[1] + [const("flat_shape", np.array([-1, IN]))])


def int4_weight(shape=(IN, OUT), block: int = 64, axis: int = 0, scale_shape=None):
    w = RNG.integers(-8, 8, size=shape).astype(np.int8)
    scale_shape = scale_shape or tuple(d // block if i == axis else d for i, d in enumerate(shape))
    return weight_dq(int4("w", w), (RNG.random(scale_shape) * 0.01 + 1e-3).astype(np.float32), axis=axis,
                     block_size=block)


def rules(model: ir.Model) -> dict[Rule, set[str]]:
    found: dict[Rule, set[str]] = {}
    for finding in check_model(model):
        found.setdefault(finding.rule, set()).add(finding.node)
    return found


def test_well_formed_qdq_graph_passes_and_runs_in_onnxruntime():
    model = qdq_matmul()
    assert check_model(model) == []
    assert require_compatible(model) == []
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    x = RNG.standard_normal((2, 3, IN)).astype(np.float32)
    (y,) = session.run(None, {"x": x})
    assert y.shape == (2, 3, OUT)


def test_int4_blocked_weights_and_gemm_trans_b_pass():
    assert check_model(qdq_matmul(weight=int4_weight(block=64))) == []
    assert check_model(qdq_matmul(weight=int4_weight(block=128))) == []
    w = const("w", RNG.integers(-127, 128, size=(OUT, IN), dtype=np.int8))  # transB=1: weight [out, in]
    assert check_model(gemm_trans_b(weight_dq(w, np.full(OUT, 0.01, np.float32), axis=0))) == []


def test_tiny_float_export_passes(tiny_export):
    assert check_path(Artifact.open(tiny_export("llama")).model_path) == []


def test_opset_outside_tensorrt_range():
    model = qdq_matmul()
    model.opset_imports[""] = 25
    assert rules(model) == {Rule.OPSET: {"<model>"}}


def test_contrib_and_unsupported_ops():
    contrib = helper.make_node("MatMulIntegerToFloat", ["x", "x", "s", "s"], ["y"], name="mmitf",
                               domain="com.microsoft")
    dyn = helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"], name="dql")
    model = build([dyn, contrib], [const("s", np.float32(1.0))])
    assert rules(model) == {Rule.UNSUPPORTED_OP: {"mmitf", "dql"}}


def test_custom_domain_defined_as_local_function_is_accepted():
    body = [helper.make_node("Relu", ["a"], ["b"])]
    function = helper.make_function("local", "MyRelu", ["a"], ["b"], body, [helper.make_opsetid("", 21)])
    model = build([helper.make_node("MyRelu", ["x"], ["y"], name="mine", domain="local")], [], functions=[function])
    assert check_model(model) == []


def test_types_are_followed_from_q_to_dq_without_shape_inference():
    nodes, inits = act_qdq()
    model = build(nodes + [helper.make_node("Relu", ["x_dq"], ["y"], name="relu")], inits, infer_shapes=False)
    assert model.graph.node("dq_act").inputs[0].dtype is None
    assert rules(model) == {}
    nodes, inits = act_qdq(zp=np.uint8(0))
    model = build(nodes + [helper.make_node("Relu", ["x_dq"], ["y"], name="relu")], inits, infer_shapes=False)
    assert rules(model) == {Rule.QDQ_TYPE: {"q_act", "dq_act"}}


def test_uint8_and_default_uint8_quantization_are_refused():
    assert rules(qdq_matmul(act=act_qdq(zp=np.uint8(0)))) == {Rule.QDQ_TYPE: {"q_act", "dq_act"}}
    assert Rule.QDQ_TYPE in rules(qdq_matmul(act=act_qdq(zp=None)))  # ONNX default output type is uint8
    assert rules(qdq_matmul(act=act_qdq(zp=None, to_type=TensorProto.INT8))) == {}


def test_scale_type_and_non_positive_scale():
    assert rules(qdq_matmul(act=act_qdq(scale=np.float64(0.05)))) == {Rule.SCALE_TYPE: {"q_act", "dq_act"}}
    w, scale = per_channel_weight()
    scale[3] = 0.0
    assert rules(qdq_matmul(weight=weight_dq(w, scale))) == {Rule.SCALE_NOT_POSITIVE: {"dq_w"}}


def test_nonzero_zero_point():
    assert rules(qdq_matmul(act=act_qdq(zp=np.int8(3)))) == {Rule.ZERO_POINT: {"q_act", "dq_act"}}
    w, scale = per_channel_weight()
    zp = np.zeros(OUT, np.int8)
    assert rules(qdq_matmul(weight=weight_dq(w, scale, zp=zp))) == {}
    zp[0] = 1
    assert rules(qdq_matmul(weight=weight_dq(w, scale, zp=zp))) == {Rule.ZERO_POINT: {"dq_w"}}


def test_dynamic_per_token_quantization_subgraph():
    """scale = ReduceMax(|x|, last axis) / 127, computed from the data it quantizes."""
    nodes = [
        helper.make_node("Abs", ["x"], ["ax"], name="abs"),
        helper.make_node("ReduceMax", ["ax", "axes"], ["amax"], name="amax", keepdims=1),
        helper.make_node("Div", ["amax", "c127"], ["dyn_scale"], name="div"),
        helper.make_node("QuantizeLinear", ["x", "dyn_scale", "zp"], ["x_q"], name="q_dyn"),
        helper.make_node("DequantizeLinear", ["x_q", "dyn_scale", "zp"], ["x_dq"], name="dq_dyn"),
    ]
    inits = [const("axes", np.array([-1])), const("c127", np.float32(127)), const("zp", np.int8(0))]
    w_nodes, w_inits = weight_dq(*per_channel_weight())
    model = build(nodes + w_nodes + [helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"], name="mm")], inits + w_inits)
    found = check_model(model)
    assert {(f.rule, f.node) for f in found} == {(Rule.DYNAMIC_SCALE, "q_dyn"), (Rule.DYNAMIC_SCALE, "dq_dyn")}
    assert "ReduceMax" in found[0].message and "Abs" in found[0].message


def test_per_channel_activation_scale():
    act = act_qdq(scale=np.full(IN, 0.05, np.float32), axis=2)
    assert rules(qdq_matmul(act=act)) == {Rule.ACTIVATION_PER_CHANNEL: {"q_act", "dq_act"}}


def test_weight_scale_on_wrong_axis_and_wrong_length():
    w = const("w", RNG.integers(-127, 128, size=(IN, OUT), dtype=np.int8))
    in_scale = np.full(IN, 0.01, np.float32)
    assert rules(qdq_matmul(weight=weight_dq(w, in_scale, axis=0))) == {Rule.WEIGHT_AXIS: {"dq_w"}}
    assert rules(qdq_matmul(weight=weight_dq(w, in_scale[:16], axis=1))) == {Rule.SCALE_SHAPE: {"dq_w"}}


def test_weight_axis_follows_gemm_trans_b():
    w = const("w", RNG.integers(-127, 128, size=(OUT, IN), dtype=np.int8))
    weight = weight_dq(w, np.full(IN, 0.01, np.float32), axis=1)  # axis 1 is the input axis when transB=1
    assert rules(gemm_trans_b(weight)) == {Rule.WEIGHT_AXIS: {"dq_w"}}


def test_int4_on_activations_and_unblocked_int4_weights():
    act = act_qdq(zp=None, to_type=TensorProto.INT4)
    assert rules(qdq_matmul(act=act)) == {Rule.INT4_ACTIVATION: {"q_act", "dq_act"}}
    w = int4("w", RNG.integers(-8, 8, size=(IN, OUT)).astype(np.int8))
    assert rules(qdq_matmul(weight=weight_dq(w, np.full(OUT, 0.01, np.float32)))) == {Rule.INT4_NOT_BLOCKED: {"dq_w"}}


def test_block_quantized_activation():
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, IN])]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["x_q"], name="q_blk", axis=1, block_size=64),
             helper.make_node("DequantizeLinear", ["x_q", "s", "zp"], ["y"], name="dq_blk", axis=1, block_size=64)]
    model = build(nodes, [const("s", np.full((4, 2), 0.1, np.float32)), const("zp", np.zeros((4, 2), np.int8))],
                  inputs=inputs)
    assert rules(model) == {Rule.BLOCK_ACTIVATION: {"q_blk", "dq_blk"}}


def test_int4_block_size_axis_and_layout():
    assert rules(qdq_matmul(weight=int4_weight(block=32))) == {Rule.BLOCK_SIZE: {"dq_w"}}
    assert rules(qdq_matmul(weight=int4_weight(shape=(IN, 128), block=64, axis=1))) == {Rule.BLOCK_AXIS: {"dq_w"}}
    odd = rules(qdq_matmul(weight=int4_weight(shape=(IN, 33), block=64), matmul_inputs=("x_dq", "w_dq")))
    assert odd == {Rule.BLOCK_LAYOUT: {"dq_w"}}
    assert rules(qdq_matmul(weight=int4_weight(block=64, scale_shape=(3, OUT)))) == {Rule.BLOCK_LAYOUT: {"dq_w"}}


def test_quantize_without_dequantize_and_orphan_dequantize():
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["x_q"], name="q_alone"),
             helper.make_node("Cast", ["x_q"], ["y"], name="cast", to=TensorProto.FLOAT)]
    assert rules(build(nodes, [const("s", np.float32(0.1)), const("zp", np.int8(0))])) == {Rule.Q_WITHOUT_DQ: {"q_alone"}}
    inputs = [helper.make_tensor_value_info("x", TensorProto.INT8, ["batch", IN])]
    nodes = [helper.make_node("DequantizeLinear", ["x", "s", "zp"], ["y"], name="dq_alone")]
    model = build(nodes, [const("s", np.float32(0.1)), const("zp", np.int8(0))], inputs=inputs)
    assert rules(model) == {Rule.DQ_WITHOUT_Q: {"dq_alone"}}


def test_half_quantized_matmul_is_a_warning_only():
    model = qdq_matmul(act=([], []), matmul_inputs=("x", "w_dq"))
    found = check_model(model)
    assert [(f.rule, f.node, f.severity) for f in found] == [(Rule.QDQ_PLACEMENT, "matmul", Severity.WARNING)]
    assert errors(found) == []
    assert require_compatible(model) == found


def test_require_compatible_names_each_violating_node():
    with pytest.raises(TensorRTIncompatibleError) as info:
        require_compatible(qdq_matmul(act=act_qdq(zp=np.int8(5))))
    assert "zero-point at q_act" in str(info.value) and "zero-point at dq_act" in str(info.value)
    assert {f.node for f in info.value.findings} == {"q_act", "dq_act"}


@pytest.mark.slow
def test_w8a8_static_preset_output_for_smollm2_passes(default_export, tmp_path_factory, capsys):
    """issue 5: `qexport check --target tensorrt` passes on the w8a8-static preset's SmolLM2 output."""
    import json

    from smollm2_static import static_smollm2  # tests/ is on sys.path (conftest)
    from qexport.cli import main

    folder = static_smollm2(default_export, tmp_path_factory.mktemp("smollm2-static") / "w8a8-static")
    model = ir.load(folder / "model.onnx")
    q_nodes = [n for n in model.graph if n.op_type == "QuantizeLinear"]
    assert len(q_nodes) >= 4 * 30  # per-tensor activation quantizers: q/k/v, o, gate/up, down in each layer
    assert check_model(model) == []
    assert main(["-q", "check", str(folder), "--target", "tensorrt", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["passed"] is True
