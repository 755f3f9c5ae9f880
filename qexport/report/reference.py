"""The FP32 reference of a quantized export, in the quantized graph's own basis.

A recipe's lossless passes (smoothing, norm folding, rotations) change every linear's weights and inputs but
not the model's function; the quantization passes after them change only precision. So the FP32 export with
the recipe's lossless prefix applied (calibrated on the same calibration text as the export) holds the same
linears, under the same node names, in the same basis: each quantized linear has a float twin whose output
is the reference for that linear's output. This module rebuilds that twin graph and pairs the linears.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qexport import numerics
from qexport.artifact.folder import MODEL_FILE, Artifact
from qexport.errors import QexportError
from qexport.passes.discovery import sites as site_matching
from qexport.passes.discovery.linear_select import linear_names
from qexport.passes.metadata import ACTIVATION_QUANT, Meta
from qexport.passes.quantize.insert_qdq import ActQuant
from qexport.recipes.registry import is_lossless
from qexport.recipes.schema import Recipe, pass_class

log = logging.getLogger(__name__)

# int8 per-channel weights sit near 40 dB and int4 per group near 20 dB; against a weight in another basis
# (another rotation) the "error" is as large as the weight, about -3 dB
MIN_WEIGHT_SQNR_DB = 10.0


class ReportError(QexportError):
    """The report cannot be built for this folder (not quantized, lowered graph, mismatched reference)."""


@dataclasses.dataclass(frozen=True)
class QuantizedLinear:
    """A quantized linear of the QDQ graph, paired with its float twin in the reference graph."""

    name: str  # role name: layers.3.mlp.down, lm_head, ...
    node: str  # node name, the same in both graphs
    activation: str  # float activation the quantizer reads (the MatMul input when activations stay float)
    dequantized: str  # the MatMul's input 0 (after Q/DQ)
    output: str  # the linear's output after its bias in the quantized graph (and after a bias correction)
    ref_output: str  # the twin's output after its bias
    act_quant: ActQuant  # how the activation is quantized (NONE: it stays float)
    clip: float | None  # per_tensor: the largest representable |x| (scale * 127)
    weight: np.ndarray  # reference weight [in, out], float64
    bias: np.ndarray | None  # reference bias when the Gemm itself adds it
    weight_sqnr_db: float  # dequantized int8 weight against the reference weight


def lossless_prefix(recipe: Recipe) -> Recipe:
    """The recipe's passes before its first lossy (quantization) pass."""
    prefix = []
    for entry in recipe.passes:
        if not is_lossless(pass_class(entry.name)):
            break
        prefix.append(entry)
    return Recipe(f"{recipe.name}-lossless-prefix", tuple(prefix), recipe.description)


def reference_model(artifact: Artifact, reference: str | os.PathLike | None = None,
                    threads: int | None = None) -> ir.Model:
    """The FP32 graph with the artifact's lossless recipe prefix applied.

    ``reference``: an FP32 qexport folder of the same source (skips re-exporting); else the source model
    recorded in the manifest is exported again in memory.
    """
    from qexport.recipes.pipeline import PipelineSettings, apply_recipe
    from qexport.exporter.text import TextSource, load_text, token_windows

    manifest = artifact.manifest
    report = manifest.get("recipe")
    if "foreign" in manifest:
        raise ReportError(f"{artifact.folder} was not written by qexport (it has a {manifest['foreign']} but no "
                          "qexport.json): the report compares a qexport-quantized export with its FP32 twin; "
                          "use qexport eval --no-reference to score this folder")
    if not report:
        raise ReportError(f"{artifact.folder} was exported without a recipe: there is no quantized model to report on; "
                          "export with --recipe w8a8-static (or another quantization preset)")
    model = _fp32_graph(artifact, reference)
    prefix = lossless_prefix(Recipe.from_dict(report["recipe"]))
    if prefix.passes:
        calibration = manifest.get("calibration") or {}
        source = TextSource(**calibration.get("source", {}))
        windows = token_windows(artifact.tokenizer(), load_text(source, "calibration"), calibration.get("seq_len", 512),
                                calibration.get("windows", 16), source.describe())
        log.info("rebuilding the FP32 reference: %s on %d calibration windows", [e.name for e in prefix.passes], len(windows))
        apply_recipe(model, prefix, windows, PipelineSettings(measure_difficulty=False, threads=threads))
    return model


