"""The output folder: its files, manifest and graph signature."""
