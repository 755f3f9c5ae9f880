"""The output folder: its files, manifest and graph signature."""

from __future__ import annotations

__all__ = ["Artifact", "MODEL_FILE", "Runtime"]


def __getattr__(name: str):
    # Lazy, so that importing qexport.artifact.outdir does not load the folder's readers.
    if name in __all__:
        from qexport.artifact import folder

        return getattr(folder, name)
    raise AttributeError(name)
