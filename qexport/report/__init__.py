"""The validation report: per-linear errors, reference twin, suggestions, HTML and plots."""
