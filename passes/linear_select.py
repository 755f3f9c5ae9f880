"""Which weight linears a quantization pass touches, and their role names (``layers.3.mlp.down``)."""

from __future__ import annotations

import fnmatch
import logging

import onnx_ir as ir

from qexport.passes import sites as site_matching

log = logging.getLogger(__name__)

TAG = "qexport.quant"  # metadata key on nodes inserted by quantization: "weight", "per_token" or "per_tensor"


def linear_names(model: ir.Model) -> dict[ir.Node, str]:
    """Role names of the linears: ``layers.{i}.attn.{q,k,v,o}``, ``layers.{i}.mlp.{gate,up,down}`` (``up``/``down``
    for fc1/fc2) and ``lm_head``; the exporter's own node and weight names are anonymous.

    Attention linears come from the site matcher (norm -> q/k/v, v -> o); the MLP linears of layer i are the
    weight linears between o_proj of layer i and the next attention input in graph order (this still holds
    after rotations, where the MLP sites are no longer matched): two reading one input are gate (the one
    feeding an activation) and up, the next one down.
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


def _selected(node: ir.Node, weight: ir.Value | None, pattern: str, include_lm_head: bool, heads: set[ir.Node],
              roles: dict[ir.Node, str]) -> bool:
    names = [roles.get(node, ""), node.name or ""] + ([weight.name or ""] if weight is not None else [])
    if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
        log.debug("%s not selected by %r", node.name, pattern)
        return False
    if not include_lm_head and node in heads:
        log.debug("%s is lm_head: left in float", node.name)
        return False
    return True


def selected_linears(model: ir.Model, pattern: str, include_lm_head: bool) -> list[site_matching.Linear]:
    """Weight linears (``match_linear``) whose weight or node name matches ``pattern``; lm_head only if asked."""
    heads, roles = _lm_heads(model), linear_names(model)
    return [lin for node in model.graph if (lin := site_matching.match_linear(node)) is not None
            and _selected(node, lin.weight, pattern, include_lm_head, heads, roles)]


def prequantized_linears(model: ir.Model, pattern: str, include_lm_head: bool) -> list[ir.Node]:
    """MatMul/Gemm nodes whose weight is already an int8 DequantizeLinear (e.g. from ``quantize-gptq``) and whose
    activation is not quantized yet."""
    heads, roles = _lm_heads(model), linear_names(model)
    found = []
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gemm") or node.domain != "" or len(node.inputs) < 2:
            continue
        a, b = (v.producer() if v is not None else None for v in node.inputs[:2])
        if b is None or b.metadata_props.get(TAG) != "weight" or (a is not None and TAG in a.metadata_props):
            continue
        if _selected(node, b.inputs[0], pattern, include_lm_head, heads, roles):
            found.append(node)
    return found

