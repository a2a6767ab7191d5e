"""Original Mask2Former checkpoints (facebookresearch/Mask2Former, detectron2) -> segscope.

Two steps: ``read_detectron2_pickle`` reads a model-zoo ``.pkl`` or a detectron2 training
``.pth`` without running pickled code, and ``convert_detectron2_mask2former`` renames the
original module names to segscope's. Supported backbones: detectron2's ResNet with the
stride in the 3x3 convolution (``RESNETS.STRIDE_IN_1X1: False``, the torchvision layout every
Mask2Former config uses) and ``D2SwinTransformer``.

A model-zoo ``.pkl`` is a pickle of ``{"model": {name: numpy.ndarray}, "__author__": str, ...}``
(detectron2's ``DetectionCheckpointer._load_file``); the ``"model"`` dict may be an
``OrderedDict`` carrying module versions in its ``_metadata`` attribute.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor

from segscope.checkpoints.renaming import compile_rules, rename_key
from segscope.checkpoints.safe_load import extract_state_dict, read_torch_file
from segscope.errors import CheckpointError, InputNotFoundError

StateDict = dict[str, Tensor]


# ------------------------------------------------------------------------------- Reading


def _latin1_encode(text: str, encoding: str) -> bytes:
    """``_codecs.encode`` restricted to the one codec pickle uses for ``bytes``."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"the pickle encodes bytes with codec {encoding!r}, expected 'latin1'")
    return text.encode("latin1")


