"""Exceptions segscope raises for bad input; each message names what was wrong."""

from __future__ import annotations


class SegscopeError(ValueError):
    """Base of segscope's own errors (a ValueError: the input, not the code, is at fault)."""


class ImageLoadError(SegscopeError):
    """An image could not be read: missing, corrupt, truncated, unsupported or too large."""


class CheckpointError(SegscopeError):
    """A checkpoint could not be read, converted or loaded into the model."""


class AnnotationError(SegscopeError):
    """An annotation file or record is malformed."""
