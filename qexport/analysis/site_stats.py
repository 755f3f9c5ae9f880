"""Per quantized site statistics for the manifest: activation absmax, chosen scale and clip, weight scale range."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from qexport.passes.metadata import ACTIVATION_QUANT, Meta


def _round(x: float) -> float:
    return float(f"{x:.4g}")


def _const(value: ir.Value | None) -> np.ndarray | None:
    return None if value is None or value.const_value is None else value.const_value.numpy()


def quantized_site_stats(model: ir.Model, names: dict[ir.Node, str]) -> dict[str, dict[str, Any]]:
    """For each node of ``names`` (role names from ``linear_names`` before quantization) whose weight is a
    quantization ``DequantizeLinear`` now: ``act`` (per_tensor, per_token or float), for calibrated
    per-tensor activations ``absmax``, ``clip`` and ``scale``, and ``w_scale`` = [min, max] of the weight scales."""
    found: dict[str, dict[str, Any]] = {}
    for node in model.graph:
        if node not in names or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        w = node.inputs[1].producer()
        if w is None or w.metadata_props.get(Meta.QUANT) != "weight":
            continue
        entry: dict[str, Any] = {"act": "float"}
        a = node.inputs[0].producer()
        if a is not None and a.op_type == "DequantizeLinear" and a.metadata_props.get(Meta.QUANT) in ACTIVATION_QUANT:
            entry["act"] = a.metadata_props[Meta.QUANT]
            meta = a.inputs[0].producer().inputs[0].meta.get(Meta.ACT_CALIBRATION)
            if meta is not None:
                entry.update({"method": meta["method"], "absmax": _round(meta["absmax"]), "clip": _round(meta["clip"]),
                              "scale": _round(meta["scale"])})
        w_scale = _const(w.inputs[1])
        if w_scale is not None:
            entry["w_scale"] = [_round(float(w_scale.min())), _round(float(w_scale.max()))]
        found[names[node]] = entry
    return found
