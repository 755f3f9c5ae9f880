"""Hadamard and random orthogonal matrices, and graph nodes that apply a Hadamard transform online.

A normalized Hadamard matrix of size n exists here when n = K * 2^k with K = 1 (Sylvester) or K one of
``BASE_SIZES``. Base matrices are built in this module:

- Paley I (q prime, q = 3 mod 4): order q + 1, for 12, 20, 60, 108, 140;
- Paley II (q prime power, q = 1 mod 4): order 2(q + 1), for 28, 36, 52 (GF(25));
- Sylvester doubling of H_20 for 40;
- Goethals-Seidel arrays of four circulants for 156 = 4 * 39 and 172 = 4 * 43. The circulants' first rows
  were found by a tabu search for four +-1 sequences whose periodic autocorrelations sum to zero; they are
  data, checked by ``H Hᵀ = n I`` in the tests.

All matrices are float64. ``hadamard_matrix(n)`` is deterministic, so an online transform built from it and
an offline fold built from it always agree.
"""

from __future__ import annotations

import enum
import functools
import logging

import numpy as np
import onnx_ir as ir

from qexport.errors import QexportError
from qexport.passes.metadata import Meta

log = logging.getLogger(__name__)

# First rows of the four circulants A, B, C, D with A Aᵀ + B Bᵀ + C Cᵀ + D Dᵀ = 4n I.
_GS_ROWS: dict[int, tuple[str, str, str, str]] = {
    39: (
        "+--+--+++-+++++--++----+-+--++++-+---++",
        "----+-+++-++--++-+-+-++-++-+----+++---+",
        "+++-+-+--++--+--------++++-------+-+---",
        "-+-++--++-+-++-++++---+-+-----+--+---+-",
    ),
    43: (
        "+-+++--+++++-++--++-+++---+----+--++-+-++++",
        "--+-+++----++-+++-+++-+++-----+-+-++---+-+-",
        "-----+-+--+-++---+------+-+-++++-+---++-+--",
        "+++--++--+-+--++++-----++-++-++-+--+-++---+",
    ),
}

