"""Hadamard and random orthogonal matrices, and the online Hadamard nodes run through ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from qexport.errors import QexportError
from qexport.passes.transforms import hadamard as had


@pytest.mark.parametrize("k", had.BASE_SIZES)
def test_base_matrix_is_hadamard(k):
    h = had.base_hadamard(k)
    assert h.shape == (k, k)
    assert set(np.unique(h)) == {-1.0, 1.0}
    np.testing.assert_array_equal(h @ h.T, k * np.eye(k))


def test_all_listed_orders_are_constructed():
    assert had.BASE_SIZES == (12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172)


@pytest.mark.parametrize("n", [1, 2, 64, 128, 12, 48, 768, 1536, 40 * 8, 172 * 2, 156 * 4, 172 * 16])
def test_normalized_matrix_is_orthogonal(n):
    h = had.hadamard_matrix(n)
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-12)
    np.testing.assert_allclose(np.abs(h), 1 / np.sqrt(n), rtol=1e-12)  # flat: every entry has the same size


def test_factors():
    assert had.hadamard_factors(1536) == (12, 128)
    assert had.hadamard_factors(11008) == (172, 64)
    assert had.hadamard_factors(14336) == (28, 512)
    assert had.hadamard_factors(4096) == (1, 4096)


@pytest.mark.parametrize("n", [44, 3, 24 * 7, 1000])
def test_unknown_size_names_the_size(n):
    with pytest.raises(QexportError, match=rf"size {n}\b"):
        had.hadamard_matrix(n)


def test_sylvester_is_symmetric_and_recursive():
    s = had.sylvester(8)
    np.testing.assert_array_equal(s, s.T)
    np.testing.assert_array_equal(s, np.kron(had.sylvester(2), had.sylvester(4)))


@pytest.mark.parametrize("make", [had.random_hadamard, had.random_orthogonal])
def test_random_rotations_are_orthogonal_and_seeded(make):
    a, b, c = make(96, seed=0), make(96, seed=0), make(96, seed=1)
    np.testing.assert_allclose(a @ a.T, np.eye(96), atol=1e-12)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0.1


def test_random_hadamard_is_signed_columns_of_hadamard():
    q = had.random_hadamard(48, seed=3)
    ratio = q / had.hadamard_matrix(48)
    signs = ratio[0]
    assert set(np.unique(np.round(signs, 12))) == {-1.0, 1.0}
    np.testing.assert_allclose(ratio, np.broadcast_to(signs, ratio.shape), atol=1e-12)


def _run_online(n: int, max_dense: int, x: np.ndarray) -> tuple[np.ndarray, list[str]]:
    inp = ir.val("x", ir.DataType.FLOAT, ["batch", "seq", n])
    graph = ir.Graph([inp], [], nodes=[], opset_imports={"": 21}, name="g")
    nodes, out = had.online_hadamard_nodes(graph, inp, n, np.float32, prefix="t", max_dense=max_dense)
    graph.extend(nodes)
    out.name = "y"
    graph.outputs.append(out)
    proto = ir.serde.serialize_model(ir.Model(graph, ir_version=10))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0], [node.op_type for node in nodes]


@pytest.mark.parametrize(("n", "max_dense", "ops"), [
    (64, 256, ["MatMul"]),
    (48, 256, ["MatMul"]),
    (1536, 256, ["Shape", "Reshape", "MatMul", "MatMul", "Reshape"]),
    (512, 64, ["Shape", "Reshape", "MatMul", "MatMul", "Reshape"]),
    (172 * 4, 64, ["Shape", "Reshape", "MatMul", "MatMul", "Reshape"]),
])
def test_online_nodes_match_matrix(n, max_dense, ops):
    x = np.random.default_rng(0).standard_normal((2, 3, n)).astype(np.float32)
    got, op_types = _run_online(n, max_dense, x)
    assert op_types == ops
    expected = x.astype(np.float64) @ had.hadamard_matrix(n)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_online_constants_are_shared():
    graph = ir.Graph([ir.val("x", ir.DataType.FLOAT, [2, 1536]), ir.val("z", ir.DataType.FLOAT, [2, 1536])], [],
                     nodes=[], opset_imports={"": 21})
    had.online_hadamard_nodes(graph, graph.inputs[0], 1536, np.float32, prefix="a")
    count = len(graph.initializers)
    had.online_hadamard_nodes(graph, graph.inputs[1], 1536, np.float32, prefix="b")
    assert len(graph.initializers) == count == 3
