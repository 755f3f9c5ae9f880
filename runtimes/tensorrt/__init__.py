"""TensorRT: the explicit-quantization check (runs on the CPU), the engine build and its runner."""
