"""W8A8 quantization as QuantizeLinear/DequantizeLinear nodes on the weight linears of an exported LM."""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import logging
from typing import ClassVar, Sequence

import numpy as np
import onnx_ir as ir

from qexport.errors import RecipeError
from qexport.passes import sites as site_matching
from qexport.passes._util import drop_if_unused, new_initializer

log = logging.getLogger(__name__)

TAG = "qexport.quant"  # metadata key on inserted nodes: "weight", "per_token" or "per_tensor"


class ActQuant(str, enum.Enum):
    PER_TOKEN = "per_token"  # dynamic: scale_t = max_j |x_tj| / 127, computed in the graph
    PER_TENSOR = "per_tensor"  # static: one calibrated scale per activation tensor
    NONE = "none"  # weight-only


class ActCalibration(str, enum.Enum):
    MINMAX = "minmax"  # scale = calibration absmax / 127
    PERCENTILE = "percentile"  # scale = percentile of the per-token absmax / 127 (clips rare outlier tokens)


def quantize_weight(w_in_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output channel of an [in, out] weight: (q int8 [in, out], scale [out])."""
    absmax = np.abs(w_in_out).max(axis=0)
    scale = np.where(absmax > 0, absmax / 127.0, 1.0)
    q = np.clip(np.round(w_in_out / scale), -127, 127).astype(np.int8)
    return q, scale


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


@dataclasses.dataclass(frozen=True)
class QuantizePass(ir.passes.InPlacePass):
    """Quantize weight linears to int8 W8A8 in QDQ form (portable; ``ort-int8`` turns it into integer kernels).

    Rewrite cases, for each linear found by ``match_linear`` (never QK/AV MatMuls, the mask Add, or nodes
    tagged ``qexport.online_*``) whose role name (:func:`linear_names`, e.g. ``layers.*.mlp.down``), node name
    or weight name matches the glob ``linears``, lm_head only with ``include_lm_head``:

    1. weight: an int8 initializer q = clip(round(W / s), -127, 127), s = per-output-channel absmax / 127,
       feeding ``DequantizeLinear(q, s, axis)`` (axis 1 for MatMul B [in, out], 0 for Gemm transB = 1); a tied
       lm_head's Transpose is bypassed (the embedding Gather keeps the float table);
    2. ``per_token`` activation: ``Abs -> ReduceMax(-1) -> Div(127) -> Max(eps)`` gives s_t, then blocked
       ``QuantizeLinear(x, s_t, int8, block_size=K) -> DequantizeLinear`` (opset 21): per-token symmetric int8;
    3. ``per_tensor`` activation: ``QuantizeLinear(x, s) -> DequantizeLinear`` with int8 zero point 0 and a
       calibrated scale s = absmax / 127 (``minmax``) or the ``percentile`` of per-token absmax / 127, from
       ``windows`` run through the graph as it is before this pass.

    One activation quantizer is shared by all selected linears reading the same tensor (q/k/v, gate/up).
    Linears whose weight is already an int8 DequantizeLinear (from ``quantize-gptq``) keep it and get only case 2/3.
    Quantized linears no longer match ``match_linear`` (B is computed), so a second run changes nothing.
    """

    lossless: ClassVar[bool] = False

    activations: ActQuant = ActQuant.PER_TOKEN
    calibration: ActCalibration = ActCalibration.MINMAX
    percentile: float = 99.9
    linears: str = "*"
    include_lm_head: bool = False
    windows: tuple[np.ndarray, ...] = ()
    threads: int | None = None

    def __post_init__(self) -> None:
        for name, kind in (("activations", ActQuant), ("calibration", ActCalibration)):
            try:
                object.__setattr__(self, name, kind(getattr(self, name)))
            except ValueError:
                raise RecipeError(f"quantize {name} must be one of {[m.value for m in kind]}, got {getattr(self, name)!r}") from None
        if not 0.0 < self.percentile <= 100.0:
            raise RecipeError(f"quantize percentile must be within (0, 100], got {self.percentile}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        linears = {lin.node: lin for lin in selected_linears(model, self.linears, self.include_lm_head)}
        prequantized = set(prequantized_linears(model, self.linears, self.include_lm_head))
        if self.activations is ActQuant.NONE:
            prequantized = set()  # nothing to add to them
        by_input: dict[ir.Value, list[ir.Node]] = {}
        for node in graph:  # graph order: the first reader of each activation comes first
            if node in linears or node in prequantized:
                by_input.setdefault(node.inputs[0], []).append(node)
        if not by_input:
            return ir.passes.PassResult(model, False)
        scales: dict[ir.Value, float] = {}
        if self.activations is ActQuant.PER_TENSOR:
            if not self.windows:
                raise RecipeError("quantize with per_tensor activations needs calibration windows")
            scales = self._static_scales(model, list(by_input))
        consts = _SharedConsts(graph)
        for x, readers in by_input.items():
            width = _in_features(readers[0], linears)
            if self.activations is ActQuant.PER_TOKEN:
                xq = _per_token_qdq(graph, x, width, readers[0], consts)
            elif self.activations is ActQuant.PER_TENSOR:
                xq = _per_tensor_qdq(graph, x, scales[x], readers[0])
            else:
                xq = x
            for node in readers:
                if node in linears:
                    _quantize_weight(graph, linears[node])
                if xq is not x:
                    node.replace_input_with(0, xq)
        log.info("quantized %d linears (%d with weights already int8; %d activation tensors, %s)",
                 len(linears) + len(prequantized), len(prequantized), len(by_input), self.activations.value)
        return ir.passes.PassResult(model, True)

    def _static_scales(self, model: ir.Model, values: Sequence[ir.Value]) -> dict[ir.Value, float]:
        """Per-tensor scale of each value: calibration absmax (or a percentile of per-token absmax) / 127."""
        from qexport.calibration import _feeds, _session_with_outputs

        names = [v.name for v in values]
        session = _session_with_outputs(model, names, self.threads)
        inputs = {i.name: i for i in session.get_inputs()}
        token_max: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for window in self.windows:
            outs = session.run(names, _feeds(np.asarray(window, dtype=np.int64), inputs, model))
            for name, out in zip(names, outs):
                token_max[name].append(np.abs(out.astype(np.float64)).reshape(-1, out.shape[-1]).max(axis=1))
        result = {}
        for value in values:
            per_token = np.concatenate(token_max[value.name])
            clip = per_token.max() if self.calibration is ActCalibration.MINMAX else np.percentile(per_token, self.percentile)
            result[value] = float(clip) / 127.0 if clip > 0 else 1.0
            log.debug("%s: absmax %.4g, clip %.4g", value.name, per_token.max(), clip)
        return result


class _SharedConsts:
    """Initializers shared by every per-token quantizer (created on first use)."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self._values: dict[str, ir.Value] = {}

    def get(self, name: str, array: np.ndarray) -> ir.Value:
        if name not in self._values:
            self._values[name] = new_initializer(self.graph, f"qexport.quant.{name}", array)
        return self._values[name]


def _tagged(node: ir.Node, kind: str) -> ir.Node:
    node.metadata_props[TAG] = kind
    return node


def _float_like(value: ir.Value, like: ir.Value, name: str) -> ir.Value:
    value.name = name
    value.dtype, value.shape = like.dtype, like.shape
    return value


def _per_token_qdq(graph: ir.Graph, x: ir.Value, width: int, before: ir.Node, consts: _SharedConsts) -> ir.Value:
    """x -> per-token symmetric int8 Q/DQ; returns the dequantized value."""
    dtype = x.dtype.numpy() if x.dtype is not None else np.float32
    base = f"{x.name}.qtok"
    abs_ = ir.node("Abs", [x], name=f"{base}.abs")
    reduce = ir.node("ReduceMax", [abs_.outputs[0], consts.get("axis_last", np.array([-1], np.int64))],
                     {"keepdims": 1}, name=f"{base}.absmax")
    div = ir.node("Div", [reduce.outputs[0], consts.get(f"qmax_{np.dtype(dtype).name}", np.array(127, dtype))],
                  name=f"{base}.scale_raw")
    scale = ir.node("Max", [div.outputs[0], consts.get(f"eps_{np.dtype(dtype).name}", np.array(1e-12, dtype))],
                    name=f"{base}.scale")
    q = ir.node("QuantizeLinear", [x, scale.outputs[0]],
                {"axis": -1, "block_size": width, "output_dtype": ir.DataType.INT8.value}, name=f"{base}.q")
    dq = ir.node("DequantizeLinear", [q.outputs[0], scale.outputs[0]], {"axis": -1, "block_size": width},
                 name=f"{base}.dq")
    for node, suffix in ((abs_, "abs"), (reduce, "absmax"), (div, "scale_raw"), (scale, "scale"), (q, "q")):
        node.outputs[0].name = f"{base}.{suffix}"
    q.outputs[0].dtype = ir.DataType.INT8
    graph.insert_before(before, [_tagged(n, "per_token") for n in (abs_, reduce, div, scale, q, dq)])
    return _float_like(dq.outputs[0], x, f"{base}.dq")


def _per_tensor_qdq(graph: ir.Graph, x: ir.Value, scale: float, before: ir.Node) -> ir.Value:
    """x -> per-tensor symmetric int8 Q/DQ with a constant scale; returns the dequantized value."""
    dtype = x.dtype.numpy() if x.dtype is not None else np.float32
    base = f"{x.name}.qten"
    s = new_initializer(graph, f"{base}.scale", np.array(scale, dtype))
    zp = new_initializer(graph, f"{base}.zero_point", np.array(0, np.int8))
    q = ir.node("QuantizeLinear", [x, s, zp], name=f"{base}.q")
    q.outputs[0].name, q.outputs[0].dtype = f"{base}.q", ir.DataType.INT8
    dq = ir.node("DequantizeLinear", [q.outputs[0], s, zp], name=f"{base}.dq")
    graph.insert_before(before, [_tagged(q, "per_tensor"), _tagged(dq, "per_tensor")])
    return _float_like(dq.outputs[0], x, f"{base}.dq")


def _in_features(node: ir.Node, linears: dict[ir.Node, site_matching.Linear]) -> int:
    if node in linears:
        return linears[node].in_features
    dq = node.inputs[1].producer()  # a pre-quantized weight: int8 [in, out], or [out, in] with axis 0
    shape = dq.inputs[0].const_value.numpy().shape
    return int(shape[1] if dq.attributes["axis"].value == 0 else shape[0])


def _quantize_weight(graph: ir.Graph, linear: site_matching.Linear) -> None:
    """Replace the linear's float weight input by DequantizeLinear(int8 q, per-channel scale), rounded to nearest."""
    q, scale = quantize_weight(linear.weight_in_out())
    write_quantized_weight(graph, linear, q, scale)


def write_quantized_weight(graph: ir.Graph, linear: site_matching.Linear, q: np.ndarray, scale: np.ndarray) -> None:
    """Feed the linear's weight input from ``DequantizeLinear(q, scale)``; ``q`` int8 [in, out], ``scale`` [out]."""
    dtype = linear.weight.const_value.numpy().dtype
    gemm_trans = linear.node.op_type == "Gemm" and linear.layout == "out_in"
    stored, axis = (q.T, 0) if gemm_trans else (q, 1)
    base = linear.weight.name if linear.transpose is None else f"{linear.weight.name}.T"
    q_value = new_initializer(graph, f"{base}.int8", np.ascontiguousarray(stored))
    s_value = new_initializer(graph, f"{base}.scale", scale.astype(dtype))
    dq = _tagged(ir.node("DequantizeLinear", [q_value, s_value], {"axis": axis}, name=f"{base}.dq"), "weight")
    dq.outputs[0].name = f"{base}.dq"
    dq.outputs[0].dtype, dq.outputs[0].shape = ir.DataType.from_numpy(dtype), ir.Shape(stored.shape)
    graph.insert_before(linear.node, dq)
    old = linear.node.inputs[1]
    linear.node.replace_input_with(1, dq.outputs[0])
    if linear.transpose is not None and not linear.transpose.outputs[0].uses():
        graph.remove(linear.transpose, safe=True)
    drop_if_unused(graph, linear.weight)
    if old is not linear.weight:
        drop_if_unused(graph, old)
