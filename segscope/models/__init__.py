"""Networks segscope builds; ``build_model`` turns an architecture config into one."""

from __future__ import annotations

from typing import Any

from torch import nn


def build_model(cfg: Any) -> nn.Module:
    """The randomly initialized network that ``cfg`` (any registered architecture's config) describes."""
    # Imported here so that importing a light submodule (say ``segscope.models.ops``) does
    # not build the import graph of every architecture.
    from segscope.registry import architecture_of

    return architecture_of(cfg).build(cfg)
