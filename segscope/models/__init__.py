"""Networks segscope builds; ``build_model`` turns an architecture config into one."""

from __future__ import annotations

from torch import nn

from segscope.config import Mask2FormerConfig


def build_model(cfg: Mask2FormerConfig) -> nn.Module:
    """The randomly initialized network that ``cfg`` describes."""
    # Imported here so that importing a light submodule (say ``segscope.models.ops``) does
    # not build the import graph of every architecture.
    from segscope.models.mask2former.model import Mask2Former

    if isinstance(cfg, Mask2FormerConfig):
        return Mask2Former(cfg)
    raise ValueError(f"no model is registered for config type {type(cfg).__name__}")
