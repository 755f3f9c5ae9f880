"""PyTorch runner: the source model behind the same interface as the exported graph."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from qexport.exporter.graph_export import DTYPES, CausalLMWithCache
from qexport.runtimes.signature import GraphSignature


class TorchRunner:
    """Runs the Hugging Face model through the export wrapper, so inputs and outputs match the ONNX graph."""

    def __init__(self, model: torch.nn.Module, signature: GraphSignature, threads: int | None = None) -> None:
        self.name = "pytorch"
        self.signature = signature
        self.dtype = DTYPES[signature.dtype]
        self.module = CausalLMWithCache(model.to(self.dtype), signature).eval()
        self.threads = threads

    @property
    def input_names(self) -> list[str]:
        return self.signature.input_names

    @property
    def output_names(self) -> list[str]:
        return self.signature.output_names

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.threads:
            torch.set_num_threads(self.threads)
        position_ids = feeds.get("position_ids")
        past = [torch.from_numpy(np.ascontiguousarray(feeds[name])) for name in self.signature.past_names]
        with torch.no_grad():
            out = self.module(
                torch.from_numpy(feeds["input_ids"]),
                torch.from_numpy(feeds["attention_mask"]),
                None if position_ids is None else torch.from_numpy(position_ids),
                past,
            )
        tensors = out if isinstance(out, tuple) else (out,)
        return {name: t.float().numpy() if name == "logits" else t.numpy() for name, t in zip(self.output_names, tensors)}
