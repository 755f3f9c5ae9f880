"""Per-site error of a quantized graph against its FP32 twin (see :mod:`qexport.report.reference`).

For each quantized linear, on the same evaluation tokens run through both graphs (prefill, empty cache):
- ``output``: the quantized graph's linear output against the FP32 twin's output. Everything upstream is
  in it: this is the error as it has accumulated by this point of the network.
- ``local``: the quantized linear's output against the same linear with float weight and float activation
  on the quantized graph's own input (x @ W + b). This is the error this one linear adds.
Outputs are taken after the linear's bias (and after a ``bias-correct`` correction, whose effect is counted).
- ``activation``: the quantizer's input against its dequantized output (activation quantization alone);
  ``clipped`` is the fraction of activation entries above the per-tensor clip (scale * 127).
- ``weight``: the int8 weight against the reference weight (weight quantization alone).
- ``per_token_sim``: for per-tensor activations, the activation SQNR that symmetric int8 per-token scales
  (absmax / 127 per row) would give on the same tokens, simulated in numpy: what per_token would buy.

SQNR is 10 log10(Σ ref² / Σ (q - ref)²) in dB over all tokens and channels; cosine is the mean over tokens
of the per-token cosine. Per input channel, the activation's absmax is kept for the channel profiles.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import onnx_ir as ir

from qexport import numerics
from qexport.passes.quantize.insert_qdq import ActQuant
from qexport.report.reference import QuantizedLinear

log = logging.getLogger(__name__)


class _Sums:
    """Running sums for one signal/noise pair."""

    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0
        self.cos_sum = 0.0
        self.tokens = 0

    def add(self, got: np.ndarray, ref: np.ndarray) -> None:
        got, ref = got.reshape(-1, got.shape[-1]).astype(np.float64), ref.reshape(-1, ref.shape[-1]).astype(np.float64)
        signal, noise = numerics.signal_noise(ref, got)
        self.signal += signal
        self.noise += noise
        self.cos_sum += float(numerics.row_cosines(got, ref, floor="max").sum())
        self.tokens += got.shape[0]

    @property
    def sqnr_db(self) -> float:
        return numerics.sqnr_db_from_sums(self.signal, self.noise)

    @property
    def cosine(self) -> float:
        return self.cos_sum / max(self.tokens, 1)


def site_errors(quantized: ir.Model, reference: ir.Model, linears: Sequence[QuantizedLinear],
                windows: Sequence[np.ndarray], threads: int | None = None) -> list[dict[str, Any]]:
    """One row per quantized linear, worst local SQNR first (see the module docstring for the columns)."""
    from qexport.calibration.stats import run_values

    q_names = sorted({n for lin in linears for n in (lin.activation, lin.dequantized, lin.output)})
    r_names = sorted({lin.ref_output for lin in linears})
    sums = {lin.name: {k: _Sums() for k in ("output", "local", "activation", "per_token_sim")} for lin in linears}
    absmax = {lin.name: np.zeros(lin.weight.shape[0]) for lin in linears}
    clipped = {lin.name: 0 for lin in linears}
    entries = {lin.name: 0 for lin in linears}
    ref_runs = run_values(reference, r_names, windows, threads)
    for index, q_out in enumerate(run_values(quantized, q_names, windows, threads)):
        r_out = next(ref_runs)
        for lin in linears:
            s = sums[lin.name]
            x = q_out[lin.activation]
            y = q_out[lin.output]
            s["output"].add(y, r_out[lin.ref_output])
            local_ref = x @ lin.weight + (lin.bias if lin.bias is not None else 0.0)
            s["local"].add(y, local_ref)
            s["activation"].add(q_out[lin.dequantized], x)
            if lin.act_quant is ActQuant.PER_TENSOR:
                s["per_token_sim"].add(numerics.fake_quant(x.astype(np.float64), eps=numerics.SCALE_EPS), x)
            flat = np.abs(x.reshape(-1, x.shape[-1]))
            np.maximum(absmax[lin.name], flat.max(axis=0), out=absmax[lin.name])
            if lin.clip is not None:
                clipped[lin.name] += int((flat > lin.clip * (1 + 1e-6)).sum())
            entries[lin.name] += flat.size
        log.debug("report window %d done", index + 1)
    rows = []
    for lin in linears:
        s = sums[lin.name]
        rows.append({
            "site": lin.name,
            "node": lin.node,
            "act_quant": lin.act_quant.value,
            "output_sqnr_db": s["output"].sqnr_db,
            "output_cosine": s["output"].cosine,
            "local_sqnr_db": s["local"].sqnr_db,
            "local_cosine": s["local"].cosine,
            "activation_sqnr_db": s["activation"].sqnr_db,
            "weight_sqnr_db": lin.weight_sqnr_db,
            "per_token_act_sqnr_db": s["per_token_sim"].sqnr_db if lin.act_quant is ActQuant.PER_TENSOR else None,
            "clip": lin.clip,
            "clipped_fraction": clipped[lin.name] / max(entries[lin.name], 1) if lin.clip is not None else None,
            "channel_absmax": absmax[lin.name].tolist(),
            "tokens": s["local"].tokens,
        })
    rows.sort(key=lambda r: r["local_sqnr_db"])
    return rows
