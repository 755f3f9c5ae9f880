"""Evaluation against the PyTorch source: perplexity, logits, greedy tokens, and the benchmark."""
