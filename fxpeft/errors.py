"""Typed errors. Every message names the problem and the fix; no pass raises one after mutating a graph."""

from __future__ import annotations

__all__ = [
    "FxPeftError",
    "TraceError",
    "ConfigError",
    "TargetError",
    "UnsupportedSiteError",
    "AdapterExistsError",
    "MergeError",
    "AdapterFileError",
]


class FxPeftError(Exception):
    """Base class of every error fxpeft raises on purpose."""


class TraceError(FxPeftError):
    """The model could not be captured as a graph."""


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
