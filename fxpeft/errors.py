"""Typed errors. Every message names the problem and the fix; no pass raises one after mutating a graph."""

from __future__ import annotations

import pickle

__all__ = [
    "FxPeftError",
    "TraceError",
    "InputShapeError",
    "SerializationError",
    "ConfigError",
    "TargetError",
    "UnsupportedSiteError",
    "AdapterExistsError",
    "WeightsError",
    "MergeError",
    "AdapterFileError",
    "DrawError",
    "GraphvizNotFoundError",
]


class FxPeftError(Exception):
    """Base class of every error fxpeft raises on purpose."""


class TraceError(FxPeftError):
    """The model could not be captured as a graph."""


class InputShapeError(FxPeftError, ValueError):
    """A traced graph was called with an input shape it was not traced for (the message names the dim and why)."""


class SerializationError(FxPeftError, pickle.PickleError):
    """An fxpeft graph could not be pickled or unpickled; the message says what to use instead."""


class ConfigError(FxPeftError, ValueError):
    """A config field has an invalid value (for example ``r <= 0``)."""


class TargetError(FxPeftError, ValueError):
    """``target_modules`` (or a pattern) matches nothing, or matches the wrong thing."""


class UnsupportedSiteError(FxPeftError, TypeError):
    """A matched call site is of a kind the method cannot adapt."""


class AdapterExistsError(FxPeftError, ValueError):
    """The same adapter name was applied twice to one site."""


class MergeError(FxPeftError, RuntimeError):
    """Folding the adapters into the weights would give a wrong or non-finite result."""


class AdapterFileError(FxPeftError, ValueError):
    """An adapter directory or file is missing, corrupt or does not fit the graph."""


class DrawError(FxPeftError, ValueError):
    """:func:`fxpeft.draw` got something it cannot draw (an unknown file type, a ``before=`` that is no snapshot)."""


class WeightsError(FxPeftError, ValueError):
    """A model checkpoint does not fit the graph (names, shapes, a missing shard), or a graph's weights are still
    on the meta device (not loaded yet)."""


class GraphvizNotFoundError(FxPeftError, RuntimeError):
    """Graphviz's ``dot`` program is not installed; the graph's ``.dot`` source was written instead.

    Attributes:
        dot_path: where the DOT source was written (render it later with ``dot -Tsvg FILE.dot -o FILE.svg``).
    """

    def __init__(self, message: str, dot_path: str | None = None) -> None:
        super().__init__(message)
        self.dot_path = dot_path
