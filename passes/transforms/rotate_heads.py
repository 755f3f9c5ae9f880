"""R2: rotate each attention head's values by a head_dim x head_dim orthogonal matrix folded into v and o."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from qexport.passes.discovery import sites
from qexport.passes.discovery.names import NameFilter, check_glob_fields
from qexport.passes._ir import write_bias, write_weight
from qexport.passes.metadata import Meta
from qexport.passes.transforms.hadamard import Rotation, rotation_matrix

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RotateHeadsPass(ir.passes.InPlacePass):
    """Rotate v per KV head and undo it in o_proj per query head (QuaRot's offline V/O Hadamard, SpinQuant R2).

    Rewrite cases, for each v -> o site whose name matches a glob of ``sites`` (R the same for every head and layer):

    1. v_proj: each KV head's output block v_h becomes v_h R (columns of W_v and entries of b_v per block);
    2. o_proj: each query head's input block reads the rotated values of its KV head (GQA repeats them
       unchanged), so its rows become Rᵀ W_o[block].

    Attention mixes value vectors only across tokens, so softmax(QKᵀ) V R = (softmax(QKᵀ) V) R and the
    outputs are unchanged. The KV cache holds the rotated values: ``present.*.value`` differ from the
    unrotated model, and a past fed back must come from the rotated model. Rotated o_proj nodes are tagged
    in ``metadata_props``, so a second run reports no change.
    """

    rotation: Rotation = Rotation.HADAMARD
    seed: int = 0
    sites: tuple[str, ...] = ("*",)

    def __post_init__(self) -> None:
        check_glob_fields(self, "rotate-heads", "sites")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, modified, names = model.graph, False, NameFilter(self.sites)
        for site in sites.find_v_o_sites(graph):
            if not names.matches(site.name):
                continue
            if Meta.ROTATE_HEADS in site.o.node.metadata_props:
                log.debug("%s already rotated", site.name)
                continue
            rotate_site(graph, site, rotation_matrix(self.rotation, site.head_dim, self.seed))
            site.o.node.metadata_props[Meta.ROTATE_HEADS] = f"{self.rotation.value}:{self.seed}"
            modified = True
        return ir.passes.PassResult(model, modified)


def rotate_site(graph: ir.Graph, site: sites.VOSite, r: np.ndarray) -> None:
    """Fold ``r`` (head_dim x head_dim, orthogonal) into one v -> o pair."""
    hd = site.head_dim
    w_v = site.v.weight_in_out()  # [hidden, kv_heads * hd]
    rows = w_v.shape[0]
    write_weight(graph, site.v, (w_v.reshape(rows, site.num_kv_heads, hd) @ r).reshape(rows, -1))
    b_v = site.v.bias_array()
    if b_v is not None:
        write_bias(graph, site.v, (b_v.reshape(site.num_kv_heads, hd) @ r).reshape(-1))
    w_o = site.o.weight_in_out()  # [heads * hd, hidden]
    cols = w_o.shape[1]
    write_weight(graph, site.o, np.einsum("ji,hjc->hic", r, w_o.reshape(site.num_heads, hd, cols)).reshape(-1, cols))
    log.debug("rotated %s (%d query heads, %d KV heads, head_dim %d)", site.name, site.num_heads, site.num_kv_heads, hd)
