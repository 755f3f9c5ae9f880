"""Comparator: exact metric values on known arrays, ONNX Runtime vs PyTorch passing, a perturbed runtime failing."""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import numpy as np
import pytest

from qexport.artifact.folder import Artifact
from qexport.evaluation.compare import Tolerances, compare_arrays, compare_causal_lms, compare_runners
from qexport.runtimes.causal_lm import CausalLM

# FP32 ONNX Runtime vs FP32 PyTorch on the same weights: the export parity bound used in test_export.py
FP32_PARITY = Tolerances(max_abs=1e-4, min_cosine=0.999999, min_snr_db=80.0)


def test_metrics_on_known_arrays():
    ref = np.ones(1000, np.float32)
    same = compare_arrays("x", ref, ref.copy(), Tolerances())
    assert same.passed and same.max_abs == 0 and same.snr_db == math.inf and same.cosine == pytest.approx(1.0)

    noisy = compare_arrays("x", ref, ref + np.float32(0.01), Tolerances(max_abs=0.02, min_cosine=0.99, min_snr_db=39.9))
    assert noisy.max_abs == pytest.approx(0.01, rel=1e-5)
    assert noisy.snr_db == pytest.approx(40.0, abs=1e-3)  # 10 log10(1 / 0.01^2)
    assert noisy.cosine == pytest.approx(1.0)
    assert noisy.passed
    strict = compare_arrays("x", ref, ref + np.float32(0.01), Tolerances(max_abs=0.02, min_snr_db=40.1))
    assert strict.failures == ("SNR 40.0 dB < 40.1 dB",)

    opposite = compare_arrays("x", ref, -ref, Tolerances(max_abs=10, min_cosine=0.0, min_snr_db=-100))
    assert opposite.cosine == pytest.approx(-1.0) and opposite.failures == ("cosine -1.000000 < 0",)


def test_shape_mismatch_and_non_finite_fail():
    assert compare_arrays("x", np.zeros((2, 3)), np.zeros((3, 2)), Tolerances()).failures[0].startswith("shape")
    bad = np.ones(4)
    bad[2] = np.nan
    assert compare_arrays("x", np.ones(4), bad, Tolerances()).failures == ("non-finite values",)


@pytest.fixture(scope="module")
def llama(tiny_export):
    artifact = Artifact.open(tiny_export("llama"))
    return artifact.causal_lm("ort-cpu", threads=2), artifact.reference(threads=2)


def ids(batch: int = 2, seq: int = 7) -> np.ndarray:
    return np.random.default_rng(0).integers(3, 250, size=(batch, seq), dtype=np.int64)


def test_onnxruntime_matches_pytorch_prefill_and_decode(llama):
    ort_lm, torch_lm = llama
    result = compare_causal_lms(torch_lm, ort_lm, ids(), tolerances=FP32_PARITY, decode_steps=3)
    assert result.passed, result.summary()
    assert [o.name for o in result.outputs] == ["prefill.logits", "decode.logits"]
    assert (result.reference, result.candidate) == ("pytorch", "onnxruntime-cpu")
    assert result.to_json()["passed"] is True


def test_runners_compared_on_all_outputs(llama):
    ort_lm, torch_lm = llama
    feeds = {"input_ids": ids(), "attention_mask": np.ones((2, 7), np.int64),
             "position_ids": np.tile(np.arange(7), (2, 1))}
    feeds.update(zip(ort_lm.signature.past_names, ort_lm.empty_past(2)))
    result = compare_runners(torch_lm.runner, ort_lm.runner, feeds, FP32_PARITY)
    assert result.passed, result.summary()
    assert [o.name for o in result.outputs] == ort_lm.signature.output_names


@dataclasses.dataclass
class PerturbedRunner:
    """Another runner's outputs with relative Gaussian noise on the logits: a stand-in for a lossy runtime."""

    inner: object
    relative_noise: float
    name: str = "perturbed"

    @property
    def input_names(self) -> list[str]:
        return self.inner.input_names

    @property
    def output_names(self) -> list[str]:
        return self.inner.output_names

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = dict(self.inner.infer(feeds))
        logits = out["logits"]
        noise = np.random.default_rng(1).standard_normal(logits.shape).astype(np.float32)
        out["logits"] = logits + self.relative_noise * float(np.std(logits)) * noise
        return out


def test_perturbed_runtime_fails_with_the_failed_bounds_named(llama):
    ort_lm, torch_lm = llama
    perturbed = CausalLM(PerturbedRunner(ort_lm.runner, relative_noise=0.01), ort_lm.signature)
    result = compare_causal_lms(torch_lm, perturbed, ids(), tolerances=FP32_PARITY, decode_steps=2)
    assert not result.passed
    prefill = result.outputs[0]
    assert prefill.snr_db == pytest.approx(40.0, abs=1.0)  # noise at 1% of the logits' spread
    assert any(f.startswith("max|d|") for f in prefill.failures)
    assert any(f.startswith("SNR") for f in prefill.failures)
    assert "FAILED" in result.summary()
