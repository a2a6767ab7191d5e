"""ImageNet-pretrained backbone weights, as their projects release them, loaded into segscope's
backbones (to train a segmentation model from a pretrained backbone, as every card did).

The layout is recognised from the keys, and checked against the backbone being initialised:

| release                                 | layout                                                            |
| --------------------------------------- | ----------------------------------------------------------------- |
| torchvision ResNet (``resnet50-*.pth``) | segscope's ResNet names; ``fc.*`` is the classifier               |
| Swin, official (``{"model": ...}``)     | segscope's Swin names; ``layers.i.downsample`` ends stage i       |
| Swin, timm >= 0.9                       | ``layers.i.downsample`` starts stage i; ``head.fc.*`` classifier  |
| detectron2 / Mask2Former ``.pkl``       | numpy arrays: ResNet as detectron2's torchvision converter names  |
|                                         | it (``stem``, ``res2``..``res5``), Swin in the official layout    |
| BEiT / BEiTv2, official (unilm)         | ``blocks.i.attn.q_bias`` ...; ``{"model"}`` or ``{"module"}``;    |
|                                         | pretraining-only files share one ``rel_pos_bias`` table           |

Classifier heads and the final ``norm`` are dropped; ``relative_position_index`` and
``attn_mask`` buffers are recomputed by segscope. Relative position bias tables trained with
another window size are resized bicubically over their ``(2W-1) x (2W-1)`` grid, as Swin's own
fine-tuning does (e.g. window 7 at 224 px to window 12). The dense-prediction Swin's per-stage
output norms (``norm0``..``norm3``) are not in an ImageNet release and keep their
initialisation, as in Mask2Former.

For a ViT-Adapter only the transformer (``vit.``) comes from the release: the adapter is new,
as in the original. BEiT's bias tables are resized to each block's grid by
``models.backbones.beit.resize_position_table`` (the original's and timm's rule), a shared
table is copied into every block, and the class-token rows are dropped for a model without
one (the windowed detection variant).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from segscope.checkpoints import download
from segscope.checkpoints.detectron2 import convert_detectron2_mask2former, read_detectron2_pickle
from segscope.checkpoints.safe_load import StateDict, load_state_dict_strict, read_weights
from segscope.errors import CheckpointError, InputNotFoundError
from segscope.models.backbones.beit import CLS_TABLE_ROWS, Beit, BeitAttention, resize_position_table
from segscope.models.backbones.vit_adapter import ViTAdapter
from segscope.net import is_url

_SWIN_STORAGE = "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/"
_BEIT_STORAGE = "https://conversationhub.blob.core.windows.net/beit-share-public/"
# Where detectron2's ``detectron2://`` names point (Mask2Former's configs name their ImageNet
# weights that way, e.g. ``detectron2://ImageNetPretrained/torchvision/R-50.pkl``).
_DETECTRON2_STORAGE = "https://dl.fbaipublicfiles.com/detectron2/"

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
    "swin-b-in22k-224": (_SWIN_STORAGE + "swin_base_patch4_window7_224_22k.pth", None),
    "swin-b-in22k-384": (_SWIN_STORAGE + "swin_base_patch4_window12_384_22k.pth", None),
    "swin-l-in22k-384": (_SWIN_STORAGE + "swin_large_patch4_window12_384_22k.pth", None),
    # The ViT-Adapter cards' starting points (their configs name these files).
    "beit-l-in22k-224": (_BEIT_STORAGE + "beit/beit_large_patch16_224_pt22k_ft22k.pth", None),
    "beitv2-l-in21k-224": (_BEIT_STORAGE + "beitv2/beitv2_large_patch16_224_pt1k_ft21k.pth", None),
}

# Keys that are not backbone weights in any release (detectron2's torchvision converter files
# the classifier as ``stem.fc``).
_DROPPED = re.compile(r"^(fc|stem\.fc|head|norm)\.|(relative_position_index|attn_mask)$")
# Keys of segscope's backbones that ImageNet releases do not have.
_MAY_BE_MISSING = re.compile(r"^norm\d+\.(weight|bias)$|num_batches_tracked$")
_TIMM_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")
_DETECTRON2_RESNET = re.compile(r"^(stem|res[2-5])\.")


def resolve_weights_file(source: str | Path) -> Path:
    """A named release (``IMAGENET_WEIGHTS``), an http(s) or ``detectron2://`` URL or a local
    file, as a local path."""
    text = str(source)
    if text in IMAGENET_WEIGHTS:
        url, digest = IMAGENET_WEIGHTS[text]
        return download.fetch_url(url, sha256=digest)
    if text.startswith("detectron2://"):
        text = _DETECTRON2_STORAGE + text.removeprefix("detectron2://")
    if is_url(text):
        return download.fetch_url(text)
    path = Path(text).expanduser()
    if not path.is_file():
        names = ", ".join(IMAGENET_WEIGHTS)
        raise InputNotFoundError(f"backbone weights {text!r} are neither a file, a URL nor one of: {names}")
    return path


def read_imagenet_weights(path: Path) -> StateDict:
    """The tensors of a release file: detectron2 pickles through the numpy-only unpickler."""
    return read_detectron2_pickle(path) if path.suffix == ".pkl" else read_weights(path)


def convert_imagenet_backbone(released: StateDict, backbone: nn.Module) -> StateDict:
    """``released`` (any layout of the table above) renamed and resized for ``backbone``."""
    if isinstance(backbone, ViTAdapter):
        return {f"vit.{k}": v for k, v in convert_beit_release(released, backbone.vit).items()}
    if any(_DETECTRON2_RESNET.match(k) for k in released):
        # detectron2's ResNet names are those of a whole Mask2Former's ``backbone.``.
        whole = convert_detectron2_mask2former({f"backbone.{k}": v for k, v in released.items()})
        released = {k.removeprefix("backbone."): v for k, v in whole.items()}
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


# Not in a dense BEiT: classifier and its norms, the masked-image-modelling head and token.
_BEIT_DROPPED = re.compile(r"^(head|fc_norm|norm|lm_head|mask_token)\b|relative_position_index$")
_SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"


def convert_beit_release(released: StateDict, vit: Beit) -> StateDict:
    """An official BEiT/BEiTv2 state dict fitted to ``vit`` (its own key names)."""
    if not any(k.startswith("blocks.") and k.endswith("attn.qkv.weight") for k in released):
        raise CheckpointError("the file is not a BEiT release: no 'blocks.i.attn.qkv.weight' weights")
    converted: StateDict = {}
    shared = released.get(_SHARED_TABLE)
    for key, value in released.items():
        if _BEIT_DROPPED.search(key) or key == _SHARED_TABLE or (key == "cls_token" and vit.cls_token is None):
            continue
        converted[key] = value
    for index, block in enumerate(vit.blocks):
        key = f"blocks.{index}.attn.relative_position_bias_table"
        table = converted.get(key, shared)
        if table is not None:
            converted[key] = _fit_beit_table(table, block.attn, key)
    return converted


def _fit_beit_table(table: Tensor, attention: BeitAttention, key: str) -> Tensor:
    """A released ``[(2s-1)^2 (+3), heads]`` table resized to ``attention``'s grid (and class rows)."""
    rows = table.shape[0]
    for extra in (CLS_TABLE_ROWS, 0):
        side = round(((rows - extra) ** 0.5 + 1) / 2)
        if (2 * side - 1) ** 2 + extra == rows:
            break
    else:
        raise CheckpointError(f"{key}: a table of {rows} rows is not a square grid's")
    if extra and not attention.extra_rows:
        table, extra = table[:-extra], 0
    if extra != attention.extra_rows:
        raise CheckpointError(f"{key}: the release has no class-token rows but the model has a class token")
    grid = (attention.table_grid,) * 2
    return resize_position_table(table, (side, side), grid, extra).detach().clone()


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

    Only weights no ImageNet release has (``_MAY_BE_MISSING``) may be left so.

    Raises:
        CheckpointError: the file does not fit the backbone (its missing, unexpected and
            mis-shaped keys are named), or is unsafe or truncated.
    """
    path = resolve_weights_file(source)
    converted = convert_imagenet_backbone(read_imagenet_weights(path), backbone)
    own = backbone.state_dict()
    # A ViT-Adapter's adapter is new; only its transformer comes pretrained.
    may_be_missing = re.compile(r"^(?!vit\.)") if isinstance(backbone, ViTAdapter) else _MAY_BE_MISSING
    kept = sorted(k for k in own if k not in converted and may_be_missing.search(k))
    load_state_dict_strict(backbone, {**converted, **{k: own[k] for k in kept}}, f"{source} (ImageNet weights)")
    return kept
