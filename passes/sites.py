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

Layer indices count the attention ``Softmax`` nodes before a site. Matches hold node references and go
stale once a pass rewrites the graph: find them again after each pass.
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import logging
from typing import Iterable, Sequence

import numpy as np
import onnx_ir as ir

from qexport.passes._util import (
    DATA_MOVEMENT, channel_readers, const_array, const_f64, is_token_slice, node_order, reaches, skip_casts_up,
)
from qexport.errors import PatternNotFoundError

log = logging.getLogger(__name__)


class NormKind(enum.Enum):
    RMS_DECOMPOSED = "rms_decomposed"
    LAYER_NORM = "LayerNormalization"
    SIMPLIFIED_LAYER_NORM = "SimplifiedLayerNormalization"
    RMS_NORMALIZATION = "RMSNormalization"
    SKIP_LAYER_NORM = "SkipLayerNormalization"
    SKIP_SIMPLIFIED_LAYER_NORM = "SkipSimplifiedLayerNormalization"


# fused op -> (gamma input index, beta input index or None)
_FUSED = {
    NormKind.LAYER_NORM: (1, 2),
    NormKind.SIMPLIFIED_LAYER_NORM: (1, None),
    NormKind.RMS_NORMALIZATION: (1, None),
    NormKind.SKIP_LAYER_NORM: (2, 3),
    NormKind.SKIP_SIMPLIFIED_LAYER_NORM: (2, None),
}
ACTIVATIONS = frozenset({"Gelu", "Relu", "Sigmoid", "Tanh", "Elu", "Selu", "Softplus", "HardSwish", "Mish", "FastGelu"})
POSITIVE_HOMOGENEOUS = frozenset({"Relu", "LeakyRelu"})  # act(x / s) = act(x) / s for s > 0


@dataclasses.dataclass(frozen=True)
class Linear:
    """A weight linear layer. ``weight`` is the initializer as stored: [in, out] or [out, in] (``layout``)."""

    node: ir.Node
    weight: ir.Value
    layout: str  # "in_out" (MatMul B, Gemm transB=0) or "out_in" (Gemm transB=1, MatMul of Transpose(E))
    transpose: ir.Node | None
    bias: ir.Value | None
    bias_node: ir.Node | None  # the bias Add, or the Gemm itself when its C is the bias
    output: ir.Value  # after the bias

    @property
    def input(self) -> ir.Value:
        return self.node.inputs[0]

    def weight_in_out(self) -> np.ndarray:
        """The weight as a float64 [in, out] matrix (ONNX MatMul layout, W transposed)."""
        w = const_f64(self.weight)
        return w if self.layout == "in_out" else w.T

    def bias_array(self) -> np.ndarray | None:
        return None if self.bias is None else const_f64(self.bias)

    @property
    def in_features(self) -> int:
        return self.weight_in_out().shape[0]

    @property
    def out_features(self) -> int:
        return self.weight_in_out().shape[1]


@dataclasses.dataclass(frozen=True)
class Norm:
    """A normalization; ``gamma``/``beta`` are inputs ``gamma_index``/``beta_index`` of ``gamma_node``/``beta_node``."""

    kind: NormKind
    nodes: tuple[ir.Node, ...]
    input: ir.Value
    output: ir.Value
    gamma_node: ir.Node | None
    gamma_index: int | None
    beta_node: ir.Node | None = None
    beta_index: int | None = None

    @property
    def gamma(self) -> ir.Value | None:
        return None if self.gamma_node is None else self.gamma_node.inputs[self.gamma_index]

    @property
    def beta(self) -> ir.Value | None:
        if self.beta_node is None or self.beta_index is None or len(self.beta_node.inputs) <= self.beta_index:
            return None
        return self.beta_node.inputs[self.beta_index]


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

    def select(self, pattern: str) -> list[Site]:
        """Sites whose name matches the glob ``pattern`` (e.g. ``layers.*.up_down``)."""
        return [s for s in self.all if fnmatch.fnmatchcase(s.name, pattern)]

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


def match_linear(node: ir.Node) -> Linear | None:
    """The weight linear ``node`` is, or ``None`` (activation x activation MatMuls are not linears).

    MatMuls inserted by a pass as online transforms (tagged ``qexport.online_*`` in their metadata, such as
    the R4 Hadamard) have a constant B but are not model weights, so they are not linears either.
    """
    if is_online_transform(node):
        return None
    if node.op_type == "MatMul" and node.domain == "" and len(node.inputs) == 2:
        b = node.inputs[1]
        if b is None:
            return None
        if const_array(b) is not None and b.const_value.numpy().ndim == 2:
            weight, layout, transpose = b, "in_out", None
        elif (t := b.producer()) is not None and t.op_type == "Transpose" and _perm(t) in ((1, 0), None):
            src = t.inputs[0]
            if const_array(src) is None or src.const_value.numpy().ndim != 2:
                return None
            weight, layout, transpose = src, "out_in", t
        else:
            return None
        out = node.outputs[0]
        consumers = out.consumers()
        if len(consumers) == 1 and not out.is_graph_output():
            add = consumers[0]
            if add.op_type == "Add" and len(add.inputs) == 2:
                other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
                bias = const_array(other)
                width = weight.const_value.numpy().shape[1 if layout == "in_out" else 0]
                if bias is not None and bias.shape == (width,):
                    return Linear(node, weight, layout, transpose, other, add, add.outputs[0])
        return Linear(node, weight, layout, transpose, None, None, out)
    if node.op_type == "Gemm" and node.domain == "":
        attrs = {name: attr.value for name, attr in node.attributes.items()}
        b = node.inputs[1]
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            return None
        if const_array(b) is None:
            return None
        c = node.inputs[2] if len(node.inputs) > 2 else None
        if c is not None and (const_array(c) is None or const_array(c).ndim != 1):
            return None
        layout = "out_in" if attrs.get("transB", 0) else "in_out"
        return Linear(node, b, layout, None, c, node if c is not None else None, node.outputs[0])
    return None


