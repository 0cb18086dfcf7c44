"""The one error family: every refusal graphopt makes is a ``GraphoptError``.

Each message names the thing at fault (file, recipe key, pass, layer) and what to do about
it. The CLI prints a ``GraphoptError`` without a traceback and exits non-zero; any other
exception is a bug in graphopt and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "GraphoptError",
    "RecipeError",
    "ModelError",
    "FormatError",
    "ExternalDataError",
    "UnsafeFileError",
    "PluginError",
    "PassError",
    "PreconditionError",
    "NumericsError",
    "OutputError",
    "BackendError",
]


class GraphoptError(Exception):
    """Base of every error graphopt raises on purpose (bad input, broken promise)."""


class RecipeError(GraphoptError):
    """A recipe is malformed: unknown key, pass or option, wrong type, kinds out of order."""


class ModelError(GraphoptError):
    """A model cannot be found, loaded or traced."""


class FormatError(GraphoptError):
    """A file is missing, truncated or not in the format it claims."""


class ExternalDataError(FormatError):
    """An ONNX external-data reference points somewhere it must not."""


class UnsafeFileError(GraphoptError):
    """A file would execute code or escape its folder if loaded."""


class PluginError(GraphoptError):
    """A registered pass, backend or model failed to load or is not what it claims."""


class PassError(GraphoptError):
    """A pass failed while running; the message names the pass and the passes before it."""


class PreconditionError(PassError):
    """A pass was handed a program it does not accept (wrong kind, missing annotation)."""


class NumericsError(PassError):
    """An exact pass moved the outputs by more than its declared tolerance."""


class OutputError(GraphoptError):
    """The output folder cannot be written."""


class BackendError(GraphoptError):
    """A backend cannot compile or run a program."""
