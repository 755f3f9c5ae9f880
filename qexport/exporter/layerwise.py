"""Layer-wise export: trace a shallow copy of the model once, then stamp one template layer per real layer.

The shallow model keeps the real modules and the full graph signature (every ``past_key_values.i``), but its
layer list holds only layer 0 and, for each layer kind (``config.layer_types``; one kind where absent), two
more layers of that kind, one after the other. Stamping works on the raw exporter graph, before ``cleanup``
(so no computation is yet shared between layers by CSE):

* the graph is cut by ``pkg.torch.onnx.name_scopes`` into a prefix, layer sections 0..S-1 and a suffix;
* the two layers of a kind must trace to the same operators (else the layer's graph depends on its index);
* layer 0 stays; every real layer 1..N-1 is a copy of its kind's second shallow layer, wired to the previous
  layer's residual output, its own past inputs and its own weights (``model.<layers>.<i>.<name>``).

The copies are left unnamed: ``qexport.exporter.naming`` then names every generated value and node of either
export path by graph order, so the layer-wise and whole-model graphs carry the same names without depending on
the exporter's own counters. Anything off that pattern raises :class:`LayerwiseError`; the caller then traces
the whole model.
"""

from __future__ import annotations

import ast
import collections
import contextlib
import dataclasses
import logging
import re
from typing import Callable, Iterator, Mapping, Union

import onnx_ir as ir
import torch
from onnx_ir.tensor_adapters import TorchTensor

from qexport.exporter.families import Family

log = logging.getLogger(__name__)

TensorLike = Union[torch.Tensor, ir.TensorProtocol]
SCOPES = "pkg.torch.onnx.name_scopes"
# Where each family keeps its decoder layers, as attribute names under the causal LM.
LAYER_PATHS: dict[str, tuple[str, ...]] = {
    "llama": ("model", "layers"),
    "qwen2": ("model", "layers"),
    "gemma3": ("model", "layers"),
    "opt": ("model", "decoder", "layers"),
}
_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)")
_PRESENT = re.compile(r"present\.(\d+)\.(key|value)")


class LayerwiseError(RuntimeError):
    """The shallow trace does not have the shape the stamping relies on; the whole model is traced instead."""


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """Which real layers the shallow model holds (``shallow``, in its order) and the kind of every real layer."""

    path: tuple[str, ...]
    kinds: tuple[str, ...]
    shallow: tuple[int, ...]

    @property
    def scope(self) -> str:
        """The exporter's name scope of the layer list (the wrapper adds ``model.``)."""
        return ".".join(("model",) + self.path)

    @property
    def shallow_kinds(self) -> tuple[str, ...]:
        return tuple(self.kinds[i] for i in self.shallow)

    def template(self, kind: str) -> int:
        """The shallow position of the second layer of ``kind`` after layer 0 (the one copied)."""
        return [pos for pos, k in enumerate(self.shallow_kinds) if k == kind and pos > 0][1]



def _layer_list(model: torch.nn.Module, path: tuple[str, ...]) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    owner = model
    for name in path[:-1]:
        owner = getattr(owner, name, None)
        if owner is None:
            return model, None
    return owner, getattr(owner, path[-1], None)


def text_config(config):
    """The config that holds the decoder's layer count and layer kinds (the text part of a composite config)."""
    getter = getattr(config, "get_text_config", None)
    return getter() if getter is not None else config


def plan_from_config(config, family: Family) -> LayerPlan | str:
    """The shallow model's layers from the config alone, or a sentence saying why the model is traced whole."""
    path = LAYER_PATHS.get(family.name)
    if path is None:
        return f"no layer-wise plan for family {family.name!r}"
    num_layers = int(text_config(config).num_hidden_layers)
    types = getattr(text_config(config), "layer_types", None)
    kinds = tuple(types) if types else ("layer",) * num_layers
    if len(kinds) != num_layers:
        return f"config.layer_types has {len(kinds)} entries for {num_layers} layers"
    by_kind: dict[str, list[int]] = collections.defaultdict(list)
    for i in range(1, num_layers):
        by_kind[kinds[i]].append(i)
    shallow = [0]
    for kind, indices in by_kind.items():
        if len(indices) < 2:
            return f"fewer than two {kind!r} layers after layer 0 (a template's step cannot be measured)"
        shallow += indices[:2]
    return LayerPlan(path, kinds, tuple(shallow))