def linear_producing(value: ir.Value) -> Linear | None:
    """The linear whose output (after bias) is ``value``."""
    p = value.producer()
    if p is None:
        return None
    candidates = [p] if p.op_type != "Add" else [i.producer() for i in p.inputs if i is not None and i.producer()]
    for node in candidates:
        lin = match_linear(node)
        if lin is not None and lin.output is value:
            return lin
    return None


def _perm(node: ir.Node) -> tuple[int, ...] | None:
    attr = node.attributes.get("perm")
    return None if attr is None else tuple(attr.value)


def find_norms(graph: ir.Graph) -> list[Norm]:
    """Every normalization in ``graph`` (residual norms and head norms alike), in graph order."""
    norms = []
    for node in graph:
        kind = next((k for k in _FUSED if k.value == node.op_type), None)
        if kind is not None:
            g, b = _FUSED[kind]
            beta_node = node if b is not None and len(node.inputs) > b and node.inputs[b] is not None else None
            norms.append(Norm(kind, (node,), node.inputs[0], node.outputs[0], node, g, beta_node, b if beta_node else None))
        elif node.op_type == "Sqrt":
            norm = _match_rms_chain(node)
            if norm is not None:
                norms.append(norm)
    return norms


def _match_rms_chain(sqrt: ir.Node) -> Norm | None:
    add = sqrt.inputs[0].producer()
    if add is None or add.op_type != "Add":
        return None
    mean = next((i.producer() for i in add.inputs if i is not None and i.producer() is not None), None)
    if mean is None or mean.op_type != "ReduceMean" or not any(const_array(i) is not None for i in add.inputs):
        return None
    square = mean.inputs[0].producer()
    if square is None or not _is_square(square):
        return None
    x = skip_casts_up(square.inputs[0])
    nodes = [square, mean, add, sqrt]
    scaled = None
    for c in sqrt.outputs[0].consumers():
        if c.op_type == "Div" and c.inputs[1] is sqrt.outputs[0] and skip_casts_up(c.inputs[0]) is x:
            nodes, scaled = nodes + [c], c
        elif c.op_type == "Reciprocal":
            for m in c.outputs[0].consumers():
                if m.op_type == "Mul" and any(skip_casts_up(i) is x for i in m.inputs if i is not c.outputs[0]):
                    nodes, scaled = nodes + [c, m], m
    if scaled is None:
        log.debug("rejected RMS chain at %s: no Mul(x, 1/sqrt) or Div(x, sqrt) on the same x", sqrt.name)
        return None
    out = scaled.outputs[0]
    consumers = out.consumers()
    if len(consumers) == 1 and consumers[0].op_type == "Cast":
        out = consumers[0].outputs[0]
        consumers = out.consumers()
    if len(consumers) == 1 and consumers[0].op_type == "Mul" and not scaled.outputs[0].is_graph_output():
        mul = consumers[0]
        index = 1 if mul.inputs[0] is out else 0
        gamma = const_array(mul.inputs[index])
        if gamma is not None and gamma.ndim == 1:
            return Norm(NormKind.RMS_DECOMPOSED, tuple(nodes + [mul]), x, mul.outputs[0], mul, index)
    return Norm(NormKind.RMS_DECOMPOSED, tuple(nodes), x, out, None, None)


def _is_square(node: ir.Node) -> bool:
    if node.op_type == "Pow":
        exponent = const_array(node.inputs[1])
        return exponent is not None and exponent.size == 1 and float(exponent.reshape(-1)[0]) == 2.0
    return node.op_type == "Mul" and node.inputs[0] is node.inputs[1]


@dataclasses.dataclass(frozen=True)
class ResidualBlock:
    """One residual add: ``add`` = residual + branch; ``writer`` (o_proj/down_proj/out_proj/fc2) ends the branch."""

    add: ir.Node
    pre_norm: Norm | None
    writer: Linear
    post_norm: Norm | None  # Gemma3 post-attention / post-feedforward norm between writer and add


