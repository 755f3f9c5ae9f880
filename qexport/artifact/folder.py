"""An exported model folder: model.onnx, tokenizer, config and the qexport.json manifest."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from qexport.errors import QexportError
from qexport.runtimes.signature import GraphSignature
from qexport.exporter.loading import ModelSource
from qexport.artifact.genai_config import read_signature
from qexport.artifact.outdir import MANIFEST, read_manifest
from qexport.runtimes.genai import GENAI_CONFIG
from qexport.artifact.runtime import Runtime

MODEL_FILE = "model.onnx"


@dataclasses.dataclass
class Artifact:
    """A qexport output folder, opened for evaluation, generation and benchmarks."""

    folder: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, folder: str | os.PathLike) -> "Artifact":
        """A qexport output folder; or, without a ``qexport.json``, a folder another tool wrote for onnxruntime-genai
        (the model builder's), opened from its ``genai_config.json`` with no PyTorch source to compare against."""
        folder = Path(folder)
        if folder.is_dir() and not (folder / MANIFEST).is_file() and (folder / GENAI_CONFIG).is_file():
            signature, model_file = read_signature(folder)
            manifest = {"signature": signature.to_json(), "model_file": model_file, "foreign": GENAI_CONFIG}
        else:
            manifest = read_manifest(folder)
        if not (folder / manifest.get("model_file", MODEL_FILE)).is_file():
            raise QexportError(f"{folder} has no {manifest.get('model_file', MODEL_FILE)}; export the model again")
        return cls(folder, manifest)

    @property
    def model_path(self) -> Path:
        return self.folder / self.manifest.get("model_file", MODEL_FILE)

    @property
    def signature(self) -> GraphSignature:
        return GraphSignature.from_json(self.manifest["signature"])

    @property
    def source(self) -> ModelSource:
        if "source" not in self.manifest:
            raise QexportError(f"{self.folder} was not written by qexport (no {MANIFEST}) and names no PyTorch source "
                               "to compare against; evaluate or time it without the reference (--no-reference)")
        return ModelSource.from_json(self.manifest["source"])

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.folder)

    def causal_lm(self, runtime: Runtime | str = Runtime.ORT_CPU, threads: int | None = None):
        """The exported graph as a :class:`CausalLM` on the chosen runtime (a :class:`Runtime` or its name; not genai,
        which has no forward step: see :meth:`genai`)."""
        from qexport.runtimes.causal_lm import CausalLM

        runtime = Runtime.parse_stepwise(runtime)
        if runtime is Runtime.TENSORRT:
            from qexport.runtimes.tensorrt.engine import ENGINE_FILE, TensorRTRunner

            engine = self.folder / ENGINE_FILE
            if not engine.is_file():
                raise QexportError(f"{self.folder} has no {ENGINE_FILE}; build it with: qexport build-engine {self.folder}")
            return CausalLM(TensorRTRunner(engine), self.signature)
        from qexport.runtimes.ort import OrtRunner

        device = "cuda" if runtime is Runtime.ORT_CUDA else "cpu"
        return CausalLM(OrtRunner(self.model_path, device=device, threads=threads), self.signature)

    def genai(self, threads: int | None = None):
        """The folder run by onnxruntime-genai (its genai_config.json), as a :class:`GenaiGenerator`."""
        from qexport.runtimes.genai import GenaiGenerator

        return GenaiGenerator(self.folder, threads=threads)

    def reference(self, threads: int | None = None):
        """The PyTorch source model in float32, reloaded from the manifest, as a :class:`CausalLM`."""
        from qexport.exporter.loading import load_model
        from qexport.runtimes.causal_lm import CausalLM
        from qexport.runtimes.torch_runner import TorchRunner

        _, _, model, _ = load_model(self.source)
        signature = dataclasses.replace(self.signature, dtype="fp32", kv_dtype=None)  # PyTorch's own float cache
        return CausalLM(TorchRunner(model, signature, threads=threads), signature)
