"""Shared fixtures: tiny exported models of each family, built once per test session."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import FAMILIES, make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory):
    """Return a function family -> folder holding a tiny saved HF model (cached per session)."""
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = make_tiny_model(family, tmp_path_factory.mktemp(f"src-{family}"))
        return cache[family]

    return get


@pytest.fixture(scope="session")
def tiny_export(tiny_source, tmp_path_factory):
    """Return a function family -> qexport output folder of the tiny model (FP32, KV cache; cached)."""
    import qexport

    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = qexport.export(str(tiny_source(family)), tmp_path_factory.mktemp(f"out-{family}") / "model")
        return cache[family]

    return get


@pytest.fixture(scope="session")
def default_export(tmp_path_factory):
    """The real default model (SmolLM2-135M-Instruct) exported once per session, FP32 with KV cache."""
    import qexport

    return qexport.export(None, tmp_path_factory.mktemp("smollm2") / "fp32")


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _quiet_logs():
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    yield