def plan_layers(model: torch.nn.Module, family: Family, num_layers: int) -> LayerPlan | str:
    """The shallow model's layers, or a sentence saying why this model is left to the whole-model trace."""
    plan = plan_from_config(model.config, family)
    if isinstance(plan, str):
        return plan
    _, layers = _layer_list(model, plan.path)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) != num_layers or len(plan.kinds) != num_layers:
        return f"{'.'.join(plan.path)} is not a list of {num_layers} layers"
    classes = {(plan.kinds[i], type(layers[i])) for i in range(1, num_layers)}
    if len(classes) != len(set(plan.kinds[1:])):
        return "layers of one kind are of different classes"
    return plan


@contextlib.contextmanager
def shallow_model(model: torch.nn.Module, plan: LayerPlan) -> Iterator[None]:
    """Swap the model's layer list for the plan's shallow one (config and ``layer_idx`` to match); restore it after."""
    owner, layers = _layer_list(model, plan.path)
    picked = [layers[i] for i in plan.shallow]
    configs = {id(c): c for c in (model.config, getattr(owner, "config", None)) if c is not None}.values()
    saved_config = [(c, c.num_hidden_layers, getattr(c, "layer_types", None)) for c in configs]
    saved_idx = [(m, m.layer_idx) for layer in picked for m in layer.modules() if hasattr(m, "layer_idx")]
    try:
        setattr(owner, plan.path[-1], torch.nn.ModuleList(picked))
        for config, _, types in saved_config:
            config.num_hidden_layers = len(picked)
            if types is not None:
                config.layer_types = list(plan.shallow_kinds)
        for pos, layer in enumerate(picked):
            for module in layer.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = pos
        yield
    finally:
        setattr(owner, plan.path[-1], layers)
        for config, num, types in saved_config:
            config.num_hidden_layers = num
            if types is not None:
                config.layer_types = types
        for module, idx in saved_idx:
            module.layer_idx = idx


def _same_operators(first: list[ir.Node], second: list[ir.Node]) -> None:
    """Two layers of one kind must trace to the same operators, else a copy of one is not the other."""
    if [(n.domain, n.op_type) for n in first] != [(n.domain, n.op_type) for n in second]:
        raise LayerwiseError("two layers of one kind trace to different nodes")


def _sections(graph: ir.Graph, plan: LayerPlan) -> tuple[list[ir.Node], list[list[ir.Node]], list[ir.Node]]:
    """The nodes before the layers, each layer's nodes and the nodes after, read off the name scopes."""
    pattern = re.compile(re.escape(plan.scope) + r"\.(\d+)")
    pre: list[ir.Node] = []
    layers: list[list[ir.Node]] = []
    post: list[ir.Node] = []
    for node in graph:
        layer = None
        for scope in ast.literal_eval(node.metadata_props.get(SCOPES, "[]")):
            if m := pattern.fullmatch(scope):
                layer = int(m.group(1))
                break
        if layer is None:
            (post if layers else pre).append(node)
        elif post or layer not in (len(layers) - 1, len(layers)):
            raise LayerwiseError(f"the nodes of layer {layer} are not one run in graph order")
        else:
            if layer == len(layers):
                layers.append([])
            layers[layer].append(node)
    if len(layers) != len(plan.shallow):
        raise LayerwiseError(f"the shallow trace has {len(layers)} layer sections, not {len(plan.shallow)}")
    return pre, layers, post


def _one(values: list[ir.Value], what: str) -> ir.Value:
    unique = list(dict.fromkeys(values))
    if len(unique) != 1:
        raise LayerwiseError(f"{what}: {len(unique)} values where one residual stream was expected")
    return unique[0]


def _external(nodes: list[ir.Node]) -> list[ir.Value]:
    inside = {o for n in nodes for o in n.outputs}
    return list(dict.fromkeys(v for n in nodes for v in n.inputs if v is not None and v not in inside))


def _past_key(node: ir.Node) -> tuple | None:
    """A node of the prefix reading one layer's past input, keyed without the layer index."""
    layers = {m.group(1) for v in node.inputs if v is not None and v.is_graph_input()
              and (m := _PAST.fullmatch(v.name or ""))}
    if len(layers) != 1:
        return None
    names = tuple(_PAST.sub(r"past_key_values.*.\2", v.name or "") if v is not None else None for v in node.inputs)
    attrs = tuple(sorted((k, repr(a.value)) for k, a in node.attributes.items()))
    return (node.domain, node.op_type, names, attrs)


