"""W8A8 / W4A8 quantization as QuantizeLinear/DequantizeLinear nodes on the weight linears of an exported LM."""

from __future__ import annotations

import dataclasses
import enum
import logging
from typing import ClassVar, Mapping

import onnx_ir as ir

from qexport.errors import RecipeError
from qexport.passes.discovery import sites as site_matching
from qexport.calibration.calibrator import ActCalibration, ActivationScale, Calibrator
from qexport.passes._settings import coerce_enums
from qexport.passes.discovery.linear_select import prequantized_linears, selected_linears
from qexport.passes.discovery.names import NameFilter, check_glob_fields
from qexport.passes.metadata import Meta
from qexport.passes.quantize.act_qdq import SharedConsts, per_block_qdq, per_tensor_qdq, per_token_qdq
from qexport.passes.quantize.weight_quant import (WeightClip, WeightFormat, WeightQuant, check_group_divides,
                                                  write_quantized_weight)

log = logging.getLogger(__name__)


class ActQuant(str, enum.Enum):
    PER_TOKEN = "per_token"  # dynamic: scale_t = max_j |x_tj| / 127, computed in the graph
    PER_TENSOR = "per_tensor"  # static: one calibrated scale per activation tensor
    PER_GROUP = "per_group"  # dynamic: one scale per token and group_size input channels, computed in the graph
    NONE = "none"  # weight-only


