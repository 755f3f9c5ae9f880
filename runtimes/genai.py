"""Generation through onnxruntime-genai, from an output folder's ``genai_config.json``.

onnxruntime-genai owns the whole loop (KV cache, search, EOS), so this is a generator rather than a
:class:`~qexport.runtimes.base.Runner`: it has no forward step to compare logits on, only tokens.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable

from qexport.errors import QexportError
from qexport.runtimes.generate import GenerationSettings

log = logging.getLogger(__name__)

GENAI_CONFIG = "genai_config.json"


def import_genai() -> Any:
    """The ``onnxruntime_genai`` module, or a clear error saying how to install it."""
    try:
        import onnxruntime_genai
    except ImportError as exc:
        raise QexportError(f"--runtime genai needs onnxruntime-genai ({exc}); pip install onnxruntime-genai") from exc
    return onnxruntime_genai


class GenaiGenerator:
    """An output folder run by onnxruntime-genai (``og.Model(DIR)``); it stops at the EOS its config names (the
    tokenizer's)."""

    name = "onnxruntime-genai"

    def __init__(self, folder: str | os.PathLike, threads: int | None = None) -> None:
        self.folder = Path(folder)
        if not (self.folder / GENAI_CONFIG).is_file():
            raise QexportError(f"{self.folder} has no {GENAI_CONFIG} (exports without a KV cache have none, as do "
                               "exports older than it); export the model again")
        self._og = import_genai()
        config = self._og.Config(os.fspath(self.folder))
        if threads is not None:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        try:
            self.model = self._og.Model(config)
        except RuntimeError as exc:
            raise QexportError(f"onnxruntime-genai cannot load {self.folder}: {exc}") from exc

    def generate(
        self,
        prompt_ids: Iterable[int],
        settings: GenerationSettings = GenerationSettings(),
        on_token: Callable[[int], None] | None = None,
    ) -> list[int]:
        """Generate up to ``max_new_tokens`` after the prompt; returns only the new ids (an EOS that stopped it
        included), as :func:`~qexport.runtimes.generate.generate` does."""
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("the prompt is empty")
        og = self._og
        params = og.GeneratorParams(self.model)
        search: dict[str, Any] = {"max_length": len(prompt) + settings.max_new_tokens, "do_sample": not settings.greedy}
        if not settings.greedy:
            search.update(temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                          random_seed=settings.seed)
        try:
            params.set_search_options(**search)
            generator = og.Generator(self.model, params)
            generator.append_tokens(prompt)
        except RuntimeError as exc:
            raise QexportError(f"onnxruntime-genai: {exc}") from exc
        new: list[int] = []
        while len(new) < settings.max_new_tokens:
            if generator.is_done():  # it stopped at its EOS (max_length is never reached first)
                if settings.stop_at_eos:
                    break
                generator.append_tokens(new[-1:])  # feed the EOS on, as qexport's own loop does
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            new.append(token)
            if on_token is not None:
                on_token(token)
        return new