# Base order K -> (construction, parameter).
_BASES: dict[int, tuple[str, int]] = {
    12: ("paley1", 11),
    20: ("paley1", 19),
    28: ("paley2", 13),
    36: ("paley2", 17),
    40: ("double", 20),
    52: ("paley2", 25),
    60: ("paley1", 59),
    108: ("paley1", 107),
    140: ("paley1", 139),
    156: ("goethals_seidel", 39),
    172: ("goethals_seidel", 43),
}
BASE_SIZES: tuple[int, ...] = tuple(sorted(_BASES))


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _field_squares(q: int) -> tuple[list[tuple[int, int]], set[tuple[int, int]], int]:
    """Elements of GF(q) for q = p or p^2 as pairs (a, b) = a + b w, w^2 = r; returns elements, nonzero squares, p."""
    for p in range(2, q + 1):
        if q == p or q == p * p:
            if all(p % d for d in range(2, p)):
                break
    else:
        raise QexportError(f"GF({q}) is not supported: only primes and squares of primes")
    if q == p:
        elements = [(a, 0) for a in range(p)]
        return elements, {((a * a) % p, 0) for a in range(1, p)}, p
    r = next(x for x in range(2, p) if pow(x, (p - 1) // 2, p) == p - 1)  # a non-residue mod p

    def mul(x: tuple[int, int], y: tuple[int, int]) -> tuple[int, int]:
        return ((x[0] * y[0] + r * x[1] * y[1]) % p, (x[0] * y[1] + x[1] * y[0]) % p)

    elements = [(a, b) for a in range(p) for b in range(p)]
    return elements, {mul(e, e) for e in elements if e != (0, 0)}, p


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = chi(x_i - x_j), chi the quadratic character of GF(q)."""
    elements, squares, p = _field_squares(q)
    jac = np.zeros((q, q))
    for i, x in enumerate(elements):
        for j, y in enumerate(elements):
            d = ((x[0] - y[0]) % p, (x[1] - y[1]) % p)
            jac[i, j] = 0.0 if d == (0, 0) else (1.0 if d in squares else -1.0)
    return jac


def _paley1(q: int) -> np.ndarray:
    core = np.zeros((q + 1, q + 1))
    core[0, 1:], core[1:, 0], core[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
    return np.eye(q + 1) + core


def _paley2(q: int) -> np.ndarray:
    conference = np.zeros((q + 1, q + 1))
    conference[0, 1:], conference[1:, 0], conference[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
    return np.kron(conference, np.array([[1.0, 1.0], [1.0, -1.0]])) + np.kron(
        np.eye(q + 1), np.array([[1.0, -1.0], [-1.0, -1.0]])
    )


def _goethals_seidel(n: int) -> np.ndarray:
    def circulant(row: str) -> np.ndarray:
        first = np.array([1.0 if c == "+" else -1.0 for c in row])
        return np.stack([np.roll(first, i) for i in range(n)])

    a, b, c, d = (circulant(row) for row in _GS_ROWS[n])
    r = np.eye(n)[::-1]
    return np.block([
        [a, b @ r, c @ r, d @ r],
        [-b @ r, a, d.T @ r, -c.T @ r],
        [-c @ r, -d.T @ r, a, b.T @ r],
        [-d @ r, c.T @ r, -b.T @ r, a],
    ])


@functools.lru_cache(maxsize=None)
def base_hadamard(k: int) -> np.ndarray:
    """The unnormalized (+-1) base Hadamard matrix of order ``k``, one of ``BASE_SIZES``."""
    if k not in _BASES:
        raise QexportError(f"no base Hadamard matrix of order {k}; known orders: {', '.join(map(str, BASE_SIZES))}")
    kind, param = _BASES[k]
    if kind == "paley1":
        matrix = _paley1(param)
    elif kind == "paley2":
        matrix = _paley2(param)
    elif kind == "double":
        matrix = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), base_hadamard(param))
    else:
        matrix = _goethals_seidel(param)
    matrix.setflags(write=False)
    return matrix


def sylvester(m: int) -> np.ndarray:
    """The unnormalized Sylvester Hadamard matrix of order ``m`` (a power of two)."""
    if not _is_power_of_two(m):
        raise QexportError(f"Sylvester Hadamard matrices need a power of two, got {m}")
    matrix = np.ones((1, 1))
    while matrix.shape[0] < m:
        matrix = np.block([[matrix, matrix], [matrix, -matrix]])
    return matrix


def hadamard_factors(n: int) -> tuple[int, int]:
    """Split ``n`` into (K, 2^k) with K = 1 or a base order; raises a ``QexportError`` naming ``n`` if impossible."""
    if _is_power_of_two(n):
        return 1, n
    for k in sorted(_BASES, reverse=True):
        if n % k == 0 and _is_power_of_two(n // k):
            return k, n // k
    raise QexportError(
        f"no Hadamard matrix of size {n} is known here: the size must be 2^k or K * 2^k with K in "
        f"{', '.join(map(str, BASE_SIZES))}"
    )


def unnormalized_hadamard(n: int) -> np.ndarray:
    """H_K ⊗ H_{2^k} with +-1 entries, so ``H Hᵀ = n I``."""
    k, m = hadamard_factors(n)
    return sylvester(m) if k == 1 else np.kron(base_hadamard(k), sylvester(m))


def hadamard_matrix(n: int) -> np.ndarray:
    """The normalized (orthogonal) Hadamard matrix of size ``n``, float64."""
    return unnormalized_hadamard(n) / np.sqrt(n)


def random_hadamard(n: int, seed: int) -> np.ndarray:
    """H diag(+-1) / sqrt(n) with seeded random signs: orthogonal, and flat like a Hadamard matrix."""
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=n)
    return unnormalized_hadamard(n) * signs[None, :] / np.sqrt(n)


def random_orthogonal(n: int, seed: int) -> np.ndarray:
    """A Haar-random orthogonal matrix: QR of a seeded Gaussian, with the signs of R's diagonal moved into Q."""
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q * np.sign(np.diag(r))[None, :]


class Rotation(enum.Enum):
    """Which orthogonal matrix a rotation pass uses."""

    HADAMARD = "hadamard"  # hadamard_matrix(n): deterministic
    RANDOM_HADAMARD = "random_hadamard"  # H diag(+-1) / sqrt(n), seeded
    ORTHOGONAL = "orthogonal"  # Haar-random, seeded; any size


def rotation_matrix(kind: Rotation, n: int, seed: int = 0) -> np.ndarray:
    """The float64 n x n orthogonal matrix of ``kind`` (``seed`` is ignored for the plain Hadamard)."""
    if kind is Rotation.HADAMARD:
        return hadamard_matrix(n)
    if kind is Rotation.RANDOM_HADAMARD:
        return random_hadamard(n, seed)
    return random_orthogonal(n, seed)


def _const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """An initializer of ``graph``, reused when one of that name already holds the same array."""
    existing = graph.initializers.get(name)
    if existing is not None and existing.const_value is not None:
        if np.array_equal(existing.const_value.numpy(), array):
            return existing
        raise QexportError(f"initializer {name!r} exists with different contents")
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def online_hadamard_nodes(
    graph: ir.Graph, x: ir.Value, n: int, dtype: np.dtype, prefix: str, max_dense: int = 256
) -> tuple[list[ir.Node], ir.Value]:
    """Nodes computing ``x @ hadamard_matrix(n)`` over the last axis of ``x``; returns (nodes, output).

    Up to ``max_dense`` the transform is one MatMul with an n x n constant. Above it, n = a * b with
    b = 2^j <= max_dense and H_n = H_a ⊗ H_b, so ``x`` is reshaped to [-1, a, b] and transformed as
    H_aᵀ X H_b (two small MatMuls), then reshaped back to the shape of ``x``. Constants are named by
    size and shared between calls. The nodes are not inserted: the caller places them.
    """
    k, m = hadamard_factors(n)
    if n <= max_dense:
        matrix = _const(graph, f"qexport.hadamard.{n}", hadamard_matrix(n).astype(dtype))
        node = ir.node("MatMul", [x, matrix], name=f"{prefix}/hadamard")
        return _named([node]), node.outputs[0]
    b = min(m, max_dense)
    while b > 1 and b * b > n:  # balance the two factors: cost is n * (a + b)
        b //= 2
    a = n // b
    left = (np.kron(base_hadamard(k), sylvester(m // b)) if k > 1 else sylvester(a)) / np.sqrt(a)
    h_left = _const(graph, f"qexport.hadamard.{a}.T", left.T.astype(dtype))
    h_right = _const(graph, f"qexport.hadamard.{b}", hadamard_matrix(b).astype(dtype))
    split = _const(graph, f"qexport.hadamard.shape.{a}x{b}", np.array([-1, a, b], dtype=np.int64))
    shape = ir.node("Shape", [x], name=f"{prefix}/hadamard_shape")
    reshape = ir.node("Reshape", [x, split], name=f"{prefix}/hadamard_split")
    right = ir.node("MatMul", [reshape.outputs[0], h_right], name=f"{prefix}/hadamard_right")
    lhs = ir.node("MatMul", [h_left, right.outputs[0]], name=f"{prefix}/hadamard_left")
    merge = ir.node("Reshape", [lhs.outputs[0], shape.outputs[0]], name=f"{prefix}/hadamard_merge")
    log.debug("online Hadamard %d = %d x %d (K=%d) at %s", n, a, b, k, prefix)
    return _named([shape, reshape, right, lhs, merge]), merge.outputs[0]


def block_hadamard_nodes(graph: ir.Graph, x: ir.Value, n: int, block: int, dtype: np.dtype, prefix: str
                         ) -> tuple[list[ir.Node], ir.Value]:
    """Nodes computing ``x @ (I_{n/block} ⊗ H_block)`` over the last axis of ``x``: Reshape -> MatMul -> Reshape,
    n * block multiply-adds per row; tagged and not inserted, like :func:`online_hadamard_nodes`."""
    h = _const(graph, f"qexport.hadamard.{block}", hadamard_matrix(block).astype(dtype))  # as the full form names it
    split = _const(graph, f"qexport.hadamard.shape.{n // block}x{block}.block", np.array([-1, n // block, block], np.int64))
    shape = ir.node("Shape", [x], name=f"{prefix}/hadamard_shape")
    reshape = ir.node("Reshape", [x, split], name=f"{prefix}/hadamard_split")
    matmul = ir.node("MatMul", [reshape.outputs[0], h], name=f"{prefix}/hadamard_block")
    merge = ir.node("Reshape", [matmul.outputs[0], shape.outputs[0]], name=f"{prefix}/hadamard_merge")
    return _named([shape, reshape, matmul, merge]), merge.outputs[0]


def _named(nodes: list[ir.Node]) -> list[ir.Node]:
    """Name each output after its node, and tag the nodes so passes can recognise them."""
    for node in nodes:
        node.outputs[0].name = f"{node.name}:0"
        node.metadata_props[Meta.ONLINE_HADAMARD] = str(node.op_type)
    return nodes