def _fp32_graph(artifact: Artifact, reference: str | os.PathLike | None) -> ir.Model:
    if reference is not None:
        ref = Artifact.open(reference)
        if ref.manifest.get("recipe"):
            raise ReportError(f"--reference {reference} is itself transformed by recipe "
                              f"{ref.manifest['recipe']['name']!r}; pass the plain FP32 export of the same model")
        if ref.manifest.get("source") != artifact.manifest.get("source"):
            raise ReportError(f"--reference {reference} was exported from {ref.manifest.get('source')}, not from "
                              f"{artifact.manifest.get('source')}; pass the FP32 export of the same model")
        return ir.load(Path(reference) / MODEL_FILE)
    from qexport.exporter.graph_export import ExportSettings, export_graph
    from qexport.exporter.loading import load_model

    log.info("exporting the FP32 reference again from %s", artifact.source.location)
    _, family, hf_model, _ = load_model(artifact.source)
    settings = ExportSettings(dtype=artifact.manifest.get("dtype", "fp32"), kv_cache=artifact.signature.kv_cache)
    model, _ = export_graph(hf_model, family, settings)
    return model


def pair_linears(quantized: ir.Model, reference: ir.Model, threads: int | None = None) -> list[QuantizedLinear]:
    """The quantized linears of ``quantized`` (weight from a DequantizeLinear tagged by the quantize passes),
    each with its reference weight and role name from ``reference``, in graph order."""
    ref_nodes = {node.name: node for node in reference.graph}
    roles = {node.name: name for node, name in linear_names(reference).items()}
    found = []
    for node in quantized.graph:
        if node.op_type == "MatMulIntegerToFloat":
            raise ReportError("the graph is lowered to ONNX Runtime integer kernels (ort-int8), whose linears have no "
                              "float output to compare; report on the QDQ form of the recipe (e.g. w8a8-dynamic-qdq)")
        if node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        if not _weight_dq(node.inputs[1]):
            continue
        twin = ref_nodes.get(node.name)
        linear = site_matching.match_linear(twin) if twin is not None else None
        if linear is None:
            raise ReportError(f"quantized linear {node.name!r} has no float twin in the reference graph; the reference "
                              "was not rebuilt from the model this folder was quantized from (pass --reference)")
        found.append((node, linear))
    if not found:
        raise ReportError("the graph has no quantized linears (no DequantizeLinear weights); nothing to report per site")
    weights = {node.name: _dequantized_weight(node) for node, _ in found}
    computed = [node for node, _ in found if weights[node.name] is None]  # e.g. dINT4 codes through a lookup
    if computed:
        weights.update(_computed_weights(quantized, computed, threads))
    return [_pair(node, weights[node.name], linear, roles.get(node.name, node.name)) for node, linear in found]


def _weight_dq(value: ir.Value) -> bool:
    """Whether ``value`` is a weight the quantize passes wrote (DequantizeLinear, or dINT4's lookup chain)."""
    node = value.producer()
    return node is not None and node.metadata_props.get(Meta.QUANT) == "weight"


