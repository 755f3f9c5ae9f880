"""qexport: export causal LMs to calibrated, quantized ONNX, with every transform checked on the graph."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["export", "evaluate", "__version__"]


def __getattr__(name: str):
    # Lazy: `import qexport` stays cheap; torch and transformers load on first use.
    if name == "export":
        from qexport.api import export

        return export
    if name == "evaluate":
        from qexport.evaluation.perplexity import evaluate

        return evaluate
    raise AttributeError(name)
