"""OnlineHadamardPass(block=b): the block-diagonal R4 leaves the float model unchanged and costs one MatMul."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from pass_testing import ATOL, RTOL, load, make_feeds, run
from qexport.errors import RecipeError
from qexport.passes.metadata import Meta
from qexport.passes.transforms.hadamard import block_hadamard_nodes, hadamard_matrix
from qexport.passes.transforms.online_hadamard import OnlineHadamardPass


def test_block_r4_keeps_the_float_model(tiny_export):
    model = load(tiny_export("llama"))
    feeds = make_feeds(model)
    expected = run(model, feeds)
    assert OnlineHadamardPass(block=8)(model).modified
    got = run(model, feeds)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=RTOL, atol=ATOL, err_msg=name)
    tagged = collections.Counter(n.op_type for n in model.graph if Meta.ONLINE_HADAMARD in n.metadata_props)
    layers = sum(v.name.startswith("past_key_values.") for v in model.graph.inputs) // 2
    assert tagged["MatMul"] == layers  # one MatMul per site, not the full form's two
    assert not OnlineHadamardPass(block=8)(model).modified


def test_block_nodes_compute_the_block_diagonal_hadamard():
    import onnx_ir as ir

    n, block = 24, 8
    x = ir.Value(name="x", shape=ir.Shape([2, 3, n]), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 18})
    nodes, out = block_hadamard_nodes(graph, x, n, block, np.float32, "t")
    graph.extend(nodes)
    out.type, out.shape = x.type, x.shape
    graph.outputs.append(out)
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, n)).astype(np.float32)}
    got = run(ir.Model(graph, ir_version=10), feeds)[out.name]
    expected = feeds["x"] @ np.kron(np.eye(n // block), hadamard_matrix(block))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(expected, feeds["x"] @ hadamard_matrix(n), atol=1e-2)  # not the full transform


@pytest.mark.parametrize("block", [3, 1, 512])
def test_bad_block_names_the_problem(tiny_export, block):
    model = load(tiny_export("llama"))
    with pytest.raises(RecipeError, match="block"):
        OnlineHadamardPass(block=block)(model)
