"""The residual stream of an exported causal LM: embedding, norms, residual writers, final norm, lm_head."""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir

from qexport.errors import PatternNotFoundError
from qexport.passes._ir import channel_readers, const_array
from qexport.passes.discovery.graph_match import (
    Linear, Norm, _trace_up, find_norms, is_online_transform, linear_producing, match_linear,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ResidualBlock:
    """One residual add: ``add`` = residual + branch; ``writer`` (o_proj/down_proj/out_proj/fc2) ends the branch."""

    add: ir.Node
    pre_norm: Norm | None
    writer: Linear
    post_norm: Norm | None  # Gemma3's norm between writer and add (R1's online rotation may follow it)


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
        branch = _before_online(next(i for i in add.inputs if i not in aliases))
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


def _before_online(value: ir.Value) -> ir.Value:
    """The input of the online transform (R1's rotation after a post-norm) that ends at ``value``, else ``value``."""
    while (node := value.producer()) is not None and is_online_transform(node):
        data = [i for i in node.inputs if i is not None and i.const_value is None
                and not ((p := i.producer()) is not None and p.op_type == "Shape")]
        if len(data) != 1:
            return value
        value = data[0]
    return value


def _residual_add(add: ir.Node, aliases: list[ir.Value]) -> bool:
    ins = [i for i in add.inputs if i is not None]
    return len(ins) == 2 and sum(i in aliases for i in ins) == 1 and all(i.const_value is None for i in ins)
