"""Errors that qexport reports to users: each names the problem and what to do."""

from __future__ import annotations


class QexportError(Exception):
    """Base class: the CLI prints these as one clear message, without a traceback."""


class ModelSourceError(QexportError):
    """The model could not be found or read (missing path, corrupt file, offline hub)."""


class UnsupportedModelError(QexportError):
    """The architecture is not one qexport knows how to export and transform."""


class TextSourceError(QexportError):
    """Calibration or evaluation text is missing, empty, too short or unreachable."""


class OutputExistsError(QexportError):
    """The output folder exists and --force was not given."""


class PatternNotFoundError(QexportError):
    """A graph pass did not find the pattern it needs in the exported graph."""


class RecipeError(QexportError):
    """A recipe file has an unknown key, an unknown value or a bad type."""
