"""ImageNet-pretrained backbone weights, as their projects release them, loaded into segscope's
backbones (to train a segmentation model from a pretrained backbone, as every card did).

The layout is recognised from the keys, and checked against the backbone being initialised:

| release                                   | layout                                                          |
| ----------------------------------------- | --------------------------------------------------------------- |
| torchvision ResNet (``resnet50-*.pth``)   | segscope's ResNet names; ``fc.*`` is the classifier             |
| Swin, official (``{"model": ...}``)       | segscope's Swin names; ``layers.i.downsample`` ends stage i     |
| Swin, timm >= 0.9                         | ``layers.i.downsample`` starts stage i; ``head.fc.*`` classifier |

Classifier heads and the final ``norm`` are dropped; ``relative_position_index`` and
``attn_mask`` buffers are recomputed by segscope. Relative position bias tables trained with
another window size are resized bicubically over their ``(2W-1) x (2W-1)`` grid, as Swin's own
fine-tuning does (e.g. window 7 at 224 px to window 12). The dense-prediction Swin's per-stage
output norms (``norm0``..``norm3``) are not in an ImageNet release and keep their
initialisation, as in Mask2Former.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segscope.checkpoints import download
from segscope.checkpoints.safe_load import StateDict, read_weights
from segscope.errors import CheckpointError, InputNotFoundError

_SWIN_STORAGE = "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/"

# Named releases: (URL, sha256 or its prefix). torchvision names its files after the first 8
# hex digits of their sha256; the Swin releases publish no digest.
IMAGENET_WEIGHTS: dict[str, tuple[str, str | None]] = {
    "torchvision-resnet18": ("https://download.pytorch.org/models/resnet18-f37072fd.pth", "f37072fd"),
    "torchvision-resnet34": ("https://download.pytorch.org/models/resnet34-b627a593.pth", "b627a593"),
    "torchvision-resnet50": ("https://download.pytorch.org/models/resnet50-0676ba61.pth", "0676ba61"),
    "torchvision-resnet101": ("https://download.pytorch.org/models/resnet101-63fe2227.pth", "63fe2227"),
    "torchvision-resnet152": ("https://download.pytorch.org/models/resnet152-394f9c45.pth", "394f9c45"),
    "swin-t-in1k-224": (_SWIN_STORAGE + "swin_tiny_patch4_window7_224.pth", None),
    "swin-s-in1k-224": (_SWIN_STORAGE + "swin_small_patch4_window7_224.pth", None),
    "swin-b-in22k-384": (_SWIN_STORAGE + "swin_base_patch4_window12_384_22k.pth", None),
    "swin-l-in22k-384": (_SWIN_STORAGE + "swin_large_patch4_window12_384_22k.pth", None),
}

# Keys that are not backbone weights in any release.
_DROPPED = re.compile(r"^(fc|head|norm)\.|(relative_position_index|attn_mask)$")
# Keys of segscope's backbones that ImageNet releases do not have.
_MAY_BE_MISSING = re.compile(r"^norm\d+\.(weight|bias)$|num_batches_tracked$")
_TIMM_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")


def resolve_weights_file(source: str | Path) -> Path:
    """A named release (``IMAGENET_WEIGHTS``), an http(s) URL or a local file, as a local path."""
    text = str(source)
    if text in IMAGENET_WEIGHTS:
        url, digest = IMAGENET_WEIGHTS[text]
        return download.fetch_url(url, sha256=digest)
    if text.startswith(("http://", "https://")):
        return download.fetch_url(text)
    path = Path(text).expanduser()
    if not path.is_file():
        names = ", ".join(IMAGENET_WEIGHTS)
        raise InputNotFoundError(f"backbone weights {text!r} are neither a file, a URL nor one of: {names}")
    return path


def convert_imagenet_backbone(released: StateDict, backbone: nn.Module) -> StateDict:
    """``released`` (any layout of the table above) renamed and resized for ``backbone``."""
    timm_layout = any(k.startswith("head.fc.") for k in released) or (
        any(_TIMM_DOWNSAMPLE.match(k) for k in released)
        and not any(k.startswith("layers.0.downsample.") for k in released)
    )
    own = backbone.state_dict()
    converted: StateDict = {}
    for key, value in released.items():
        if _DROPPED.search(key):
            continue
        if timm_layout and (match := _TIMM_DOWNSAMPLE.match(key)):
            key = f"layers.{int(match[1]) - 1}.downsample.{key[match.end() :]}"
        if key.endswith("relative_position_bias_table") and key in own and own[key].shape != value.shape:
            value = resize_relative_position_table(value, own[key].shape[0])
        converted[key] = value
    return converted


def resize_relative_position_table(table: Tensor, entries: int) -> Tensor:
    """``[(2W-1)^2, heads]`` bias table resized to ``[entries, heads]`` by bicubic interpolation."""
    old_side, new_side = round(table.shape[0] ** 0.5), round(entries**0.5)
    if old_side**2 != table.shape[0] or new_side**2 != entries:
        raise CheckpointError(
            f"relative position tables of {table.shape[0]} and {entries} entries are not square grids"
        )
    grid = table.T.reshape(1, -1, old_side, old_side).float()
    resized = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    return resized.reshape(-1, entries).T.contiguous().to(table.dtype)


def load_backbone_weights(backbone: nn.Module, source: str | Path) -> list[str]:
    """Initialise ``backbone`` from ImageNet weights; return the names left as initialised.

    Raises:
        CheckpointError: the file does not fit the backbone (its missing, unexpected and
            mis-shaped keys are named), or is unsafe or truncated.
    """
    path = resolve_weights_file(source)
    converted = convert_imagenet_backbone(read_weights(path), backbone)
    own = backbone.state_dict()
    missing = sorted(k for k in own if k not in converted and not _MAY_BE_MISSING.search(k))
    unexpected = sorted(k for k in converted if k not in own)
    misshaped = sorted(k for k in converted if k in own and own[k].shape != converted[k].shape)
    if missing or unexpected or misshaped:
        problems = [
            f"{label} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
            if keys
        ]
        raise CheckpointError(f"{source} does not fit the {type(backbone).__name__} backbone: " + "; ".join(problems))
    with torch.no_grad():
        for key, value in converted.items():
            own[key].copy_(value)
    return sorted(k for k in own if k not in converted)
