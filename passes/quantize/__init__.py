"""Quantization passes: QuantizeLinear/DequantizeLinear insertion, GPTQ, bias correction."""
