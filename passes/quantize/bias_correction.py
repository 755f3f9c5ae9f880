"""AWEQ bias correction: subtract each quantized linear's mean output error, measured on calibration data."""

from __future__ import annotations

import dataclasses
import enum
import logging
import re
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from qexport.calibration.calibrator import Calibrator, ErrorProbe
from qexport.errors import RecipeError
from qexport.passes.discovery import sites as site_matching
from qexport.passes._ir import const_f64, new_initializer, set_const_input, set_graph_output
from qexport.passes._settings import coerce_enums
from qexport.passes.discovery.linear_select import linear_names
from qexport.passes.discovery.names import NameFilter, check_glob_fields
from qexport.passes.metadata import ACTIVATION_QUANT, Meta

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class QuantizedLinear:
    """A MatMul/Gemm of the quantized graph reading a weight DequantizeLinear, with its float twin."""

    node: ir.Node
    name: str  # role name (``layers.3.mlp.down``) from the float graph, else the node name
    x: ir.Value  # the float activation before its Q/DQ (the linear's input if the activation stays float)
    weight: np.ndarray  # float [in, out] weight of the reference graph
    layer: int | None


class Sequential(str, enum.Enum):
    PER_INPUT = "per_input"  # one stage per activation read by quantized linears (q/k/v, o, gate/up, down): exact
    PER_LAYER = "per_layer"  # one stage per decoder layer: within a layer, o/gate/up/down see q/k/v uncorrected


