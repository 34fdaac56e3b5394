"""Exceptions and warnings raised by se_inject.

Every error is an :class:`SEInjectError`, so ``except se_inject.SEInjectError`` catches them all;
each also derives from the built-in exception a caller would expect (``TypeError`` for a wrong
type, ``ValueError`` for a bad option or input, ``RuntimeError`` for what fx or a model cannot
do), so generic handlers keep working. Messages name the module path involved and end with what
to do about it.
"""

from __future__ import annotations

__all__ = [
    "SEInjectError",
    "NotAModuleError",
    "OptionError",
    "TraceError",
    "ExampleInputError",
    "VerificationError",
    "RecipeError",
    "CheckpointError",
    "UnknownModelError",
    "NoResidualAddsError",
    "BenchError",
    "SEInjectWarning",
    "NoResidualAddsWarning",
    "RefusedModuleWarning",
    "GraphModuleRootWarning",
]


class SEInjectError(Exception):
    """Base class of every error raised by se_inject. Never raised itself."""


class NotAModuleError(SEInjectError, TypeError):
    """The object given is not a ``torch.nn.Module``, or not one se_inject can rewrite."""


class OptionError(SEInjectError, ValueError):
    """An option is invalid or impossible (e.g. ``reduction=0``, a filter that matches nothing)."""


class TraceError(SEInjectError, RuntimeError):
    """``torch.fx`` could trace no part of the model that could hold a residual add."""


class ExampleInputError(SEInjectError, ValueError):
    """The model could not be run on the example input."""


class VerificationError(SEInjectError, RuntimeError):
    """A traced graph does not reproduce its module's output (raised with ``strict=True``)."""


class RecipeError(SEInjectError, ValueError):
    """A saved se_inject directory is missing, corrupt, truncated or was not written by se_inject, or
    a recipe or model directory asks for what se_inject never does (run its code, read other
    files, download, build a model over the size limit or a class that is not a concrete model)."""


class CheckpointError(SEInjectError, ValueError):
    """Weights for the source model are missing, unreadable, unreachable or not a state_dict."""


class UnknownModelError(SEInjectError, ValueError):
    """A model name is not known to timm."""


class NoResidualAddsError(SEInjectError, ValueError):
    """The ``se-inject`` command was asked to convert a model that has no site for SE."""


class BenchError(SEInjectError, RuntimeError):
    """A benchmark could not measure what it was asked to (a variant failed to compile or run, or
    torch.compile hit its recompile limit, which would have timed eager code as compiled)."""


class SEInjectWarning(UserWarning):
    """Base class of the warnings issued by se_inject."""


class NoResidualAddsWarning(SEInjectWarning):
    """The model has no residual add that can take an SE block; it is returned unchanged."""


class RefusedModuleWarning(SEInjectWarning):
    """A module's traced graph could not be verified, so its residual adds were left alone."""


class GraphModuleRootWarning(SEInjectWarning):
    """A residual add lives in the root module's own forward, so the root became a GraphModule."""
