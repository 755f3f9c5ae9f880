"""Runtimes: runners behind one small interface, and a generation loop usable on any of them."""

from qexport.runtimes.base import Runner
from qexport.runtimes.causal_lm import CausalLM
from qexport.runtimes.generate import GenerationSettings, generate
from qexport.runtimes.ort import OrtRunner

__all__ = ["Runner", "CausalLM", "GenerationSettings", "generate", "OrtRunner"]
