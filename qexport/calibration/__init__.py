"""Calibration: statistics and values gathered by running the graph on text, and the fits made from them."""
