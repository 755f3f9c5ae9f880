"""Compare two runtimes on the same inputs: max-abs, cosine and SNR of their outputs against explicit tolerances.

Any two :class:`~qexport.runtimes.base.Runner` objects (PyTorch, ONNX Runtime CPU/CUDA, TensorRT) go through
:func:`compare_runners`; two :class:`~qexport.runtimes.causal_lm.CausalLM` go through :func:`compare_causal_lms`,
which also follows a greedy decode with each model's own KV cache, so a broken cache path shows up too.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Iterable, Mapping

import numpy as np

from qexport import numerics
from qexport.runtimes.base import Runner
from qexport.runtimes.causal_lm import CausalLM

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Tolerances:
    """An output passes when every bound holds. The defaults suit two FP32 runtimes of the same graph;
    quantized engines get their own, stated where they are compared."""

    max_abs: float = 1e-3
    min_cosine: float = 0.99999
    min_snr_db: float = 60.0

    def __post_init__(self) -> None:
        if self.max_abs < 0 or not -1 <= self.min_cosine <= 1:
            raise ValueError(f"invalid tolerances {self}")


@dataclasses.dataclass(frozen=True)
class OutputComparison:
    """Distances between one output of the reference and of the candidate."""

    name: str
    max_abs: float
    cosine: float
    snr_db: float
    failures: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclasses.dataclass(frozen=True)
class ComparisonResult:
    """The outcome of comparing ``candidate`` with ``reference``; ``passed`` when every output passed."""

    reference: str
    candidate: str
    tolerances: Tolerances
    outputs: tuple[OutputComparison, ...]

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    def to_json(self) -> dict[str, Any]:
        return {
            "reference": self.reference, "candidate": self.candidate, "passed": self.passed,
            "tolerances": dataclasses.asdict(self.tolerances),
            "outputs": [dataclasses.asdict(o) | {"passed": o.passed} for o in self.outputs],
        }

    def summary(self) -> str:
        lines = [f"{self.candidate} vs {self.reference}: {'PASSED' if self.passed else 'FAILED'}"]
        for o in self.outputs:
            lines.append(f"  {o.name:<24} max|d| {o.max_abs:.3g}  cosine {o.cosine:.6f}  SNR {o.snr_db:.1f} dB"
                         + ("" if o.passed else "  <- " + "; ".join(o.failures)))
        return "\n".join(lines)


def compare_arrays(name: str, reference: np.ndarray, candidate: np.ndarray, tolerances: Tolerances) -> OutputComparison:
    """Max-abs difference, cosine similarity and signal-to-noise ratio (dB), computed in float64."""
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if ref.shape != cand.shape:
        return OutputComparison(name, math.inf, -1.0, -math.inf, (f"shape {cand.shape} != reference {ref.shape}",))
    if not (np.all(np.isfinite(ref)) and np.all(np.isfinite(cand))):
        return OutputComparison(name, math.inf, -1.0, -math.inf, ("non-finite values",))
    max_abs = numerics.max_abs_diff(cand, ref)
    cosine = numerics.cosine(ref, cand)
    snr_db = numerics.sqnr_db(ref, cand)
    failures = []
    if max_abs > tolerances.max_abs:
        failures.append(f"max|d| {max_abs:.3g} > {tolerances.max_abs:g}")
    if cosine < tolerances.min_cosine:
        failures.append(f"cosine {cosine:.6f} < {tolerances.min_cosine:g}")
    if snr_db < tolerances.min_snr_db:
        failures.append(f"SNR {snr_db:.1f} dB < {tolerances.min_snr_db:g} dB")
    return OutputComparison(name, max_abs, cosine, snr_db, tuple(failures))


def compare_runners(
    reference: Runner,
    candidate: Runner,
    feeds: Mapping[str, np.ndarray],
    tolerances: Tolerances = Tolerances(),
    outputs: Iterable[str] | None = None,
) -> ComparisonResult:
    """Run both runners on ``feeds`` and compare the named outputs (default: all of the reference's)."""
    names = list(outputs) if outputs is not None else list(reference.output_names)
    ref_out, cand_out = reference.infer(feeds), candidate.infer(feeds)
    missing = [n for n in names if n not in cand_out]
    comparisons = [compare_arrays(n, ref_out[n], cand_out[n], tolerances) for n in names if n not in missing]
    comparisons += [OutputComparison(n, math.inf, -1.0, -math.inf, (f"{candidate.name} has no output {n}",))
                    for n in missing]
    return _result(reference.name, candidate.name, tolerances, comparisons)


def compare_causal_lms(
    reference: CausalLM,
    candidate: CausalLM,
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None = None,
    tolerances: Tolerances = Tolerances(),
    decode_steps: int = 0,
) -> ComparisonResult:
    """Compare prefill logits, then ``decode_steps`` greedy steps (the reference's tokens, each model its own cache).

    Decode logits of all steps are compared together as one output, ``decode.logits``.
    """
    input_ids = np.asarray(input_ids, dtype=np.int64)
    ref_logits, ref_past = reference.forward(input_ids, attention_mask)
    cand_logits, cand_past = candidate.forward(input_ids, attention_mask)
    comparisons = [compare_arrays("prefill.logits", ref_logits, cand_logits, tolerances)]
    mask = np.ones(input_ids.shape, np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64)
    ref_steps, cand_steps = [], []
    for _ in range(decode_steps):
        token = np.argmax(ref_logits[:, -1], axis=-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)
        ref_logits, ref_past = reference.forward(token, mask, ref_past)
        cand_logits, cand_past = candidate.forward(token, mask, cand_past)
        ref_steps.append(ref_logits)
        cand_steps.append(cand_logits)
    if decode_steps:
        comparisons.append(compare_arrays("decode.logits", np.concatenate(ref_steps, 1), np.concatenate(cand_steps, 1),
                                          tolerances))
    return _result(reference.name, candidate.name, tolerances, comparisons)


def _result(reference: str, candidate: str, tolerances: Tolerances, outputs: list[OutputComparison]) -> ComparisonResult:
    result = ComparisonResult(reference, candidate, tolerances, tuple(outputs))
    log.info("%s", result.summary())
    return result
