"""Lossless transforms folded into weights: norms, smoothing, rotations, affine matrices."""
