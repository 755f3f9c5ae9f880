"""Layer-by-layer runs of a graph: the residual stream entering a layer is cached per window, and each stage runs
only the nodes between the cached value and the values it wants (layer-sequential GPTQ's calibration).

A stage's *cut* is the latest residual-stream value (the embedding output or a residual add's output) that all
of its target values depend on. Stage k runs one ONNX Runtime session whose graph inputs are the cut of stage
k - 1 (fed from the cache) and the model inputs its nodes need (masks, positions, rotary tables are recomputed
from them), and whose outputs are stage k's targets and stage k's cut, which becomes the cache for stage k + 1.
Weights changed between stages (earlier layers quantized) are therefore seen exactly as in a run of the whole
graph. Where a stage's nodes would read the residual stream other than through the cached cut (or no residual
stream is found), that stage runs the whole graph up to its values instead, which is always correct.

Sessions are built from a ModelProto of only the needed nodes and initializers (serialized one by one): the
model is never copied.
"""

from __future__ import annotations

import logging
from typing import Iterator, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from qexport.errors import PatternNotFoundError
from qexport.runtimes.ort_session import session_from_bytes
from qexport.passes.discovery.residual import find_residual_stream

log = logging.getLogger(__name__)


def stream_values(model: ir.Model) -> list[ir.Value]:
    """The residual stream in order: the token embedding's output, then each residual add's output."""
    stream = find_residual_stream(model)
    return [stream.embedding.outputs[0]] + [block.add.outputs[0] for block in stream.blocks]


def stream_depths(model: ir.Model, stream: Sequence[ir.Value]) -> dict[ir.Value, int]:
    """For each value of the graph, the index in ``stream`` of the latest stream value it depends on (-1: none)."""
    index = {v: i for i, v in enumerate(stream)}
    depths: dict[ir.Value, int] = {}
    for node in model.graph:
        d = max((depths.get(v, -1) for v in node.inputs if v is not None), default=-1)
        for out in node.outputs:
            depths[out] = index.get(out, d)
    return depths


def find_cut(graph: ir.Graph, targets: Sequence[ir.Value], stream: Sequence[ir.Value], depths: dict[ir.Value, int]) -> ir.Value | None:
    """The latest stream value through which all ``targets`` can be computed (None: none is)."""
    j = min(depths.get(t, -1) for t in targets)
    if j < 0:
        return None
    cut = stream[j]
    return cut if needed_nodes(graph, targets, cut, depths) is not None else None


def needed_nodes(graph: ir.Graph, targets: Sequence[ir.Value], boundary: ir.Value | None,
                 depths: dict[ir.Value, int]) -> list[ir.Node] | None:
    """The nodes (graph order) computing ``targets`` from ``boundary`` and the graph's inputs and initializers,
    or None when some of them read the residual stream other than through ``boundary`` (None: the whole graph)."""
    j = -1 if boundary is None else depths.get(boundary, -1)
    found: set[ir.Node] = set()
    seen: set[ir.Value] = set()
    frontier = [t for t in targets if t is not boundary]
    while frontier:
        value = frontier.pop()
        if value in seen:
            continue
        seen.add(value)
        if 0 <= depths.get(value, -1) < j:  # depths never grow going up: every path that avoids the boundary
            return None  # on its way to the embedding passes such a value
        node = value.producer()
        if node is None or node in found:
            continue
        if any(isinstance(a, ir.Attr) and a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
               for a in node.attributes.values()):
            return None  # subgraphs may read outer values this walk does not see
        found.add(node)
        frontier.extend(v for v in node.inputs if v is not None and v is not boundary)
    return [node for node in graph if node in found]


