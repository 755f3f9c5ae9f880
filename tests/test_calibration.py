"""Calibration statistics from the ONNX graph agree with the PyTorch activations they describe."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

from pass_testing import load
from qexport.calibration.stats import TensorStats, collect_stats
from qexport.errors import QexportError
from qexport.passes.discovery import sites

# activations come from two float32 implementations (PyTorch, ONNX Runtime) of the same model
RTOL, ATOL = 1e-4, 1e-5


def windows(seed: int = 0, count: int = 3, length: int = 12) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 250, size=length, dtype=np.int64) for _ in range(count)]


def torch_activations(folder, family: str, token_windows: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Per site name, the rows [tokens, channels] PyTorch feeds into that site's consumer linears."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    layers = model.model.decoder.layers if family == "opt" else model.model.layers
    rows: dict[str, list[np.ndarray]] = {}

    def grab(name):
        return lambda module, args: rows.setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).numpy())

    for i, layer in enumerate(layers):
        attn, mlp = (layer.self_attn, layer) if family == "opt" else (layer.self_attn, layer.mlp)
        attn.q_proj.register_forward_pre_hook(grab(f"layers.{i}.attn_norm"))
        (attn.out_proj if family == "opt" else attn.o_proj).register_forward_pre_hook(grab(f"layers.{i}.v_o"))
        (mlp.fc1 if family == "opt" else mlp.up_proj).register_forward_pre_hook(grab(f"layers.{i}.mlp_norm"))
        (mlp.fc2 if family == "opt" else mlp.down_proj).register_forward_pre_hook(grab(f"layers.{i}.up_down"))
    model.lm_head.register_forward_pre_hook(grab("final_norm"))
    with torch.no_grad():
        for w in token_windows:
            model(input_ids=torch.from_numpy(w)[None])
    return {k: np.concatenate(v).astype(np.float64) for k, v in rows.items()}


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_stats_match_pytorch_activations(tiny_source, tiny_export, family):
    model = load(tiny_export(family))
    before = ir.to_proto(model).SerializeToString()
    token_windows = windows()
    stats = collect_stats(model, token_windows, hessian=["layers.1.up_down"])
    assert ir.to_proto(model).SerializeToString() == before  # calibration runs a copy
    reference = torch_activations(tiny_source(family), family, token_windows)
    assert set(stats.sites) == set(reference) == {s.name for s in sites.find_sites(model).all}
    assert stats.windows == 3 and stats.tokens == 36
    for name, x in reference.items():
        got = stats[name]
        assert got.tokens == 36 and got.channels == x.shape[1]
        np.testing.assert_allclose(got.absmax, np.abs(x).max(axis=0), rtol=RTOL, atol=ATOL, err_msg=name)
        np.testing.assert_allclose(got.channel_min, x.min(axis=0), rtol=RTOL, atol=ATOL, err_msg=name)
        np.testing.assert_allclose(got.l2, np.sqrt((x**2).sum(axis=0)), rtol=RTOL, atol=ATOL, err_msg=name)
        np.testing.assert_allclose(got.token_absmax_max, np.abs(x).max(), rtol=RTOL, err_msg=name)
        np.testing.assert_allclose(got.token_absmax_mean, np.abs(x).max(axis=1).mean(), rtol=RTOL, err_msg=name)
    x = reference["layers.1.up_down"]
    np.testing.assert_allclose(stats["layers.1.up_down"].hessian(), x.T @ x / len(x), rtol=RTOL, atol=ATOL)
    with pytest.raises(QexportError, match="second moments"):
        stats["layers.0.up_down"].hessian()


def test_streaming_update_equals_one_batch():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 8)) * np.array([1, 2, 3, 50, 1, 1, 1, 0.1])
    streamed, whole = TensorStats.empty(8, hessian=True), TensorStats.empty(8, hessian=True)
    for chunk in np.split(x, 4):
        streamed.update(chunk)
    whole.update(x)
    np.testing.assert_allclose(streamed.second_moment, whole.second_moment, rtol=1e-12)
    np.testing.assert_array_equal(streamed.absmax, whole.absmax)
    np.testing.assert_array_equal(streamed.token_absmax_hist, whole.token_absmax_hist)
    lower_median = np.sort(np.abs(x).max(axis=1))[19]  # the 20th of 40 token absmaxes
    q = streamed.token_absmax_quantile(0.5)
    assert lower_median <= q <= lower_median * 10 ** (12 / 240) * 1.0001  # the upper edge of its log bin


def test_no_windows_is_an_error(tiny_export):
    with pytest.raises(QexportError, match="no calibration windows"):
        collect_stats(load(tiny_export("llama")), [])
