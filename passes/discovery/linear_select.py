"""Which weight linears a quantization pass touches, and their role names (``layers.3.mlp.down``)."""

from __future__ import annotations

import logging

import onnx_ir as ir

from qexport.passes.discovery import sites as site_matching
from qexport.passes.discovery.names import NameFilter
from qexport.passes.metadata import Meta

log = logging.getLogger(__name__)


def linear_names(model: ir.Model) -> dict[ir.Node, str]:
    """Role names of the linears: ``layers.{i}.attn.{q,k,v,o}``, ``layers.{i}.mlp.{gate,up,down}`` (``up``/``down``
    for fc1/fc2) and ``lm_head``; the exporter's own node and weight names are anonymous.

    Attention linears come from the site matcher (norm -> q/k/v, v -> o); the MLP linears of layer i are the
    weight linears between o_proj of layer i and the next attention input in graph order (this still holds
    after rotations, where the MLP sites are no longer matched): two reading one input are gate (the one
    feeding an activation) and up, the next one down. Names recorded on the nodes by :func:`selected_linears`
    (metadata ``qexport.role``, taken while the graph was still float) take precedence, so linears keep their
    names after a quantization pass has dequantized some of them.
    """
    found = site_matching.find_sites(model)
    names: dict[ir.Node, str] = {}
    for site in found.norm_sites:
        if site.role == "lm_head":
            names.update({lin.node: "lm_head" for lin in site.linears})
        elif site.role == "attn":
            roles = ("q", "k", "v") if len(site.linears) == 3 else tuple(f"in{j}" for j in range(len(site.linears)))
            names.update({lin.node: f"layers.{site.layer}.attn.{r}" for lin, r in zip(site.linears, roles)})
    outs = {site.o.node: site.layer for site in found.v_o}
    layer, mlp = None, []
    for node in list(model.graph) + [None]:
        if node is not None and node in outs:
            names[node] = f"layers.{outs[node]}.attn.o"
            layer, mlp = outs[node], []
        elif node is None or node in names:
            if layer is not None:
                names.update(_mlp_roles(mlp, layer))
            layer = None
        elif layer is not None and site_matching.match_linear(node) is not None:
            mlp.append(node)
    names.update({node: node.metadata_props[Meta.ROLE] for node in model.graph if Meta.ROLE in node.metadata_props})
    return names


def _mlp_roles(nodes: list[ir.Node], layer: int) -> dict[ir.Node, str]:
    if len(nodes) == 3 and nodes[0].inputs[0] is nodes[1].inputs[0]:
        gate_first = any(c.op_type in site_matching.ACTIVATIONS or c.op_type == "Sigmoid"
                         for c in nodes[0].outputs[0].consumers())
        roles = ("gate", "up", "down") if gate_first else ("up", "gate", "down")
    elif len(nodes) == 2:
        roles = ("up", "down")
    else:
        roles = tuple(str(j) for j in range(len(nodes)))
    return {node: f"layers.{layer}.mlp.{role}" for node, role in zip(nodes, roles)}


def _lm_heads(model: ir.Model) -> set[ir.Node]:
    found = site_matching.find_sites(model)
    heads = {lin.node for s in found.norm_sites if s.role == "lm_head" for lin in s.linears}
    return heads | {v.producer() for v in model.graph.outputs if v.producer() is not None}


def _names(node: ir.Node, weight: ir.Value | None, roles: dict[ir.Node, str]) -> list[str]:
    """The names a linear is selected by: role name (first: the one shown in messages), node name, weight name."""
    return [roles.get(node, ""), node.name or ""] + ([weight.name or ""] if weight is not None else [])


