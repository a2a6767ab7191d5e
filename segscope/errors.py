"""Exceptions segscope raises for bad input; each message names what was wrong.

The command line prints these as one line; any other exception is a bug in segscope (or in
a library below it) and keeps its traceback.
"""

from __future__ import annotations


class SegscopeError(ValueError):
    """Base of segscope's own errors (a ValueError: the input, not the code, is at fault)."""


class InputNotFoundError(SegscopeError, FileNotFoundError):
    """A file or folder the caller named does not exist (also a ``FileNotFoundError``)."""


class ImageLoadError(SegscopeError):
    """An image could not be read: missing, corrupt, truncated, unsupported or too large."""


class CheckpointError(SegscopeError):
    """A checkpoint could not be read, converted or loaded into the model."""


class AnnotationError(SegscopeError):
    """An annotation file or record is malformed."""


class ConfigError(SegscopeError):
    """A model or training configuration holds a value segscope cannot build from."""


class OptionError(SegscopeError):
    """An option cannot be used as given: an absent device, a threshold the task lacks, an output
    path that would overwrite a file."""


class ModelOutputError(SegscopeError):
    """A model produced non-finite outputs (NaN or infinity): broken weights, or values that
    overflowed a half-precision dtype."""

