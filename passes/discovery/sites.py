"""Pure pattern matching for the rewrite sites of an exported causal LM; nothing here mutates a graph.

Spellings matched (read off the dynamo exports of the llama, qwen2, gemma3 and opt families):

* **Linear**: ``MatMul(x, B)`` with ``B`` an [in, out] initializer, ``MatMul(x, Transpose(E))`` with ``E`` an
  [out, in] initializer (tied lm_head), or ``Gemm(x, B[, C])`` (alpha = beta = 1, transA = 0); an optional
  ``Add(y, b)`` with ``b`` a 1-D initializer right after a MatMul is its bias.
* **Norm**: the decomposed RMSNorm chain ``Pow(x, 2) | Mul(x, x) -> ReduceMean -> Add(eps) -> Sqrt ->
  Reciprocal -> Mul(x, .)`` (or ``Div(x, Sqrt)``) then ``Mul(gamma)`` with gamma on either side (Gemma3 stores
  its (1 + w) already folded as one initializer), Casts allowed around it; the fused ``LayerNormalization``,
  ``SimplifiedLayerNormalization``, ``RMSNormalization`` and ``Skip(Simplified)LayerNormalization`` ops.
* **Sites**: a norm whose output feeds only linears (q/k/v, gate/up, fc1, lm_head); v -> o through the
  attention (GQA repeat included); up -> down through ``Mul(act(gate), up)`` or a ReLU (OPT fc1 -> fc2).

Linear and norm matching live in :mod:`qexport.passes.discovery.graph_match`, the residual stream in
:mod:`qexport.passes.discovery.residual`; their public names are re-exported here. Layer indices count the
attention ``Softmax`` nodes before a site. Matches hold node references and go
stale once a pass rewrites the graph: find them again after each pass.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterable, Sequence

import numpy as np
import onnx_ir as ir

from qexport.errors import PatternNotFoundError
from qexport.passes._ir import channel_readers, node_order, reaches
from qexport.passes.discovery.graph_match import (  # noqa: F401  (re-exported: the sites API keeps these names)
    ACTIVATIONS, POSITIVE_HOMOGENEOUS, Linear, Norm, NormKind, _trace_up, find_norms, is_online_transform,
    linear_producing, match_linear,
)
from qexport.passes.discovery.names import NameFilter
from qexport.passes.discovery.residual import ResidualBlock, ResidualStream, find_residual_stream  # noqa: F401

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class NormSite:
    """A norm whose output feeds only weight linears. ``role``: "attn" (q/k/v), "mlp" (gate/up, fc1), "lm_head"."""

    name: str
    layer: int | None
    role: str
    norm: Norm
    linears: tuple[Linear, ...]

    @property
    def activation(self) -> ir.Value:
        return self.norm.output


@dataclasses.dataclass(frozen=True)
class VOSite:
    """v_proj -> attention -> o_proj. Query head h reads KV head h // (num_heads // num_kv_heads)."""

    name: str
    layer: int | None
    v: Linear
    o: Linear
    head_dim: int
    num_heads: int
    num_kv_heads: int

    @property
    def activation(self) -> ir.Value:
        return self.o.input

    def o_to_v_channel(self) -> np.ndarray:
        """For each o_proj input channel, the v_proj output channel it carries (GQA repeat)."""
        group = self.num_heads // self.num_kv_heads
        j = np.arange(self.num_heads * self.head_dim)
        return (j // self.head_dim // group) * self.head_dim + j % self.head_dim


@dataclasses.dataclass(frozen=True)
class UpDownSite:
    """up -> Mul(act(gate), up) -> down, or fc1 -> ReLU -> fc2 (``gate`` None, ``act`` the ReLU)."""

    name: str
    layer: int | None
    up: Linear
    down: Linear
    gate: Linear | None
    act: ir.Node

    @property
    def activation(self) -> ir.Value:
        return self.down.input


Site = NormSite | VOSite | UpDownSite


@dataclasses.dataclass(frozen=True)
class SiteMap:
    """All sites of a model, in graph order."""

    norm_sites: tuple[NormSite, ...]
    v_o: tuple[VOSite, ...]
    up_down: tuple[UpDownSite, ...]

    @property
    def all(self) -> tuple[Site, ...]:
        return (*self.norm_sites, *self.v_o, *self.up_down)

    def select(self, names: NameFilter) -> list[Site]:
        """The sites, in graph order, whose name ``names`` matches (e.g. ``NameFilter(("layers.*.up_down",))``)."""
        return [s for s in self.all if names.matches(s.name)]

    def require(self, num_layers: int, kinds: Sequence[str] = ("attn_norm", "mlp_norm", "v_o", "up_down")) -> None:
        """Raise :class:`PatternNotFoundError` naming every expected site that was not found."""
        found = {s.name for s in self.all}
        expected = [f"layers.{i}.{k}" for i in range(num_layers) for k in kinds if k != "final_norm"]
        expected += ["final_norm"] if "final_norm" in kinds else []
        missing = [name for name in expected if name not in found]
        if missing:
            raise PatternNotFoundError(
                f"sites not found in the graph: {', '.join(missing)}; "
                "enable DEBUG logging for passes.sites to see why candidates were rejected"
            )


def _layer_of(node: ir.Node, softmaxes: list[int], order: dict[ir.Node, int], before_attention: bool) -> int | None:
    if not softmaxes:
        return None
    count = sum(1 for s in softmaxes if s < order[node])
    return count if before_attention else count - 1


def _feeds_heads(linear: Linear, depth: int = 3) -> bool:
    """Whether the linear's output reaches a Reshape (the head split) through bias/scale ops."""
    frontier = [linear.output]
    for _ in range(depth):
        nxt = []
        for v in frontier:
            for c in v.consumers():
                if c.op_type == "Reshape" and not is_online_transform(c):
                    return True
                if c.op_type in ("Add", "Mul", "Cast"):
                    nxt += list(c.outputs)
        frontier = nxt
    return False


def find_norm_sites(graph: ir.Graph, norms: Iterable[Norm] | None = None) -> list[NormSite]:
    """Norms whose output feeds only weight linears (as their input A), named by role and layer."""
    order = node_order(graph)
    softmaxes = [i for n, i in order.items() if n.op_type == "Softmax"]
    sites, counts = [], {"attn": 0, "mlp": 0}
    for norm in norms if norms is not None else find_norms(graph):
        readers = channel_readers(norm.output)
        linears = [match_linear(c) for c, _ in readers]
        if not readers or all(lin is None for lin in linears):
            log.debug("norm ending at %s feeds no weight linear", norm.nodes[-1].name)
            continue
        bad = [c.name for (c, read), lin in zip(readers, linears) if lin is None or lin.input is not read]
        if bad or norm.output.is_graph_output():
            log.debug("norm ending at %s rejected: also feeds non-linear consumers %s", norm.nodes[-1].name, bad)
            continue
        if any(lin.output.is_graph_output() for lin in linears):
            sites.append(NormSite("final_norm", None, "lm_head", norm, tuple(linears)))
            continue
        role = "attn" if any(_feeds_heads(lin) for lin in linears) else "mlp"
        layer = _layer_of(norm.nodes[-1], softmaxes, order, before_attention=role == "attn")
        layer = counts[role] if layer is None else layer
        counts[role] += 1
        sites.append(NormSite(f"layers.{layer}.{role}_norm", layer, role, norm, tuple(linears)))
    return sites


def infer_head_dim(graph: ir.Graph) -> int | None:
    """head_dim read off the static last axis of the KV-cache inputs or outputs, if there is one."""
    for v in (*graph.inputs, *graph.outputs):
        if (".value" in v.name or ".key" in v.name) and v.shape is not None and len(v.shape) == 4:
            if isinstance(v.shape[3], int):
                return v.shape[3]
    return None


def find_v_o_sites(graph: ir.Graph, head_dim: int | None = None) -> list[VOSite]:
    """v_proj -> softmax(QK)V -> o_proj per layer; ``head_dim`` is read off the KV cache when not given."""
    head_dim = head_dim or infer_head_dim(graph)
    order = node_order(graph)
    softmaxes = [i for n, i in order.items() if n.op_type == "Softmax"]
    sites: list[VOSite] = []
    for node in graph:
        o = match_linear(node)
        if o is None:
            continue
        av = _trace_up(o.input).producer()
        if av is None or av.op_type != "MatMul" or match_linear(av) is not None:
            continue
        if not reaches(av.inputs[0], ("Softmax",), depth=4):
            log.debug("v_o candidate %s rejected: its input MatMul %s does not read a Softmax", node.name, av.name)
            continue
        v = linear_producing(_trace_up(av.inputs[1]))
        if v is None:
            log.debug("v_o candidate %s rejected: V of %s does not come from a weight linear", node.name, av.name)
            continue
        if head_dim is None:
            raise PatternNotFoundError("head_dim is not static in the KV-cache shapes; pass head_dim to find v_o sites")
        if v.out_features % head_dim or o.in_features % v.out_features:
            log.debug("v_o candidate %s rejected: widths v=%d o=%d, head_dim %d", node.name, v.out_features, o.in_features, head_dim)
            continue
        if len(v.output.consumers()) != 1:
            log.debug("v_o candidate %s rejected: v output has %d consumers", node.name, len(v.output.consumers()))
            continue
        layer = _layer_of(node, softmaxes, order, before_attention=False)
        sites.append(VOSite(f"layers.{layer}.v_o", layer, v, o, head_dim, o.in_features // head_dim, v.out_features // head_dim))
    return sites


def find_up_down_sites(graph: ir.Graph) -> list[UpDownSite]:
    """up -> Mul(act(gate), up) -> down (gated MLP) and fc1 -> ReLU -> fc2 per layer."""
    order = node_order(graph)
    softmaxes = [i for n, i in order.items() if n.op_type == "Softmax"]
    sites: list[UpDownSite] = []
    for node in graph:
        down = match_linear(node)
        if down is None or (p := down.input.producer()) is None:
            continue
        up = gate = act = None
        if p.op_type in POSITIVE_HOMOGENEOUS:
            up, act = linear_producing(p.inputs[0]), p
        elif p.op_type == "Mul" and len(p.inputs) == 2:
            ups = [linear_producing(i) for i in p.inputs]
            if sum(u is not None for u in ups) == 1:
                k = 0 if ups[0] is not None else 1
                up, gate, act = ups[k], *_gate_of(p.inputs[1 - k])
        if up is None or act is None or (gate is None and act.op_type not in POSITIVE_HOMOGENEOUS):
            log.debug("up_down candidate %s rejected: input is not Mul(act(gate), up) nor ReLU(fc1)", node.name)
            continue
        if len(up.output.consumers()) != 1:
            log.debug("up_down candidate %s rejected: up output has other consumers", node.name)
            continue
        layer = _layer_of(node, softmaxes, order, before_attention=False)
        sites.append(UpDownSite(f"layers.{layer}.up_down", layer, up, down, gate, act))
    return sites


def _gate_of(value: ir.Value) -> tuple[Linear | None, ir.Node | None]:
    """(gate linear, activation node) for act(gate): Gelu/Relu/... or SiLU spelled Mul(g, Sigmoid(g))."""
    p = value.producer()
    if p is None:
        return None, None
    if p.op_type in ACTIVATIONS:
        return linear_producing(p.inputs[0]), p
    if p.op_type == "Mul":
        for a, b in (p.inputs, reversed(p.inputs)):
            s = b.producer()
            if s is not None and s.op_type == "Sigmoid" and s.inputs[0] is a:
                return linear_producing(a), p
    return None, None


def find_sites(model: ir.Model, head_dim: int | None = None) -> SiteMap:
    """All norm, v_o and up_down sites of ``model``."""
    graph = model.graph
    found = SiteMap(tuple(find_norm_sites(graph)), tuple(find_v_o_sites(graph, head_dim)), tuple(find_up_down_sites(graph)))
    names = [site.name for site in found.all]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:  # statistics and passes address sites by name: an ambiguous name would mix two sites up
        raise PatternNotFoundError(f"site names are ambiguous in this graph: {', '.join(duplicates)}")
    return found


def consumer_weight(site: Site) -> np.ndarray:
    """The [in, out] weight reading the site's activation (q/k/v or gate/up concatenated)."""
    if isinstance(site, NormSite):
        return np.concatenate([linear.weight_in_out() for linear in site.linears], axis=1)
    if isinstance(site, VOSite):
        return site.o.weight_in_out()
    return site.down.weight_in_out()