def trace_layerwise(torch_model: torch.nn.Module, plan: LayerPlan, trace: Callable[[], ir.Model]) -> ir.Model:
    """The raw graph of the full model from one shallow trace (``trace`` exports the model as it is at the call);
    generated values and nodes of the stamped layers are unnamed (see :mod:`qexport.exporter.naming`)."""
    with shallow_model(torch_model, plan):
        onnx_model = trace()
    _, real_layers = _layer_list(torch_model, plan.path)
    stamp_layers(onnx_model, lambda i: dict(real_layers[i].named_parameters()) | dict(real_layers[i].named_buffers()),
                 plan)
    return onnx_model


def stamp_layers(onnx_model: ir.Model, layer_tensors: Callable[[int], Mapping[str, TensorLike]], plan: LayerPlan,
                 ) -> None:
    """Turn the raw trace of the shallow model into the graph of the full model, in place (before ``cleanup``).

    ``layer_tensors(i)``: real layer ``i``'s tensors by their name inside the layer (torch tensors, or IR tensors
    such as an ``ir.LazyTensor`` read from the checkpoint when its value is needed)."""
    graph = onnx_model.graph
    pre, layers, post = _sections(graph, plan)
    count, shallow_kinds = len(plan.kinds), plan.shallow_kinds
    section = {o: j for j, nodes in enumerate(layers) for n in nodes for o in n.outputs}
    section.update({o: "pre" for n in pre for o in n.outputs})
    templates = {kind: plan.template(kind) for kind in set(shallow_kinds[1:])}
    for q in templates.values():
        _same_operators(layers[q - 1], layers[q])
    later = {v for nodes in layers[2:] for v in _external(nodes)}
    residual = _one([v for v in _external(layers[1]) if section.get(v) == 0 and v not in later], "layer 0 output")
    last = _one([v for v in _external(post) if section.get(v) not in (None, "pre", 0)], "input of the final norm")
    if section[last] != len(layers) - 1:
        raise LayerwiseError("the nodes after the layers read a layer other than the last")
    by_past: dict[tuple, dict[int, ir.Node]] = collections.defaultdict(dict)
    for node in pre:
        if (key := _past_key(node)) is not None:
            index = next(int(m.group(1)) for v in node.inputs if v is not None and (m := _PAST.fullmatch(v.name or "")))
            by_past[key][index] = node
    stamper = _Stamper(graph, plan, section, by_past)
    stamped: list[ir.Node] = []
    presents: dict[str, ir.Value] = {o.name: o for o in graph.outputs if _PRESENT.fullmatch(o.name or "")}
    for i in range(1, count):
        kind = plan.kinds[i]
        q = templates[kind]
        nodes, residual, layer_presents = stamper.stamp(layers[q], q, i, residual, layer_tensors(i))
        stamped += nodes
        presents.update(layer_presents)
    for node in post:
        for index, value in enumerate(node.inputs):
            if value is last:
                node.replace_input_with(index, residual)
    _replace_outputs(graph, pre, presents, count)
    graph.insert_before(post[0], stamped)
    _drop_shallow_layers(graph, plan, layers, stamper.weights.values())
    log.debug("stamped %d layers from %d traced", count, len(layers))


def _replace_outputs(graph: ir.Graph, pre: list[ir.Node], presents: dict[str, ir.Value], count: int) -> None:
    """Logits, then every layer's present key and value, in the whole-model order."""
    outputs = [o for o in graph.outputs if not _PRESENT.fullmatch(o.name or "")]
    outputs += [presents[f"present.{i}.{kind}"] for i in range(count) for kind in ("key", "value")
                if f"present.{i}.{kind}" in presents]
    prefix = set(pre)
    for value in graph.outputs:  # a present the shallow trace passed through: back to its FX name
        producer = value.producer()
        if producer in prefix and producer.name.startswith("node_"):
            value.name = producer.name[len("node_"):]
    graph.outputs.clear()
    graph.outputs.extend(outputs)


def _drop_shallow_layers(graph: ir.Graph, plan: LayerPlan, layers: list[list[ir.Node]], weights) -> None:
    """Remove the traced layers 1..S-1 and their initializers; register the stamped layers' weights."""
    graph.remove([n for nodes in layers[1:] for n in nodes], safe=True)
    dropped = tuple(f"{plan.scope}.{j}." for j in range(1, len(layers)))
    for name in [n for n in graph.initializers if n.startswith(dropped)]:
        if graph.initializers[name].uses():
            raise LayerwiseError(f"initializer {name} of a shallow layer is still read")
        del graph.initializers[name]
    for value in weights:
        graph.register_initializer(value)


