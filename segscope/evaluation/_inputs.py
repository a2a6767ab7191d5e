"""Validation of the label maps the evaluators receive."""

from __future__ import annotations

import numpy as np
import torch


def as_label_map(value: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    """An integer label map (tensor or array, any device) as an int64 tensor; else ValueError."""
    if isinstance(value, np.ndarray):
        if not (np.issubdtype(value.dtype, np.integer) or value.dtype == np.bool_):
            raise ValueError(f"{name} must hold integers, got dtype {value.dtype}")
        # uint32 ids (COCO panoptic rgb2id) have no torch dtype of their own: widen first.
        value = torch.from_numpy(value.astype(np.int64, copy=False))
    elif not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or numpy array, got {type(value).__name__}")
    if value.is_floating_point() or value.is_complex():
        raise ValueError(f"{name} must hold integers, got dtype {value.dtype}")
    return value.long()
