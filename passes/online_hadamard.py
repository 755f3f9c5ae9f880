"""R4: an online Hadamard transform on the down_proj (fc2) input, undone in the down_proj weight."""

from __future__ import annotations

import dataclasses
import fnmatch
import logging

import onnx_ir as ir

from qexport.passes import sites
from qexport.passes._util import write_weight
from qexport.passes.hadamard import hadamard_factors, hadamard_matrix, online_hadamard_nodes

log = logging.getLogger(__name__)

TAG = "qexport.online_hadamard"  # set on the inserted nodes by online_hadamard_nodes


@dataclasses.dataclass(frozen=True)
class OnlineHadamardPass(ir.passes.InPlacePass):
    """Insert x -> x H before each matched down_proj / fc2 and fold Hᵀ into its weight (QuaRot, SpinQuant R4).

    Rewrite cases, for each up -> down site whose name matches ``sites`` (n = intermediate size):

    1. n <= ``max_dense``: one ``MatMul(x, H)`` with a shared n x n constant;
    2. larger n (SmolLM2's 1536 = 12 x 128): H = H_a ⊗ H_b applied as Reshape -> MatMul -> MatMul -> Reshape,
       costing n (a + b) instead of n² multiply-adds (see :func:`~qexport.passes.hadamard.online_hadamard_nodes`);
    3. the down weight W [n, hidden] becomes Hᵀ W (float64), so (x H)(Hᵀ W) = x W.

    The inserted nodes carry ``metadata_props["qexport.online_hadamard"]``: the dense MatMul(x, H) looks like
    a weight linear to site matching, so quantization passes should skip (or deliberately handle) it.

    n must be 2^k or K * 2^k for a known Hadamard order K; other sizes raise a :class:`QexportError` naming
    n before anything changes. Sites whose "down" is a tagged Hadamard node are skipped, so a second run
    reports no change. Run it after any up -> down smoothing, which needs the original site.
    """

    sites: str = "*"
    max_dense: int = 256

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        chosen = [
            s for s in sites.find_up_down_sites(graph)
            if fnmatch.fnmatchcase(s.name, self.sites) and TAG not in s.down.node.metadata_props
        ]
        for site in chosen:
            hadamard_factors(site.down.in_features)  # fail before the first rewrite
        for site in chosen:
            down = site.down
            n = down.in_features
            dtype = down.weight.const_value.numpy().dtype
            nodes, out = online_hadamard_nodes(graph, down.input, n, dtype, f"{site.name}.r4", self.max_dense)
            if down.input.type is not None:
                out.type, out.shape = down.input.type, down.input.shape
            graph.insert_before(down.node, nodes)
            down.node.replace_input_with(0, out)
            write_weight(graph, down, hadamard_matrix(n).T @ down.weight_in_out())
            log.debug("online Hadamard (%d) before %s", n, down.node.name)
        if chosen:
            log.info("inserted %d online Hadamard transforms", len(chosen))
        return ir.passes.PassResult(model, bool(chosen))