def subgraph_proto(model: ir.Model, nodes: Sequence[ir.Node], inputs: Sequence[ir.Value],
                   outputs: Sequence[ir.Value]) -> onnx.ModelProto:
    """A ModelProto of ``nodes`` alone: ``inputs`` (graph inputs or computed values) become its graph inputs, the
    initializers the nodes read are serialized with it, ``outputs`` are its outputs."""
    proto = onnx.ModelProto(ir_version=model.ir_version, producer_name="qexport.layer_sessions")
    for domain, version in model.opset_imports.items():
        proto.opset_import.add(domain=domain, version=version)
    proto.functions.extend(ir.serde.serialize_function(f) for f in model.functions.values())
    graph = proto.graph
    graph.name = "stage"
    graph.input.extend(ir.serde.serialize_value(v) for v in inputs)
    graph.output.extend(ir.serde.serialize_value(v) for v in outputs)
    fed = set(inputs)
    written: set[ir.Value] = set()
    for node in nodes:
        for v in node.inputs:
            if v is not None and v not in fed and v not in written and v.producer() is None:
                if v.const_value is None:
                    raise PatternNotFoundError(f"{node.name} reads {v.name}, neither computed nor an initializer")
                tensor = ir.serde.serialize_tensor(v.const_value)
                tensor.name = v.name
                graph.initializer.append(tensor)
                written.add(v)
    graph.node.extend(ir.serde.serialize_node(node) for node in nodes)
    shown = fed | set(outputs)  # the exporter's types and shapes of the values in between, as a whole-graph run has them
    graph.value_info.extend(ir.serde.serialize_value(v) for node in nodes for v in node.outputs
                            if v not in shown and v.type is not None)
    return proto


class StagedRuns:
    """Runs ``stages`` (lists of graph values) of ``model`` in order over ``windows``; see the module docstring.
    Weights may change between stages; the graph's structure between residual-stream values may not."""

    def __init__(self, model: ir.Model, stages: Sequence[Sequence[ir.Value]], windows: Sequence[np.ndarray],
                 threads: int | None = None, cached: bool = True):
        self.model, self.stages, self.windows, self.threads = model, [list(s) for s in stages], windows, threads
        self.cuts: list[ir.Value | None] = [None] * len(self.stages)
        self.stream: list[ir.Value] = []
        self.depths: dict[ir.Value, int] = {}
        if cached:
            try:
                self.stream = stream_values(model)
            except PatternNotFoundError as e:
                log.info("no residual stream to cut at (%s): each stage runs the whole graph", e)
            else:
                self.depths = stream_depths(model, self.stream)
                self.cuts = [find_cut(model.graph, s, self.stream, self.depths) for s in self.stages]
        self._cached: ir.Value | None = None
        self._cache: list[np.ndarray] = []
        self.from_cache = 0  # stages run from a cached cut (the rest ran the whole graph up to their values)

    def run(self, k: int) -> Iterator[dict[str, np.ndarray]]:
        """For each window, name -> array of stage ``k``'s values (with the weights the model has now); when the
        windows are exhausted, stage k's cut is cached for stage k + 1."""
        from qexport.calibration.stats import prefill_feeds

        targets, cut = self.stages[k], self.cuts[k]
        wanted = targets + ([cut] if cut is not None and cut is not self._cached and k + 1 < len(self.stages)
                            and cut not in targets else [])
        boundary = self._cached
        nodes = needed_nodes(self.model.graph, wanted, boundary, self.depths) if boundary is not None else None
        if nodes is None:
            boundary = None
            nodes = needed_nodes(self.model.graph, wanted, None, self.depths)
        self.from_cache += boundary is not None
        log.debug("stage %d: %d nodes from %s", k, len(nodes), boundary.name if boundary is not None else "the inputs")
        used = {v for node in nodes for v in node.inputs if v is not None}
        inputs = ([boundary] if boundary is not None else []) + [v for v in self.model.graph.inputs if v in used]
        proto = subgraph_proto(self.model, nodes, inputs, wanted)
        session = session_from_bytes(proto.SerializeToString(), self.threads, as_written=True)
        names = [v.name for v in wanted]
        model_inputs = {v.name: v for v in self.model.graph.inputs}  # the feeds of a whole-graph run, of which
        session_inputs = [i.name for i in session.get_inputs()]  # the session takes those its nodes read
        cache = []
        for i, window in enumerate(self.windows):
            feeds = prefill_feeds(np.asarray(window, dtype=np.int64), model_inputs, self.model)
            feeds = {name: feeds[name] for name in session_inputs if name in feeds}
            if boundary is not None:
                feeds[boundary.name] = self._cache[i]
            outs = dict(zip(names, session.run(names, feeds)))
            if cut is not None and cut in wanted:
                cache.append(outs[cut.name])
            yield outs
        if cut is not None and cut in wanted:
            self._cached, self._cache = cut, cache
        elif cut is not self._cached:
            self._cached, self._cache = None, []
