"""Optimizer and learning-rate schedule of Mask2Former's recipe."""

from __future__ import annotations

import math

import torch
from torch import nn

from segscope.engine.train_config import SolverConfig

_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm)
# Parameters that are embeddings or position tables: no weight decay, as for norms.
_NO_DECAY_NAMES = ("relative_position_bias_table", "absolute_pos_embed", "level_embed", "query_feat", "query_embed")


def layer_decay_scale(model: nn.Module, name: str, solver: SolverConfig) -> float:
    """``solver.layer_decay ** (L + 1 - layer)`` for parameter ``name`` of a backbone with ``L``
    layers (``Backbone.layer_index``); 1 for parameters above the stack or without decay."""
    backbone = getattr(model, "backbone", None)
    depth = getattr(backbone, "num_layers", 0)
    if solver.layer_decay == 1.0 or not depth:
        return 1.0
    layer = None
    if name.startswith("backbone."):
        layer = backbone.layer_index(name.removeprefix("backbone."))
    elif solver.layer_decay_head_embeddings and _is_head_embedding(model, name):
        layer = 0
    return 1.0 if layer is None else solver.layer_decay ** (depth + 1 - layer)


def _is_head_embedding(model: nn.Module, name: str) -> bool:
    """Whether ``name`` is among the head embeddings the network names in its optional
    ``head_embeddings`` pattern (BEiT's segmentation recipe sinks them to the bottom layer)."""
    pattern = getattr(model, "head_embeddings", None)
    return pattern is not None and pattern.match(name) is not None


def build_optimizer(model: nn.Module, solver: SolverConfig) -> torch.optim.AdamW:
    """AdamW with the backbone's lr scaled (and decayed by layer, if asked) and no weight
    decay on norms and embeddings."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full_name = f"{module_name}.{param_name}"
            lr = solver.lr * (solver.backbone_lr_multiplier if full_name.startswith("backbone.") else 1.0)
            lr *= layer_decay_scale(model, full_name, solver)
            no_decay = isinstance(module, (*_NORMS, nn.Embedding)) or any(n in full_name for n in _NO_DECAY_NAMES)
            groups.setdefault((lr, 0.0 if no_decay else solver.weight_decay), []).append(param)
    param_groups = [{"params": params, "lr": lr, "weight_decay": wd} for (lr, wd), params in groups.items()]
    return torch.optim.AdamW(param_groups, lr=solver.lr, weight_decay=solver.weight_decay)


def lr_factor(iteration: int, total: int, solver: SolverConfig) -> float:
    """Multiplier of the base lr at ``iteration`` of ``total`` (linear warmup, then poly or step)."""
    warmup = min(1.0, (iteration + 1) / solver.warmup_iters) if solver.warmup_iters else 1.0
    progress = min(iteration, total) / max(total, 1)
    if solver.schedule == "poly":
        decay = (1.0 - progress) ** solver.poly_power
    elif solver.schedule == "step":
        decay = solver.step_gamma ** sum(progress >= m for m in solver.step_milestones)
    else:
        raise ValueError(f"unknown lr schedule {solver.schedule!r}; expected 'poly' or 'step'")
    return warmup * decay if math.isfinite(decay) else 0.0


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_iterations: int, solver: SolverConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration scheduler applying ``lr_factor``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, total_iterations, solver))
