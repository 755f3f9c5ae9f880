"""Tiny random-weight models of each supported family, built from configs (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 272


def tiny_config(family: str, overrides: dict | None = None):
    """The tiny config of ``family``; ``overrides`` replaces some of its arguments (e.g. ``num_hidden_layers``)."""
    from transformers import Gemma3TextConfig, LlamaConfig, OPTConfig, Qwen2Config

    extra = overrides or {}
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=512)
    if family == "llama":
        return LlamaConfig(**{**common, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True, **extra})
    if family == "qwen2":
        return Qwen2Config(**{**common, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False, **extra})
    if family == "gemma3":
        return Gemma3TextConfig(**{
            **common, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention"], "tie_word_embeddings": True, **extra,
        })
    if family == "opt":
        return OPTConfig(**{
            "vocab_size": VOCAB, "hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "max_position_embeddings": 512, "word_embed_proj_dim": 64, "do_layer_norm_before": True, **extra,
        })
    raise ValueError(family)


FAMILIES = ("llama", "qwen2", "gemma3", "opt")


def make_tiny_model(family: str, folder: Path, seed: int = 0, overrides: dict | None = None) -> Path:
    """Save a tiny random model and a character-level-ish tokenizer to ``folder``; returns it. ``overrides``: as
    for :func:`tiny_config`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, overrides)).eval()
    with torch.no_grad():  # larger weights than the default init make logits differ visibly between tokens
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    _byte_tokenizer().save_pretrained(folder)
    return folder


def _byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: built locally, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
