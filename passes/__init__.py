"""Graph passes over exported ONNX IR models; one pass per module."""