def numpy_globals() -> dict[tuple[str, str], Any]:
    """The only globals a pickle of numpy arrays needs, keyed by the name the pickle uses.

    numpy 2 moved ``numpy.core`` to ``numpy._core``; files written under either name resolve
    to the installed functions, without importing the module the pickle names.
    """
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric

    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): OrderedDict,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Pickle protocols 0-2 store ``bytes`` (an array's raw data) as ``_codecs.encode(str, "latin1")``.
        ("_codecs", "encode"): _latin1_encode,
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        # Protocol 5 rebuilds arrays from a buffer.
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


_ALLOWED_GLOBALS = numpy_globals()


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that can build numpy arrays and plain containers and nothing else."""

    def __init__(self, file: IO[bytes], source: Path) -> None:
        # latin1 decodes Python 2 pickles (Caffe2-era files) the way detectron2 does.
        super().__init__(file, encoding="latin1")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"refusing to load {self.source}: it references the Python global {module}.{name}, "
                f"and segscope only unpickles numpy arrays and plain containers, never arbitrary code"
            ) from None


def read_detectron2_pickle(path: str | Path) -> StateDict:
    """The tensors of a detectron2 checkpoint: a model-zoo ``.pkl`` or a training ``.pth``.

    Keys are detectron2's module names, unchanged. Raises ``FileNotFoundError`` for a missing
    file and ``CheckpointError`` for a truncated, foreign or unsafe one.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".pkl" and not zipfile.is_zipfile(path):
        return _arrays_to_tensors(_unpickle_arrays(path), path)
    # detectron2's own training checkpoints are torch files: {"model": ..., "optimizer": ...}.
    return extract_state_dict(read_torch_file(path), path)


def _unpickle_arrays(path: Path) -> Any:
    try:
        with path.open("rb") as file:
            return _ArrayUnpickler(file, path).load()
    except CheckpointError:
        raise
    except Exception as error:  # damaged bytes fail in many ways: EOFError, UnpicklingError, ValueError, ...
        raise CheckpointError(
            f"cannot read {path} (truncated, or not a detectron2 pickle?): {type(error).__name__}: {error}"
        ) from error


def _arrays_to_tensors(payload: Any, path: Path) -> StateDict:
    """``{"model": {name: ndarray}}`` -> ``{name: Tensor}`` (sharing the arrays' memory)."""
    model = payload.get("model") if isinstance(payload, Mapping) else None
    if not isinstance(model, Mapping):
        raise CheckpointError(f"{path} is not a detectron2 checkpoint: expected a pickled dict with a 'model' dict")
    state_dict: StateDict = {}
    for key, value in model.items():
        if not isinstance(key, str) or not isinstance(value, np.ndarray):
            raise CheckpointError(f"{path}: 'model' entry {key!r} is a {type(value).__name__}, not a numpy array")
        try:
            state_dict[key] = torch.from_numpy(value)
        except TypeError as error:  # dtypes torch cannot hold: object, structured, big-endian
            raise CheckpointError(
                f"{path}: 'model' entry {key!r} has dtype {value.dtype}, not a tensor dtype"
            ) from error
    return state_dict


# ---------------------------------------------------------------------------- Converting

# Not weights: the criterion's class weights (rebuilt from the config), the normalization
# constants (applied by segscope's preprocessing), and Swin's relative position index
# (derived from the window size; segscope rebuilds it).
_DROPPED = re.compile(
    r"criterion\.empty_weight|pixel_(?:mean|std)|backbone\.layers\.\d+\.blocks\.\d+\.attn\.relative_position_index"
)

# detectron2's ResNet stages res2..res5 are torchvision's layer1..layer4; each Conv2d holds
# its norm as a submodule (``conv1.norm``), torchvision keeps it beside (``bn1``).
_RES_BLOCK = r"backbone\.res([2-5])\.(\d+)\."


def _block(match: re.Match[str]) -> str:
    return f"backbone.layer{int(match[1]) - 1}.{match[2]}."


# Version-1 MaskFormerHead checkpoints kept the pixel decoder's modules directly under
# ``sem_seg_head`` (detectron2 renames them on load), so ``pixel_decoder.`` is optional.
_PIXEL = r"sem_seg_head\.(?:pixel_decoder\.)?"
_ENCODER_LAYER = _PIXEL + r"transformer\.encoder\.layers\.(\d+)\."
_PREDICTOR = r"sem_seg_head\.predictor\."
_ATTENTION_PARAMS = r"(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)"

_RULES = compile_rules(
    [
        # ResNet (D2SwinTransformer's names are segscope's Swin names already).
        (r"backbone\.stem\.conv1\.weight", "backbone.conv1.weight"),
        (r"backbone\.stem\.conv1\.norm\.(\w+)", r"backbone.bn1.\1"),
        (_RES_BLOCK + r"conv([1-3])\.weight", lambda m: f"{_block(m)}conv{m[3]}.weight"),
        (_RES_BLOCK + r"conv([1-3])\.norm\.(\w+)", lambda m: f"{_block(m)}bn{m[3]}.{m[4]}"),
        (_RES_BLOCK + r"shortcut\.weight", lambda m: f"{_block(m)}downsample.0.weight"),
        (_RES_BLOCK + r"shortcut\.norm\.(\w+)", lambda m: f"{_block(m)}downsample.1.{m[3]}"),
        # Pixel decoder.
        (_PIXEL + r"input_proj\.(\d+)\.([01])\.(weight|bias)", r"pixel_decoder.input_proj.\1.\2.\3"),
        (_PIXEL + r"transformer\.level_embed", "pixel_decoder.level_embed"),
        (
            _ENCODER_LAYER + r"self_attn\.(sampling_offsets|attention_weights|value_proj|output_proj)\.(weight|bias)",
            r"pixel_decoder.layers.\1.self_attn.\2.\3",
        ),
        (_ENCODER_LAYER + r"norm1\.(weight|bias)", r"pixel_decoder.layers.\1.self_attn_norm.\2"),
        (_ENCODER_LAYER + r"linear([12])\.(weight|bias)", r"pixel_decoder.layers.\1.linear\2.\3"),
        (_ENCODER_LAYER + r"norm2\.(weight|bias)", r"pixel_decoder.layers.\1.ffn_norm.\2"),
        # The single FPN step (stride 4): ``adapter_1`` is the lateral conv, ``layer_1`` the output conv.
        (_PIXEL + r"adapter_1\.weight", "pixel_decoder.lateral_conv.0.weight"),
        (_PIXEL + r"adapter_1\.norm\.(weight|bias)", r"pixel_decoder.lateral_conv.1.\1"),
        (_PIXEL + r"layer_1\.weight", "pixel_decoder.output_conv.0.weight"),
        (_PIXEL + r"layer_1\.norm\.(weight|bias)", r"pixel_decoder.output_conv.1.\1"),
        (_PIXEL + r"mask_features\.(weight|bias)", r"pixel_decoder.mask_features.\1"),
        # Transformer decoder; ``static_query`` is the version-1 name of ``query_feat``.
        (_PREDICTOR + r"(?:query_feat|static_query)\.weight", "transformer_decoder.query_feat.weight"),
        (_PREDICTOR + r"query_embed\.weight", "transformer_decoder.query_pos.weight"),
        (_PREDICTOR + r"level_embed\.weight", "transformer_decoder.level_embed.weight"),
        (_PREDICTOR + r"input_proj\.(\d+)\.(weight|bias)", r"transformer_decoder.input_proj.\1.\2"),
        # Both attentions are nn.MultiheadAttention in both models: packed q/k/v carry over as is.
        (
            _PREDICTOR + r"transformer_self_attention_layers\.(\d+)\.self_attn\." + _ATTENTION_PARAMS,
            r"transformer_decoder.layers.\1.self_attn.\2",
        ),
        (
            _PREDICTOR + r"transformer_self_attention_layers\.(\d+)\.norm\.(weight|bias)",
            r"transformer_decoder.layers.\1.self_attn_norm.\2",
        ),
        (
            _PREDICTOR + r"transformer_cross_attention_layers\.(\d+)\.multihead_attn\." + _ATTENTION_PARAMS,
            r"transformer_decoder.layers.\1.cross_attn.\2",
        ),
        (
            _PREDICTOR + r"transformer_cross_attention_layers\.(\d+)\.norm\.(weight|bias)",
            r"transformer_decoder.layers.\1.cross_attn_norm.\2",
        ),
        (
            _PREDICTOR + r"transformer_ffn_layers\.(\d+)\.(linear[12])\.(weight|bias)",
            r"transformer_decoder.layers.\1.\2.\3",
        ),
        (
            _PREDICTOR + r"transformer_ffn_layers\.(\d+)\.norm\.(weight|bias)",
            r"transformer_decoder.layers.\1.ffn_norm.\2",
        ),
        (_PREDICTOR + r"decoder_norm\.(weight|bias)", r"transformer_decoder.decoder_norm.\1"),
        (_PREDICTOR + r"class_embed\.(weight|bias)", r"transformer_decoder.class_head.\1"),
        (_PREDICTOR + r"mask_embed\.layers\.(\d+)\.(weight|bias)", r"transformer_decoder.mask_head.layers.\1.\2"),
    ]
)

# A converted batch-norm layer of the ResNet, found by its running mean.
_BATCH_NORM = re.compile(r"(backbone\.layer\d\.\d+\.(?:bn\d|downsample\.1)|backbone\.bn1)\.running_mean")


def convert_detectron2_mask2former(state_dict: Mapping[str, Tensor]) -> StateDict:
    """detectron2 ``MaskFormer`` (Mask2Former) weights -> segscope ``Mask2Former`` keys.

    Known non-weights are dropped; keys no rule recognises pass through unchanged, so a
    strict ``load_state_dict`` names them. Mask2Former's ResNet uses ``FrozenBatchNorm2d``,
    which has no ``num_batches_tracked``; segscope's ``nn.BatchNorm2d`` gets a zero count (a
    fresh layer's), which only matters to cumulative-average training (``momentum=None``).
    """
    converted: StateDict = {}
    for key, value in state_dict.items():
        if _DROPPED.fullmatch(key):
            continue
        converted[rename_key(key, _RULES) or key] = value
    for key in list(converted):
        norm = _BATCH_NORM.fullmatch(key)
        if norm:
            converted.setdefault(f"{norm[1]}.num_batches_tracked", torch.tensor(0, dtype=torch.long))
    return converted
