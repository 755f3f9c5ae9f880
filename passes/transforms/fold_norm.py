"""Fold normalization weights (gamma, and LayerNorm beta) into the linears that read the norm."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from qexport.passes.discovery import sites as site_matching
from qexport.passes.discovery.names import NameFilter, check_glob_fields
from qexport.passes._ir import const_f64, set_const_input, write_bias, write_weight

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FoldNormPass(ir.passes.InPlacePass):
    """Fold each norm site's gamma (and beta) into its consumer linears, leaving gamma = 1 and beta = 0.

    Rewrite cases (for every norm site whose name matches a glob of ``sites``, a list):

    1. gamma (decomposed RMSNorm ``Mul(gamma)``, or the scale of LayerNormalization /
       SimplifiedLayerNormalization / RMSNormalization): each consumer's input row j is multiplied by
       gamma_j (torch layout ``W[:, j] *= gamma_j``), then gamma is set to **ones**. The gamma ``Mul`` is kept,
       holding a fresh all-ones initializer for this norm alone, so later passes (smoothing after a
       rotation) find the same pattern and can scale it again. Gemma3's (1 + w) is exported already
       added up as one initializer, so it folds like any gamma.
    2. beta (LayerNormalization bias): each consumer's bias becomes ``b + beta @ W`` (with the original W);
       a consumer without a bias gets one (Gemm C, or a new ``Add`` after the MatMul); beta is set to zeros.
    3. Initializers shared with other uses (the exporter deduplicates equal tensors: all-ones norm
       weights, zero biases, a tied embedding read by lm_head through ``Transpose``) are copied before a
       write; run :class:`UntieEmbeddingsPass` first to give lm_head a plain [hidden, vocab] weight.

    Norms that do not feed only linears (Gemma3's post-norms, q/k head norms) are left alone.
    ``modified`` is False when every matched site already has gamma = 1 and beta = 0, so a second run is a no-op.
    Folding arithmetic is float64; weights keep their dtype.
    """

    sites: tuple[str, ...] = ("*",)

    def __post_init__(self) -> None:
        check_glob_fields(self, "fold-norm", "sites")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, modified, names = model.graph, False, NameFilter(self.sites)
        for site in site_matching.find_norm_sites(graph):
            if names.matches(site.name):
                modified |= fold_site(graph, site)
        return ir.passes.PassResult(model, modified)


def fold_site(graph: ir.Graph, site: site_matching.NormSite) -> bool:
    """Fold one norm site; returns whether anything changed."""
    norm = site.norm
    gamma = None if norm.gamma is None else const_f64(norm.gamma)
    beta = None if norm.beta is None else const_f64(norm.beta)
    fold_gamma = gamma is not None and not np.all(gamma == 1.0)
    fold_beta = beta is not None and np.any(beta != 0.0)
    if not (fold_gamma or fold_beta):
        return False
    for linear in site.linears:
        w = linear.weight_in_out()
        if fold_beta:
            b = linear.bias_array()
            write_bias(graph, linear, (np.zeros(w.shape[1]) if b is None else b) + beta @ w)
        if fold_gamma:
            write_weight(graph, linear, gamma[:, None] * w)
    if fold_gamma:
        set_const_input(graph, norm.gamma_node, norm.gamma_index, np.ones_like(gamma), f"{site.name}.gamma")
    if fold_beta:
        set_const_input(graph, norm.beta_node, norm.beta_index, np.zeros_like(beta), f"{site.name}.beta")
    log.debug("folded %s into %d linears (gamma: %s, beta: %s)", site.name, len(site.linears), fold_gamma, fold_beta)
    return True
