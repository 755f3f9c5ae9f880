"""ONNX Runtime runner: CPU by default, CUDA when asked for and present."""

from __future__ import annotations

import logging
import os
from typing import Mapping

import numpy as np

from qexport.errors import QexportError
from qexport.runtimes.base import SessionRunner
from qexport.runtimes.ort_session import new_session, session_options

log = logging.getLogger(__name__)

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


class OrtRunner(SessionRunner):
    """An ONNX Runtime inference session behind the :class:`~qexport.runtimes.base.Runner` interface."""

    def __init__(self, model_path: str | os.PathLike, device: str = "cpu", threads: int | None = None) -> None:
        import onnxruntime as ort

        if device not in PROVIDERS:
            raise QexportError(f"unknown ONNX Runtime device {device!r}; use one of {sorted(PROVIDERS)}")
        available = ort.get_available_providers()
        if PROVIDERS[device][0] not in available:
            raise QexportError(
                f"ONNX Runtime has no {PROVIDERS[device][0]} here (available: {', '.join(available)}); "
                "install onnxruntime-gpu on a CUDA machine, or use the CPU runtime"
            )
        self.name = f"onnxruntime-{device}"
        self.session = new_session(os.fspath(model_path), session_options(threads, inter_op_threads=1), PROVIDERS[device])
        self._inputs = [i.name for i in self.session.get_inputs()]
        self._outputs = [o.name for o in self.session.get_outputs()]

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = set(self._inputs) - set(feeds)
        if missing:
            raise QexportError(f"missing inputs for {self.name}: {sorted(missing)}")
        outputs = self.session.run(self._outputs, {name: feeds[name] for name in self._inputs})
        return dict(zip(self._outputs, outputs))
