"""Per-site measurements of quantization difficulty and calibrated statistics."""