def _pair(node: ir.Node, w_q: np.ndarray, linear: site_matching.Linear, name: str) -> QuantizedLinear:
    a = node.inputs[0]
    act_dq = a.producer()
    tag = act_dq.metadata_props.get(Meta.QUANT) if act_dq is not None else None
    activation, clip, kind = a, None, ActQuant.NONE
    if act_dq is not None and act_dq.op_type == "DequantizeLinear" and tag in ACTIVATION_QUANT:
        kind = ActQuant(tag)
        q = act_dq.inputs[0].producer()
        activation = q.inputs[0]
        if kind is ActQuant.PER_TENSOR:
            clip = float(q.inputs[1].const_value.numpy()) * numerics.INT8_QMAX
    w_ref = linear.weight_in_out()
    if w_q.shape != w_ref.shape:
        raise ReportError(f"{name}: quantized weight {w_q.shape} and reference weight {w_ref.shape} differ in shape; "
                          "pass --reference with the FP32 export this model was quantized from")
    sqnr = numerics.sqnr_db(w_ref, w_q)
    if sqnr < MIN_WEIGHT_SQNR_DB:
        raise ReportError(f"{name}: the quantized weight is not a quantization of the rebuilt reference weight (SQNR "
                          f"{sqnr:.1f} dB < {MIN_WEIGHT_SQNR_DB} dB): the reference is in another basis; pass --reference "
                          "with the FP32 export this model was quantized from, and keep the same calibration text")
    bias = linear.bias_array()
    return QuantizedLinear(name, node.name, activation.name, a.name, _after_bias(node, linear).name, linear.output.name, kind, clip,
                           w_ref.astype(np.float32), None if bias is None else bias.astype(np.float32), sqnr)


def _after_bias(node: ir.Node, linear: site_matching.Linear) -> ir.Value:
    """The linear's output after the constant Adds that follow it: its bias (as in the twin), and a correction
    added by ``bias-correct`` (case 3 of that pass; its other cases change the existing bias)."""
    adds = int(linear.bias_node is not None and linear.bias_node is not linear.node)
    adds += int(Meta.BIAS_CORRECTED in node.metadata_props and node.op_type == "MatMul" and not adds)
    value = node.outputs[0]
    for _ in range(adds):
        if len(value.uses()) != 1:
            break
        user = next(iter(value.consumers()))
        other = [v for v in user.inputs if v is not value]
        if user.op_type != "Add" or len(other) != 1 or other[0] is None or other[0].const_value is None:
            break
        value = user.outputs[0]
    return value


def _dequantized_weight(node: ir.Node) -> np.ndarray | None:
    """The MatMul/Gemm's weight as a float64 [in, out] matrix when it is DequantizeLinear(constant, constant scale)
    (per-channel ``axis`` or blocked ``block_size``); None otherwise."""
    dq = node.inputs[1].producer()
    if dq is None or dq.op_type != "DequantizeLinear" or any(v is None or v.const_value is None for v in dq.inputs[:2]):
        return None
    q = dq.inputs[0].const_value.numpy().astype(np.float64)
    scale = dq.inputs[1].const_value.numpy().astype(np.float64)
    axis = dq.attributes["axis"].value if "axis" in dq.attributes else 1
    axis = axis % q.ndim
    block = dq.attributes["block_size"].value if "block_size" in dq.attributes else 0
    if block:
        scale = np.repeat(scale, block, axis=axis)[tuple(slice(0, n) for n in q.shape)]
    elif scale.ndim == 1:
        shape = [1] * q.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
    w = q * scale
    if w.ndim != 2:
        return None
    trans_b = node.op_type == "Gemm" and "transB" in node.attributes and node.attributes["transB"].value == 1
    return w.T if trans_b else w


def _computed_weights(model: ir.Model, nodes: list[ir.Node], threads: int | None) -> dict[str, np.ndarray]:
    """Weights computed in the graph (a lookup before the scale): read off one ONNX Runtime run of two tokens."""
    from qexport.calibration.stats import run_values

    names = [node.inputs[1].name for node in nodes]
    values = next(run_values(model, names, [np.zeros(2, dtype=np.int64)], threads))
    out = {}
    for node in nodes:
        w = values[node.inputs[1].name].astype(np.float64)
        trans_b = node.op_type == "Gemm" and "transB" in node.attributes and node.attributes["transB"].value == 1
        out[node.name] = w.T if trans_b else w
    return out