@dataclasses.dataclass(frozen=True)
class QuantizePass(ir.passes.InPlacePass):
    """Quantize weight linears to W8A8 (or W4A8) in QDQ form (portable; ``ort-int8`` turns int8 into integer kernels).

    Rewrite cases, for each linear found by ``match_linear`` (never QK/AV MatMuls, the mask Add, or nodes
    tagged ``qexport.online_*``) whose role name (:func:`linear_names`, e.g. ``layers.*.mlp.down``), node name
    or weight name matches a glob of ``linears`` and none of ``exclude`` (lists of globs, one
    :class:`~qexport.passes.discovery.names.NameFilter`; an exclude glob matching no selected linear is an
    error), lm_head only with ``include_lm_head``:

    1. weight: an int8 initializer q = clip(round(W / s), -127, 127), s = per-output-channel absmax / 127,
       feeding ``DequantizeLinear(q, s, axis)`` (axis 1 for MatMul B [in, out], 0 for Gemm transB = 1); a tied
       lm_head's Transpose is bypassed (the embedding Gather keeps the float table); with ``weights: int4``
       an INT4 initializer per ``group_size`` input channels feeding a blocked opset-21 DequantizeLinear along
       the input axis, with ``dint4`` INT4 codes through a level lookup (:mod:`~qexport.passes.quantize.weight_quant`);
       ``weight_clip: mse`` searches each scale's clip ratio for the least squared weight error;
    2. ``per_token`` activation: ``Abs -> ReduceMax(-1) -> Div(127) -> Max(eps)`` gives s_t, then blocked
       ``QuantizeLinear(x, s_t, int8, block_size=K) -> DequantizeLinear`` (opset 21): per-token symmetric int8;
    3. ``per_group`` activation: as ``per_token`` with one scale per token and ``group_size`` consecutive input
       channels (``Reshape`` to [..., K / group_size, group_size] for the absmax, then blocked Q/DQ along the last
       axis): what ``com.microsoft.MatMulNBits`` at ``accuracy_level`` 4 computes inside the kernel, so
       ``ort-nbits`` lowers it exactly; the weights' own groups, when they have them, are the same channels;
    4. ``per_tensor`` activation: ``QuantizeLinear(x, s) -> DequantizeLinear`` with int8 zero point 0 and a
       calibrated scale s = absmax / 127 (``minmax``), the ``percentile`` of per-token absmax / 127 or the MSE
       clip / 127 (``mse``), from the ``calibrator``'s windows run through the graph as it is before this pass
       (each quantized value records them in ``value.meta[Meta.ACT_CALIBRATION]``).

    One activation quantizer is shared by all selected linears reading the same tensor (q/k/v, gate/up); an
    excluded linear keeps its float weight and reads the float tensor, even where its siblings are quantized.
    Linears whose weight is already dequantized (from ``quantize-gptq``) keep it and get only case 2/3.
    Quantized linears no longer match ``match_linear`` (B is computed), so a second run changes nothing.
    """

    lossless: ClassVar[bool] = False

    activations: ActQuant = ActQuant.PER_TOKEN
    calibration: ActCalibration = ActCalibration.MINMAX
    percentile: float = 99.9
    linears: tuple[str, ...] = ("*",)
    include_lm_head: bool = False
    exclude: tuple[str, ...] = ()
    weights: WeightQuant = WeightQuant.INT8
    group_size: int = 128
    weight_clip: WeightClip = WeightClip.NONE
    calibrator: Calibrator | None = None  # per_tensor activations only; the pipeline provides it

    def __post_init__(self) -> None:
        check_glob_fields(self, "quantize", "linears", "exclude")
        fmt = WeightFormat(self.weights, self.group_size, self.weight_clip)  # validates the weight settings
        object.__setattr__(self, "weights", fmt.kind)
        object.__setattr__(self, "weight_clip", fmt.clip)
        coerce_enums(self, "quantize", activations=ActQuant, calibration=ActCalibration)
        if not 0.0 < self.percentile <= 100.0:
            raise RecipeError(f"quantize percentile must be within (0, 100], got {self.percentile}")

    @property
    def weight_format(self) -> WeightFormat:
        return WeightFormat(self.weights, self.group_size, self.weight_clip)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = NameFilter(self.linears, self.exclude)
        linears = {lin.node: lin for lin in selected_linears(model, names, self.include_lm_head)}
        prequantized = set(prequantized_linears(model, names, self.include_lm_head))
        if self.activations is ActQuant.NONE:
            prequantized = set()  # nothing to add to them
        by_input: dict[ir.Value, list[ir.Node]] = {}
        for node in graph:  # graph order: the first reader of each activation comes first
            if node in linears or node in prequantized:
                by_input.setdefault(node.inputs[0], []).append(node)
        if not by_input:
            return ir.passes.PassResult(model, False)
        fmt = self.weight_format
        for linear in linears.values():  # a group size that does not fit is an error before anything changes
            fmt.group_rows(linear.in_features, linear.node.name)
        if self.activations is ActQuant.PER_GROUP:
            for x, readers in by_input.items():
                check_group_divides(_in_features(readers[0], linears), self.group_size, readers[0].name,
                                    "quantize activations: per_group: ")
        scales: Mapping[ir.Value, ActivationScale] = {}
        if self.activations is ActQuant.PER_TENSOR:
            if self.calibrator is None:
                raise RecipeError("quantize with per_tensor activations needs calibration windows (run it through a "
                                  "recipe, or pass calibrator=Calibrator(windows))")
            scales = self.calibrator.activation_scales(model, list(by_input), self.calibration, self.percentile)
            for value, found in scales.items():
                value.meta[Meta.ACT_CALIBRATION] = found.record()
        consts = SharedConsts(graph)
        for x, readers in by_input.items():
            width = _in_features(readers[0], linears)
            if self.activations is ActQuant.PER_TOKEN:
                xq, _ = per_token_qdq(graph, x, width, readers[0], consts)
            elif self.activations is ActQuant.PER_GROUP:
                xq, _ = per_block_qdq(graph, x, width, self.group_size, readers[0], consts, tag="per_group")
            elif self.activations is ActQuant.PER_TENSOR:
                xq = per_tensor_qdq(graph, x, scales[x].scale, readers[0])
            else:
                xq = x
            for node in readers:
                if node in linears:
                    _quantize_weight(graph, linears[node], fmt)
                if xq is not x:
                    node.replace_input_with(0, xq)
        log.info("quantized %d linears (%d with weights already int8; %d activation tensors, %s)",
                 len(linears) + len(prequantized), len(prequantized), len(by_input), self.activations.value)
        return ir.passes.PassResult(model, True)


def _in_features(node: ir.Node, linears: dict[ir.Node, site_matching.Linear]) -> int:
    if node in linears:
        return linears[node].in_features
    shape = node.inputs[1].shape  # a pre-quantized weight: [in, out], or [out, in] for Gemm transB
    trans_b = node.op_type == "Gemm" and node.attributes.get_int("transB", 0)
    return int(shape[1] if trans_b else shape[0])


def _quantize_weight(graph: ir.Graph, linear: site_matching.Linear, fmt: WeightFormat) -> None:
    """Replace the linear's float weight input by its dequantized codes in ``fmt``, rounded to nearest."""
    q, scale = fmt.quantize(linear.weight_in_out(), linear.node.name)
    write_quantized_weight(graph, linear, q, scale, fmt)
