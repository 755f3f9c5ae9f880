"""The runner interface every runtime implements (ONNX Runtime, TensorRT, PyTorch)."""

from __future__ import annotations

from typing import Mapping, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Runner(Protocol):
    """Runs one graph: named numpy inputs in, named numpy outputs out."""

    name: str

    @property
    def input_names(self) -> list[str]: ...

    @property
    def output_names(self) -> list[str]: ...

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class SessionRunner:
    """Base of the runners whose input and output names are fixed when their session or engine is built."""

    _inputs: list[str]
    _outputs: list[str]

    @property
    def input_names(self) -> list[str]:
        return self._inputs

    @property
    def output_names(self) -> list[str]:
        return self._outputs
