"""Exceptions raised by lmedit.

Every error names the offending value and says what to do about it. All derive from
:class:`LmeditError`, so ``except lmedit.LmeditError`` catches any of them; each also derives
from the closest built-in (``ValueError``, ``KeyError`` ...) for callers that expect those.
"""

from __future__ import annotations


class LmeditError(Exception):
    """Base class of every error lmedit raises on purpose."""


class RequestError(LmeditError, ValueError):
    """A malformed edit request or request file (names the record and the field)."""


class UnsupportedArchitectureError(LmeditError, KeyError):
    """No adapter is registered for a model's ``config.model_type``."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class HyperparameterError(LmeditError, ValueError):
    """An unknown method, an unknown hyperparameter, or a value out of range."""


class SolveError(LmeditError, ArithmeticError):
    """A closed-form solve failed: ill-conditioned system or non-finite values."""


class CacheError(LmeditError, OSError):
    """A cache or delta file is corrupt, truncated or belongs to another model."""


class ModelLoadError(LmeditError, OSError):
    """The requested model could not be loaded (missing package, path or offline hub)."""