class _Stamper:
    """Copies a template layer's nodes for one real layer, mapping what the layer reads from outside."""

    def __init__(self, graph: ir.Graph, plan: LayerPlan, section: dict, by_past: dict) -> None:
        self.inputs = {v.name: v for v in graph.inputs}
        self.plan, self.section, self.by_past = plan, section, by_past
        self.weights: dict[str, ir.Value] = {}

    def stamp(self, template: list[ir.Node], q: int, i: int, residual: ir.Value, tensors: Mapping[str, TensorLike],
              ) -> tuple[list[ir.Node], ir.Value, dict[str, ir.Value]]:
        mapped: dict[ir.Value, ir.Value] = {}
        inside = {o for n in template for o in n.outputs}
        residual_in = _one([v for v in _external(template) if self.section.get(v) == q - 1], f"input of layer {q}")
        scope_re = re.compile(rf"({re.escape(self.plan.path[-1])}\.){q}(?!\d)")
        nodes, presents = [], {}
        for node in template:
            inputs = [None if v is None else mapped[v] if v in inside
                      else residual if v is residual_in else self._outer(v, q, i, tensors) for v in node.inputs]
            clone = ir.Node(node.domain, node.op_type, inputs, list(node.attributes.values()),
                            overload=node.overload, num_outputs=len(node.outputs), version=node.version,
                            doc_string=node.doc_string,
                            metadata_props={k: scope_re.sub(rf"\g<1>{i}", v) for k, v in node.metadata_props.items()})
            for old, new in zip(node.outputs, clone.outputs):
                present = _PRESENT.fullmatch(old.name or "")
                new.name = f"present.{i}.{present.group(2)}" if present else None
                new.type, new.shape = old.type, old.shape.copy() if old.shape is not None else None
                mapped[old] = new
                if present:
                    presents[new.name] = new
            nodes.append(clone)
        leaving = [o for n in template for o in n.outputs if not o.is_graph_output()
                   and any(user.node not in template for user in o.uses())]
        return nodes, mapped[_one(leaving, f"output of layer {q}")], presents

    def _outer(self, value: ir.Value, q: int, i: int, tensors: Mapping[str, TensorLike]) -> ir.Value:
        where = self.section.get(value)
        if where == 0:  # a shape or constant the exporter first computed in layer 0 and shares
            return value
        if where == "pre":
            key = _past_key(value.producer())
            if key is None:
                return value
            counterpart = self.by_past[key].get(i)
            if counterpart is None:
                raise LayerwiseError(f"no {value.producer().op_type} of past_key_values.{i} in the traced prefix")
            return counterpart.outputs[value.producer().outputs.index(value)]
        if where is not None:
            raise LayerwiseError(f"layer {q} reads {value.name} of layer {where}")
        if value.is_graph_input():
            m = _PAST.fullmatch(value.name or "")
            if m is None:
                return value
            if int(m.group(1)) != q:
                raise LayerwiseError(f"layer {q} reads {value.name}")
            return self.inputs[f"past_key_values.{i}.{m.group(2)}"]
        prefix = f"{self.plan.scope}.{q}."
        if value.is_initializer() and (value.name or "").startswith(prefix):
            suffix = value.name[len(prefix):]
            if suffix not in tensors:
                raise LayerwiseError(f"layer {i} has no tensor {suffix} (its template reads {value.name})")
            return self._weight(value, f"{self.plan.scope}.{i}.{suffix}", tensors[suffix])
        if value.is_initializer() and re.match(re.escape(self.plan.scope) + r"\.\d+\.", value.name or ""):
            raise LayerwiseError(f"layer {q} reads {value.name}")
        return value

    def _weight(self, template: ir.Value, name: str, tensor: TensorLike) -> ir.Value:
        """The initializer of one real layer's tensor, shaped and typed as the template's."""
        if name in self.weights:
            return self.weights[name]
        const = TorchTensor(tensor.detach(), name=name) if isinstance(tensor, torch.Tensor) else tensor
        if const.dtype != template.const_value.dtype or tuple(const.shape) != tuple(template.const_value.shape):
            raise LayerwiseError(f"{name} does not match its template {template.name} in type or shape")
        value = ir.Value(name=name, type=template.type, shape=template.shape, const_value=const)
        self.weights[name] = value
        return value