@dataclasses.dataclass(frozen=True)
class BiasCorrectPass(ir.passes.InPlacePass):
    """For each quantized linear, e = mean over calibration tokens of (Q(X) Q(W) - X W) in float64, then b <- b - e.

    X is the linear's input in the quantized graph itself, so each linear's statistics see the earlier linears
    already quantized and corrected (AWEQ's sequential order). Stages run in graph order (``sequential``: per
    activation, or per decoder layer), each on the first ``max_windows`` of the ``calibrator``'s windows, with the
    corrections found so far fed in (:meth:`~qexport.calibration.calibrator.Calibrator.bias_errors`). W is the
    float weight of ``reference``, the graph before quantization, matched by node name (the pipeline provides
    ``reference`` and ``calibrator``). Rewrite cases, for each quantized linear (a MatMul/Gemm whose weight is a
    ``DequantizeLinear`` tagged by quantization) whose role name, node name or float weight name matches a glob of
    ``linears`` (a list, as ``quantize`` selects):

    1. Gemm: C -= e (C added when absent);
    2. MatMul followed by a constant bias Add: the bias -= e;
    3. MatMul without a bias: a new ``Add(y, -e)`` after it (on q/k before RoPE, which is linear).

    Corrected nodes are marked (``qexport.bias_corrected``) and skipped by a second run.
    """

    lossless: ClassVar[bool] = False

    reference: ir.Model | None = None
    calibrator: Calibrator | None = None
    linears: tuple[str, ...] = ("*",)
    sequential: Sequential = Sequential.PER_INPUT
    max_windows: int = 2  # calibration windows used (the first ones), run once per stage

    def __post_init__(self) -> None:
        check_glob_fields(self, "bias-correct", "linears")
        coerce_enums(self, "bias-correct", sequential=Sequential)
        if self.max_windows < 1:
            raise RecipeError(f"bias-correct max_windows must be at least 1, got {self.max_windows}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.reference is None or self.calibrator is None:
            raise RecipeError("bias-correct needs the float graph before quantization (reference) and calibration "
                              "windows (calibrator); run it through a recipe, after quantize/quantize-gptq")
        targets = quantized_linears(model, self.reference, NameFilter(self.linears))
        if not targets:
            return ir.passes.PassResult(model, False)
        calibrator = self.calibrator.head(self.max_windows)
        probes = {t.node: ErrorProbe(t.x, t.node.outputs[0], t.weight, _gemm_c(t.node),
                                     _insert_correction(model.graph, t.node)) for t in targets}
        stages: dict[object, list[ErrorProbe]] = {}
        for t in targets:
            stages.setdefault(t.x if self.sequential is Sequential.PER_INPUT else t.layer, []).append(probes[t.node])
        errors = calibrator.bias_errors(model, list(stages.values()))
        for t in targets:
            _write_correction(model.graph, t.node, probes[t.node].correction, errors[probes[t.node]])
            t.node.metadata_props[Meta.BIAS_CORRECTED] = "1"
        log.info("bias correction on %d quantized linears in %d stages from %d windows; max |e| %.3g", len(targets),
                 len(stages), len(calibrator.windows), max(float(np.abs(e).max()) for e in errors.values()))
        return ir.passes.PassResult(model, True)


def quantized_linears(model: ir.Model, reference: ir.Model, names: NameFilter = NameFilter()) -> list[QuantizedLinear]:
    """Quantized linears of ``model`` (graph order) matched by node name to float linears of ``reference``, those
    whose role, node or float weight name ``names`` matches."""
    roles = {node.name: role for node, role in linear_names(reference).items()}
    floats = {node.name: lin for node in reference.graph if (lin := site_matching.match_linear(node)) is not None}
    found = []
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gemm") or node.domain != "" or Meta.BIAS_CORRECTED in node.metadata_props:
            continue
        w = node.inputs[1].producer() if len(node.inputs) > 1 and node.inputs[1] is not None else None
        if w is None or w.metadata_props.get(Meta.QUANT) != "weight" or node.name not in floats:
            continue
        role = roles.get(node.name, node.name)
        if not names.matches(role, node.name, floats[node.name].weight.name or ""):
            continue
        a = node.inputs[0].producer()
        quantized_x = a is not None and a.op_type == "DequantizeLinear" and a.metadata_props.get(Meta.QUANT) in ACTIVATION_QUANT
        x = a.inputs[0].producer().inputs[0] if quantized_x else node.inputs[0]
        match = re.match(r"layers\.(\d+)\.", role)
        found.append(QuantizedLinear(node, role, x, floats[node.name].weight_in_out(), int(match[1]) if match else None))
    return found


def _gemm_c(node: ir.Node) -> np.ndarray | float:
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        return const_f64(node.inputs[2])
    return 0.0


def _insert_correction(graph: ir.Graph, node: ir.Node) -> ir.Value:
    """``Add(y, b)`` after the linear's output y, b = 0 for now; returns b."""
    y = node.outputs[0]
    dtype = node.inputs[1].dtype.numpy() if node.inputs[1].dtype is not None else np.float32
    out_features = node.inputs[1].shape[0 if node.op_type == "Gemm" and _trans_b(node) else -1]
    b = new_initializer(graph, f"{node.name}.bias_correction", np.zeros(int(out_features), dtype))
    add = ir.node("Add", [y, b], name=f"{node.name}.bias_correction")
    out = add.outputs[0]
    out.name, out.dtype, out.shape = f"{y.name}.bias_corrected", y.dtype, y.shape
    graph.insert_after(node, add)
    for user, index in list(y.uses()):
        if user is not add:
            user.replace_input_with(index, out)
    if y.is_graph_output():
        set_graph_output(graph, y, out)
    return b


def _trans_b(node: ir.Node) -> bool:
    attr = node.attributes.get("transB")
    return attr is not None and attr.value == 1


def _write_correction(graph: ir.Graph, node: ir.Node, b: ir.Value, e: np.ndarray) -> None:
    """Fold -e into the linear's own bias (Gemm C, a constant bias Add) and drop the correction Add, else keep
    the Add with b = -e."""
    add = b.consumers()[0]
    out, y = add.outputs[0], node.outputs[0]
    readers = out.consumers()
    target: tuple[ir.Node, int] | None = None
    if out.is_graph_output():
        target = None
    elif node.op_type == "Gemm":
        target = (node, 2)
    elif len(readers) == 1 and readers[0].op_type == "Add" and not out.is_graph_output():
        index = 1 if readers[0].inputs[0] is out else 0
        bias = readers[0].inputs[index]
        if bias is not None and bias.const_value is not None and bias.const_value.numpy().shape == e.shape:
            target = (readers[0], index)
    if target is None:
        b.const_value = ir.tensor((-e).astype(b.const_value.numpy().dtype), name=b.name)
        return
    owner, index = target
    if len(owner.inputs) > index and owner.inputs[index] is not None:
        set_const_input(graph, owner, index, const_f64(owner.inputs[index]) - e, f"{node.name}.bias")
    else:  # a Gemm without C
        owner.resize_inputs(index + 1)
        owner.replace_input_with(index, new_initializer(graph, f"{node.name}.bias", (-e).astype(b.const_value.numpy().dtype)))
    out.replace_all_uses_with(y)
    graph.remove(add, safe=True)
    del graph.initializers[b.name]
