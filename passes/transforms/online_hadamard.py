"""R4: an online Hadamard transform on the down_proj (fc2) input, undone in the down_proj weight."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from qexport.errors import RecipeError
from qexport.passes.discovery import sites
from qexport.passes.discovery.names import NameFilter, check_glob_fields
from qexport.passes._ir import write_weight
from qexport.passes.metadata import Meta
from qexport.passes.transforms.hadamard import block_hadamard_nodes, hadamard_factors, hadamard_matrix, online_hadamard_nodes

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class OnlineHadamardPass(ir.passes.InPlacePass):
    """Insert x -> x H before each matched down_proj / fc2 and fold Hᵀ into its weight (QuaRot, SpinQuant R4).

    Rewrite cases, for each up -> down site whose name matches a glob of ``sites`` (n = intermediate size):

    1. n <= ``max_dense``: one ``MatMul(x, H)`` with a shared n x n constant;
    2. larger n (e.g. 1536 = 12 x 128): H = H_a ⊗ H_b applied as Reshape -> MatMul -> MatMul -> Reshape,
       costing n (a + b) instead of n² multiply-adds (see :func:`~qexport.passes.transforms.hadamard.online_hadamard_nodes`);
    3. the down weight W [n, hidden] becomes Hᵀ W (float64), so (x H)(Hᵀ W) = x W.

    The inserted nodes carry ``metadata_props["qexport.online_hadamard"]``: the dense MatMul(x, H) looks like
    a weight linear to site matching, so quantization passes should skip (or deliberately handle) it.

    ``block`` = b > 0 applies the block-diagonal I_{n/b} ⊗ H_b instead (b a power of two dividing n): one
    ``Reshape -> MatMul(., H_b) -> Reshape``, n b multiply-adds, cheaper than case 2 but spreading an outlier
    over b channels only (still orthogonal, so the float graph is unchanged either way).

    n must be 2^k or K * 2^k for a known Hadamard order K (or divisible by ``block``); other sizes raise a
    :class:`QexportError` naming n before anything changes. Sites whose "down" is a tagged Hadamard node are skipped, so a second run
    reports no change. Run it after any up -> down smoothing, which needs the original site.
    """

    sites: tuple[str, ...] = ("*",)
    max_dense: int = 256
    block: int = 0  # 0: the full n x n Hadamard; b > 0: I_{n/b} ⊗ H_b

    def __post_init__(self) -> None:
        check_glob_fields(self, "online-hadamard", "sites")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, names = model.graph, NameFilter(self.sites)
        chosen = [
            s for s in sites.find_up_down_sites(graph)
            if names.matches(s.name) and Meta.ONLINE_HADAMARD not in s.down.node.metadata_props
        ]
        if self.block and (self.block < 2 or self.block & (self.block - 1)):
            raise RecipeError(f"online-hadamard block {self.block} is not a power of two >= 2; use e.g. 32, or 0 (full)")
        for site in chosen:
            if self.block and site.down.in_features % self.block:
                raise RecipeError(f"online-hadamard block {self.block} does not divide {site.name}'s width "
                                  f"{site.down.in_features}; choose a power of two that does, or 0 (full)")
            elif not self.block:
                hadamard_factors(site.down.in_features)  # fail before the first rewrite
        for site in chosen:
            down = site.down
            n = down.in_features
            dtype = down.weight.const_value.numpy().dtype
            if self.block:
                nodes, out = block_hadamard_nodes(graph, down.input, n, self.block, dtype, f"{site.name}.r4")
                matrix = np.kron(np.eye(n // self.block), hadamard_matrix(self.block))
            else:
                nodes, out = online_hadamard_nodes(graph, down.input, n, dtype, f"{site.name}.r4", self.max_dense)
                matrix = hadamard_matrix(n)
            if down.input.type is not None:
                out.type, out.shape = down.input.type, down.input.shape
            graph.insert_before(down.node, nodes)
            down.node.replace_input_with(0, out)
            write_weight(graph, down, matrix.T @ down.weight_in_out())
            log.debug("online Hadamard (%d) before %s", n, down.node.name)
        if chosen:
            log.info("inserted %d online Hadamard transforms", len(chosen))
        return ir.passes.PassResult(model, bool(chosen))