def _selected(node: ir.Node, weight: ir.Value | None, names: NameFilter, include_lm_head: bool, heads: set[ir.Node],
              roles: dict[ir.Node, str]) -> bool:
    """Whether ``names.include`` selects the linear (exclusion is applied apart, see :func:`_excluded`)."""
    if not names.included(*_names(node, weight, roles)):
        log.debug("%s not selected by %r", node.name, list(names.include))
        return False
    if not include_lm_head and node in heads:
        log.debug("%s is lm_head: left in float", node.name)
        return False
    return True


def _dequantized_weight(node: ir.Node) -> ir.Value | None:
    """The stored codes of a MatMul/Gemm whose weight is a quantization pass's DequantizeLinear, else None."""
    if node.op_type not in ("MatMul", "Gemm") or node.domain != "" or len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    b = node.inputs[1].producer()
    return b.inputs[0] if b is not None and b.metadata_props.get(Meta.QUANT) == "weight" else None


def _check_exclude(model: ir.Model, names: NameFilter, include_lm_head: bool, heads: set[ir.Node],
                   roles: dict[ir.Node, str]) -> None:
    """Each ``exclude`` glob must match a linear ``include`` selects (float or with its weight already quantized,
    so a rerun or a ``quantize`` after ``quantize-gptq`` with the same ``exclude`` passes): a typo is an error."""
    candidates = []
    for node in model.graph:
        lin = site_matching.match_linear(node)
        weight = lin.weight if lin is not None else _dequantized_weight(node)
        if weight is not None and _selected(node, weight, names, include_lm_head, heads, roles):
            candidates.append(_names(node, weight, roles))
    names.check_excludes(candidates, what="linears", key="linears", shown_as="role names",
                         note="" if include_lm_head else " (lm_head is never selected without include_lm_head)",
                         hint=" (role names, node names or weight names)")


def selected_linears(model: ir.Model, names: NameFilter, include_lm_head: bool) -> list[site_matching.Linear]:
    """Weight linears (``match_linear``) whose role, node or weight name ``names`` matches; lm_head only if asked.
    An ``exclude`` glob that matches no linear ``names.include`` selects is a :class:`RecipeError`. When any
    linear is selected (the caller is about to quantize it), the role names of all linears are recorded on their
    nodes (metadata ``qexport.role``) for later passes."""
    heads, roles = _lm_heads(model), linear_names(model)
    if names.exclude:
        _check_exclude(model, names, include_lm_head, heads, roles)
    found = [lin for node in model.graph if (lin := site_matching.match_linear(node)) is not None
             and _selected(node, lin.weight, names, include_lm_head, heads, roles)
             and not _excluded(node, lin.weight, names, roles)]
    if found:  # record the role names: once q/k/v or the MLP weights are dequantized, linear_names can no longer
        for node, role in roles.items():  # match them structurally (or names a partly quantized q/k/v wrongly)
            node.metadata_props[Meta.ROLE] = role
    return found


def _excluded(node: ir.Node, weight: ir.Value | None, names: NameFilter, roles: dict[ir.Node, str]) -> bool:
    if names.excluded(*_names(node, weight, roles)):
        log.debug("%s (%s) excluded: left in float", node.name, roles.get(node, "no role name"))
        return True
    return False


def prequantized_linears(model: ir.Model, names: NameFilter, include_lm_head: bool) -> list[ir.Node]:
    """MatMul/Gemm nodes whose weight is already an int8 DequantizeLinear (e.g. from ``quantize-gptq``) and whose
    activation is not quantized yet, selected as :func:`selected_linears` selects."""
    heads, roles = _lm_heads(model), linear_names(model)
    if names.exclude:
        _check_exclude(model, names, include_lm_head, heads, roles)
    found = []
    for node in model.graph:
        weight = _dequantized_weight(node)
        a = node.inputs[0].producer() if weight is not None and node.inputs[0] is not None else None
        if weight is None or (a is not None and Meta.QUANT in a.metadata_props):
            continue
        if _selected(node, weight, names, include_lm_head, heads, roles) and not _excluded(node, weight, names, roles):
            found.append(node)
    return found
