"""``genai_config.json``: what onnxruntime-genai needs to run an output folder (``og.Model(DIR)``).

onnxruntime-genai runs any decoder whose input and output names it is told. Ours feed ``attention_mask``
over past and new tokens, ``position_ids`` where the family has them, and return ``present = concat(past,
new)``: a growing cache, so ``past_present_share_buffer`` is false. Sliding-window layers (Gemma3) keep the
whole past and mask it inside the graph; the runtime's ``sliding_window`` setting would hand them a cache
cut to the window, which the graph does not expect, so it is left out. :func:`read_signature` goes the other way:
the signature of a folder another tool wrote for onnxruntime-genai (the model builder's), to evaluate and time it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from qexport.errors import QexportError
from qexport.runtimes.genai import GENAI_CONFIG
from qexport.runtimes.signature import GraphSignature

log = logging.getLogger(__name__)

# Hugging Face model_type -> onnxruntime-genai model type; any other decoder-only model is its generic "decoder".
GENAI_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "gemma3_text": "gemma3_text"}
GENERIC_TYPE = "decoder"


def _token_id(name: str, tokenizer: Any, config: Any) -> int | None:
    """The tokenizer's id (what ``qexport generate`` uses), else the config's first."""
    for source in (tokenizer, config):
        value = getattr(source, name, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return None


def genai_config(signature: GraphSignature, config: Any, tokenizer: Any, model_file: str) -> dict[str, Any] | None:
    """The genai_config.json of an export, or ``None`` (logged) where onnxruntime-genai cannot run it."""
    if not signature.kv_cache:
        log.info("no %s: onnxruntime-genai decodes one token a step and needs the KV cache (exported "
                 "with --no-kv-cache)", GENAI_CONFIG)
        return None
    eos = _token_id("eos_token_id", tokenizer, config)
    if eos is None:
        log.info("no %s: neither the tokenizer nor the config names an EOS token", GENAI_CONFIG)
        return None
    bos = _token_id("bos_token_id", tokenizer, config)
    pad = _token_id("pad_token_id", tokenizer, config)
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if signature.uses_position_ids:
        inputs["position_ids"] = "position_ids"
    inputs.update(past_key_names="past_key_values.%d.key", past_value_names="past_key_values.%d.value")
    outputs = {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}
    context = int(config.max_position_embeddings)
    return {
        "model": {
            "type": GENAI_TYPES.get(config.model_type, GENERIC_TYPE),
            "bos_token_id": bos if bos is not None else eos,
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else eos,
            "context_length": context,
            "vocab_size": int(config.vocab_size),
            "decoder": {
                "filename": model_file,
                "session_options": {"log_id": "qexport"},
                "head_size": signature.head_dim,
                "hidden_size": int(config.hidden_size),
                "num_attention_heads": int(config.num_attention_heads),
                "num_hidden_layers": signature.num_layers,
                "num_key_value_heads": signature.num_kv_heads,
                "inputs": inputs,
                "outputs": outputs,
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "max_length": context, "past_present_share_buffer": False},
    }


def write_genai_config(folder: Path, signature: GraphSignature, config: Any, tokenizer: Any,
                       model_file: str) -> list[str]:
    """Write genai_config.json into ``folder``; returns the names written (none where it cannot run)."""
    data = genai_config(signature, config, tokenizer, model_file)
    if data is None:
        return []
    (folder / GENAI_CONFIG).write_text(json.dumps(data, indent=2) + "\n")
    return [GENAI_CONFIG]


_PAST = ("past_key_values.%d.key", "past_key_values.%d.value")
_PRESENT = ("present.%d.key", "present.%d.value")
_IO_DTYPES = {1: "fp32", 10: "fp16"}  # ONNX TensorProto element types of the KV cache


def read_signature(folder: Path) -> tuple[GraphSignature, str]:
    """The :class:`GraphSignature` and model file of a folder that some other tool wrote for onnxruntime-genai
    (its model builder, say): the layout from ``genai_config.json``, the cache dtype from the graph's inputs.

    qexport's runner feeds a growing cache (present = concat(past, new)); a GroupQueryAttention graph built for a
    shared buffer (``past_present_share_buffer``) also takes that, so the search setting is not a constraint.
    """
    import onnx

    path = folder / GENAI_CONFIG
    try:
        decoder = json.loads(path.read_text())["model"]["decoder"]
        inputs, outputs = decoder["inputs"], decoder["outputs"]
        model_file = decoder["filename"]
        layout = (int(decoder["num_hidden_layers"]), int(decoder["num_key_value_heads"]), int(decoder["head_size"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise QexportError(f"{path} is not a usable onnxruntime-genai config ({type(exc).__name__}: {exc}); "
                           "it needs model.decoder.{filename, inputs, outputs, num_hidden_layers, "
                           "num_key_value_heads, head_size}") from exc
    expected = {"input_ids": ("input_ids", inputs.get("input_ids")),
                "attention_mask": ("attention_mask", inputs.get("attention_mask")),
                "logits": ("logits", outputs.get("logits")),
                "past": (_PAST, (inputs.get("past_key_names"), inputs.get("past_value_names"))),
                "present": (_PRESENT, (outputs.get("present_key_names"), outputs.get("present_value_names")))}
    odd = {key: theirs for key, (ours, theirs) in expected.items() if theirs != ours}
    position = inputs.get("position_ids")
    if position not in (None, "position_ids"):
        odd["position_ids"] = position
    if odd:
        raise QexportError(f"{path} names its inputs and outputs differently from qexport's runner "
                           f"{odd}; only folders with qexport's names (those of the model builder) "
                           "can be evaluated or timed")
    if not (folder / model_file).is_file():
        raise QexportError(f"{folder} has no {model_file}, the model its {GENAI_CONFIG} names")
    graph_inputs = {v.name: v for v in onnx.load(str(folder / model_file), load_external_data=False).graph.input}
    past = graph_inputs.get(_PAST[0] % 0)
    if past is None or past.type.tensor_type.elem_type not in _IO_DTYPES:
        raise QexportError(f"{folder / model_file} has no float32 or float16 input {_PAST[0] % 0}; qexport runs "
                           "decoders with a KV cache in one of those types")
    signature = GraphSignature(num_layers=layout[0], num_kv_heads=layout[1], head_dim=layout[2], kv_cache=True,
                               uses_position_ids=position is not None and "position_ids" in graph_inputs,
                               dtype=_IO_DTYPES[past.type.tensor_type.elem_type])
    return signature, model_file
