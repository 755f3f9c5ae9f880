"""The calibration text and how to run it: what a pass that calibrates is given, and all it may use.

Passes transform graphs; they never open ONNX Runtime sessions. A pass that needs calibration declares a
``calibrator: Calibrator | None`` field (the pipeline provides it, found by type) and asks it for what it needs:
per-tensor activation scales (``quantize``), the Hessians of linear inputs stage by stage (``quantize-gptq``),
activation rows sampled from the windows (``aqas``, ``affine``), the absmax of the values entering the KV cache
(``quantize-kv``), the mean output errors of quantized linears
(``bias-correct``). Each is computed on the graph as it is when asked, so sequential GPTQ sees its earlier layers
quantized and ``quantize`` after GPTQ sees GPTQ's weights; each returns a typed result the pass only reads.

The result types passes read are importable from here: :class:`CalibrationStats` (the site statistics the
pipeline collects for ``stats`` fields), :class:`ActivationScale`, :class:`StageHessians`, :class:`ErrorProbe`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Iterator, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from qexport.calibration.activation_scales import ActCalibration, ActivationScale, static_scales
from qexport.calibration.layer_sessions import StagedRuns
from qexport.calibration.stats import CalibrationStats, TensorStats, ValueSession
from qexport.errors import QexportError

__all__ = ["ActCalibration", "ActivationScale", "CalibrationStats", "Calibrator", "ErrorProbe", "StageHessians",
           "TensorStats"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StageHessians:
    """H = X^T X / N (float64 [C, C]) of each value of one stage over the calibration windows."""

    hessians: Mapping[ir.Value, np.ndarray]
    from_cache: bool  # the stage ran from the cached residual stream (else through the whole graph up to it)


@dataclasses.dataclass(frozen=True, eq=False)
class ErrorProbe:
    """One linear whose mean output error is measured: y - offset against x @ weight, for the bias it is
    corrected by (an initializer of the graph, fed -error once its stage is measured)."""

    x: ir.Value  # the float input
    y: ir.Value  # the output, before ``correction`` is added
    weight: np.ndarray  # float [in, out]
    offset: np.ndarray | float  # subtracted from y (a Gemm's C), 0.0 for none
    correction: ir.Value


@dataclasses.dataclass(frozen=True, eq=False)
class Calibrator:
    """Token windows (int64, [seq] or [batch, seq]) and the ONNX Runtime threads to run them with (None: all)."""

    windows: tuple[np.ndarray, ...]
    threads: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "windows", tuple(self.windows))
        if not self.windows:
            raise QexportError("no calibration windows were given")

    def head(self, count: int) -> Calibrator:
        """The same calibration on the first ``count`` windows."""
        return Calibrator(self.windows[:count], self.threads)

    def fingerprint(self) -> str:
        """A content hash of the windows (marks what a pass was fitted on; the same windows give the same mark)."""
        digest = hashlib.sha256()
        for window in self.windows:
            array = np.ascontiguousarray(window, dtype=np.int64)
            digest.update(str(array.shape).encode() + array.tobytes())
        return digest.hexdigest()[:32]

    def activation_scales(self, model: ir.Model, values: Sequence[ir.Value], method: ActCalibration,
                          percentile: float = 99.9) -> Mapping[ir.Value, ActivationScale]:
        """The per-tensor int8 scale of each value, and what it was chosen from (see :func:`static_scales`)."""
        return static_scales(model, values, self.windows, method, percentile, self.threads)

    def hessians(self, model: ir.Model, stages: Sequence[Sequence[ir.Value]], cached: bool = True
                 ) -> Iterator[StageHessians]:
        """The Hessians of each stage's values, stage after stage: stage k runs when its item is asked for, on
        the graph as it is then (weights may change between stages, as sequential GPTQ changes them). With
        ``cached``, a stage runs from the residual stream cached by the one before it
        (:class:`~qexport.calibration.layer_sessions.StagedRuns`), else through the whole graph."""
        runs = StagedRuns(model, stages, self.windows, self.threads, cached=cached)
        for k, values in enumerate(stages):
            before = runs.from_cache
            found = _hessians(values, runs.run(k))
            yield StageHessians(found, runs.from_cache > before)

    def absmax(self, model: ir.Model, values: Sequence[ir.Value], keep_axes: Sequence[int]) -> dict[ir.Value, np.ndarray]:
        """Max |x| (float64) of each value over all windows, reduced over every axis but ``keep_axes`` (e.g. (1, 3):
        per head and channel of a [batch, heads, seq, head_dim] key or value entering the KV cache)."""
        session = ValueSession(model, list(dict.fromkeys(v.name for v in values)), self.threads)
        found: dict[ir.Value, np.ndarray] = {}
        for window in self.windows:
            outs = session.run(window)
            for v in values:
                x = np.abs(outs[v.name])
                kept = {a % x.ndim for a in keep_axes}
                peak = x.max(axis=tuple(i for i in range(x.ndim) if i not in kept)).astype(np.float64)
                found[v] = np.maximum(found[v], peak) if v in found else peak
        return found

    def sample_rows(self, model: ir.Model, names: Sequence[str], tokens: int, seed: int = 0) -> dict[str, np.ndarray]:
        """``tokens`` rows (float64, in window order) of each graph value in ``names``, the same token positions
        for every value, drawn uniformly without replacement over all windows (``seed``)."""
        names = list(dict.fromkeys(names))
        lengths = [int(np.asarray(w).size) for w in self.windows]
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(sum(lengths), size=min(tokens, sum(lengths)), replace=False))
        session = ValueSession(model, names, self.threads)
        rows: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for start, length, window in zip(np.cumsum([0] + lengths[:-1]), lengths, self.windows):
            picked = keep[(keep >= start) & (keep < start + length)] - start
            if picked.size == 0:
                continue
            outs = session.run(window)
            for name in names:
                rows[name].append(outs[name].reshape(length, -1)[picked].astype(np.float64))
        log.debug("sampled %d token rows of %d values", keep.size, len(names))
        return {name: np.concatenate(parts) for name, parts in rows.items()}

    def bias_errors(self, model: ir.Model, stages: Sequence[Sequence[ErrorProbe]]) -> dict[ErrorProbe, np.ndarray]:
        """Per probe, the mean over all tokens of (y - offset - x @ weight) in float64, stage after stage, each
        stage run with the corrections -error of the stages before it fed in (one session for all stages; the
        graph itself is not changed)."""
        probes = [p for stage in stages for p in stage]
        names = sorted({p.x.name for p in probes} | {p.y.name for p in probes})
        corrections = list(dict.fromkeys(p.correction for p in probes))
        session = ValueSession(model, names, self.threads, inputs=[c.name for c in corrections])
        biases = {c.name: c.const_value.numpy() for c in corrections}
        errors: dict[ErrorProbe, np.ndarray] = {}
        for stage in stages:
            sums = {p: np.zeros(p.weight.shape[1]) for p in stage}
            count = 0
            for window in self.windows:
                outs = session.run(window, overrides=biases)
                for p in stage:
                    x = outs[p.x.name].astype(np.float64).reshape(-1, p.weight.shape[0])
                    y = outs[p.y.name].astype(np.float64).reshape(-1, p.weight.shape[1]) - p.offset
                    sums[p] += (y - x @ p.weight).sum(axis=0)
                count += x.shape[0]
            for p in stage:
                errors[p] = sums[p] / count
                biases[p.correction.name] = (-errors[p]).astype(biases[p.correction.name].dtype)
        return errors


def _hessians(values: Sequence[ir.Value], runs: Iterator[dict[str, np.ndarray]]) -> dict[ir.Value, np.ndarray]:
    """H = X^T X / N of each value over the windows, from ``runs`` (name -> array per window)."""
    sums: dict[str, np.ndarray] = {}
    tokens = 0
    for outs in runs:
        for v in values:  # float32 products of one window, summed in float64
            x = outs[v.name].astype(np.float32).reshape(-1, outs[v.name].shape[-1])
            sums[v.name] = sums.get(v.name, 0.0) + (x.T @ x).astype(np.float64)
        tokens += x.shape[0]
    return {v: sums[v.name] / tokens for v in values}
