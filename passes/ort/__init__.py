"""Lowerings for ONNX Runtime CPU: integer kernels and fused attention, norms, rotary."""
