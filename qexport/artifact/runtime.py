"""The runtimes an exported folder can run on, by the names the CLI takes (``--runtime ort-cpu``).

Kept apart from :mod:`qexport.artifact.folder` so that building the CLI's parser loads no runtime.
"""

from __future__ import annotations

import enum

from qexport.errors import QexportError


class Runtime(str, enum.Enum):
    """Where an exported graph runs (the CLI's ``--runtime``)."""

    ORT_CPU = "ort-cpu"  # ONNX Runtime, CPU execution provider
    ORT_CUDA = "ort-cuda"  # ONNX Runtime, CUDA execution provider
    TENSORRT = "tensorrt"  # the folder's TensorRT engine (qexport build-engine)
    GENAI = "genai"  # onnxruntime-genai on the folder's genai_config.json: whole generations only

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, runtime: Runtime | str) -> Runtime:
        """``runtime`` as a :class:`Runtime`; an unknown name is a :class:`QexportError` listing the choices."""
        try:
            return cls(runtime)
        except ValueError:
            raise QexportError(f"unknown runtime {runtime!r}; choose one of {', '.join(r.value for r in cls)}") from None

    @classmethod
    def parse_stepwise(cls, runtime: Runtime | str) -> Runtime:
        """:meth:`parse`, refusing a runtime that has no forward step (genai runs whole generations), as
        evaluation and benchmarks need one."""
        runtime = cls.parse(runtime)
        if runtime is cls.GENAI:
            raise QexportError("--runtime genai runs whole generations in onnxruntime-genai, with no forward step to "
                               "evaluate or time: only `qexport generate` takes it")
        return runtime