@dataclasses.dataclass(frozen=True)
class ResidualStream:
    """Embedding -> residual blocks -> final norm -> lm_head."""

    embedding: ir.Node  # the Gather
    embed_scale: ir.Node | None  # Gemma3's Mul by sqrt(hidden)
    position_embedding: ir.Node | None  # OPT's learned positions (the Gather)
    blocks: tuple[ResidualBlock, ...]
    final_norm: Norm
    lm_head: Linear

    @property
    def embedding_weight(self) -> ir.Value:
        return self.embedding.inputs[0]

    @property
    def tied(self) -> bool:
        """Whether lm_head reads the embedding's own initializer."""
        return self.lm_head.weight is self.embedding_weight

    @property
    def norms(self) -> tuple[Norm, ...]:
        found = [n for b in self.blocks for n in (b.pre_norm, b.post_norm) if n is not None]
        return (*found, self.final_norm)

    @property
    def writers(self) -> tuple[Linear, ...]:
        return tuple(b.writer for b in self.blocks)


def _layer_of(node: ir.Node, softmaxes: list[int], order: dict[ir.Node, int], before_attention: bool) -> int | None:
    if not softmaxes:
        return None
    count = sum(1 for s in softmaxes if s < order[node])
    return count if before_attention else count - 1


def is_online_transform(node: ir.Node) -> bool:
    """Whether a pass inserted ``node`` as part of an online transform (metadata ``qexport.online_*``)."""
    return any(key.startswith("qexport.online_") for key in node.metadata_props)


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


def _trace_up(value: ir.Value, depth: int = 12) -> ir.Value:
    """Walk up through data-movement ops (Concat: the one operand that is not a graph input)."""
    for _ in range(depth):
        p = value.producer()
        if p is None or p.op_type not in DATA_MOVEMENT:
            return value
        if p.op_type == "Slice" and not is_token_slice(p):
            return value
        if p.op_type == "Concat":
            computed = [i for i in p.inputs if i is not None and not i.is_graph_input() and i.const_value is None]
            if len(computed) != 1:
                return value
            value = computed[0]
        else:
            value = p.inputs[0]
    return value


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


def find_residual_stream(model: ir.Model) -> ResidualStream:
    """Walk the residual stream from the token embedding; raises :class:`PatternNotFoundError`."""
    graph = model.graph
    norms = {n.input: n for n in find_norms(graph)}
    by_output = {n.output: n for n in norms.values()}
    embedding = next((n for n in graph if _is_token_embedding(n)), None)
    if embedding is None:
        raise PatternNotFoundError("no token embedding (Gather of a 2-D initializer by input_ids) in the graph")
    current, scale, positions = embedding.outputs[0], None, None
    while not any(a in norms for a in _aliases(current)):
        nxt = current.consumers()
        if len(nxt) != 1 or nxt[0].op_type not in ("Mul", "Add"):
            raise PatternNotFoundError(f"cannot follow the embedding output {current.name} to the first norm")
        other = next(i for i in nxt[0].inputs if i is not current)
        if nxt[0].op_type == "Mul" and const_array(other) is not None:
            scale = nxt[0]
        elif nxt[0].op_type == "Add" and (g := other.producer()) is not None and g.op_type == "Gather":
            positions = g
        else:
            raise PatternNotFoundError(f"unexpected {nxt[0].op_type} {nxt[0].name} after the embedding")
        current = nxt[0].outputs[0]
    blocks = []
    while True:
        aliases = _aliases(current)
        add = next((c for a in aliases for c in a.consumers() if c.op_type == "Add" and _residual_add(c, aliases)), None)
        if add is None:
            break
        branch = next(i for i in add.inputs if i not in aliases)
        post = by_output.get(branch)
        writer = linear_producing(post.input if post is not None else branch)
        if writer is None:
            raise PatternNotFoundError(f"residual add {add.name}: its branch does not end in a weight linear")
        pre = next((norms[a] for a in aliases if a in norms), None)
        blocks.append(ResidualBlock(add, pre, writer, post))
        current = add.outputs[0]
    final = next((norms[a] for a in _aliases(current) if a in norms), None)
    if final is None:
        raise PatternNotFoundError(f"no final norm reads the last residual value {current.name}")
    heads = [lin for c, _ in channel_readers(final.output) if (lin := match_linear(c)) is not None]
    if len(heads) != 1:
        raise PatternNotFoundError(f"expected one lm_head linear after the final norm, found {len(heads)}")
    return ResidualStream(embedding, scale, positions, tuple(blocks), final, heads[0])


def _is_token_embedding(node: ir.Node) -> bool:
    if node.op_type != "Gather" or (table := const_array(node.inputs[0])) is None or table.ndim != 2:
        return False
    return _trace_up(node.inputs[1]).name == "input_ids"


def _aliases(value: ir.Value) -> list[ir.Value]:
    """``value`` and its Reshapes (OPT flattens the residual for the MLP)."""
    found, frontier = [value], [value]
    while frontier:
        v = frontier.pop()
        for c in v.consumers():
            if c.op_type == "Reshape" and c.inputs[0] is v:
                found.append(c.outputs[0])
                frontier.append(c.outputs[0])
    return found


def _residual_add(add: ir.Node, aliases: list[ir.Value]) -> bool:
    ins = [i for i in add.inputs if i is not None]
    return len(ins) == 2 and sum(i in aliases for i in ins) == 1 and all(i.const_value is None for i in ins)
