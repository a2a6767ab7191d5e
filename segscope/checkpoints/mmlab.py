"""Mask2Former checkpoints of OpenMMLab's toolboxes -> segscope.

One pure function per source format, each ``(state_dict, model) -> state_dict``: the model is
the segscope ``Mask2Former`` the weights are for, consulted to resize BEiT bias tables to its
grid. Supported backbones: ViT-Adapter around BEiT/BEiTv2 (the ViT-Adapter project's
``BEiTAdapter``), mmcv's Swin Transformer and mmcv's ResNet (torchvision names already).

| format   | toolbox (and mmcv)              | head prefix      | layer names                       |
| -------- | ------------------------------- | ---------------- | --------------------------------- |
| mmseg0   | mmsegmentation 0.x (mmcv 1.x)   | ``decode_head``  | ``attentions.i``, ``ffns.0``      |
| mmdet2   | mmdetection 2.x (mmcv 1.x)      | ``panoptic_head``| ``attentions.i``, ``ffns.0``      |
| mmseg1   | mmsegmentation 1.x (mmcv 2.x)   | ``decode_head``  | ``self_attn``, ``cross_attn``, ``ffn`` |
| mmdet3   | mmdetection 3.x (mmcv 2.x)      | ``panoptic_head``| ``self_attn``, ``cross_attn``, ``ffn`` |

ModelScope's release of the COCO-Stuff card (``pytorch_model.pt``) is an mmseg 0.x model with
the same module names (its ``Mask2FormerHeadFromMMSeg`` is the ViT-Adapter head under another
name), so ``mmseg0`` reads it.

mmcv 1.x decoder layers run ``cross_attn, norm, self_attn, norm, ffn, norm``, so
``attentions.0`` is the cross-attention and ``norms.0`` follows it; mmcv 2.x names them.
The heads compute what segscope's (detectron2's) Mask2Former computes, so converting is
renaming, plus two fixes of layout: mmcv's Swin merges patches with ``nn.Unfold``, whose
channel order differs from the original's concatenation, and BEiT's bias tables are resized
to the target's grid when they differ.

Dropped: ``relative_position_index`` buffers (rebuilt), ``data_preprocessor.*`` constants
(segscope's preprocessing applies them) and mmdet's EMA copies (``ema_*``, the
``ExpMomentumEMAHook`` shadow weights; the model's own weights are the ones evaluated).
"""

from __future__ import annotations

import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from torch import Tensor, nn

from segscope.checkpoints.renaming import Rule, compile_rules, rename_key
from segscope.checkpoints.safe_load import StateDict, read_weights
from segscope.errors import CheckpointError
from segscope.models.backbones.beit import BeitAttention, resize_position_table

_DROPPED = re.compile(r"data_preprocessor\..*|ema_.*|.*\.relative_position_index")

# The transformer layers, as mmcv 1.x names them and as mmcv 2.x does.
_LAYER_NAMES = {
    "mmcv1": {
        "enc_attn": r"attentions\.0",
        "cross": r"attentions\.0\.attn",
        "self": r"attentions\.1\.attn",
        "ffn": r"ffns\.0",
    },
    "mmcv2": {"enc_attn": r"self_attn", "cross": r"cross_attn\.attn", "self": r"self_attn\.attn", "ffn": r"ffn"},
}
_WB = r"(weight|bias)"
_MHA = r"(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)"


def _head_rules(head: str, style: str) -> list[Rule]:
    names = _LAYER_NAMES[style]
    pixel = rf"{head}\.pixel_decoder\."
    enc = pixel + r"encoder\.layers\.(\d+)\."
    dec = rf"{head}\.transformer_decoder\.layers\.(\d+)\."
    return compile_rules(
        [
            # Pixel decoder. ``input_convs`` are ConvModules (conv + gn), coarsest level first.
            (pixel + rf"input_convs\.(\d+)\.conv\.{_WB}", r"pixel_decoder.input_proj.\1.0.\2"),
            (pixel + rf"input_convs\.(\d+)\.gn\.{_WB}", r"pixel_decoder.input_proj.\1.1.\2"),
            (pixel + r"level_encoding\.weight", "pixel_decoder.level_embed"),
            (
                enc + names["enc_attn"] + rf"\.(sampling_offsets|attention_weights|value_proj|output_proj)\.{_WB}",
                r"pixel_decoder.layers.\1.self_attn.\2.\3",
            ),
            (enc + names["ffn"] + rf"\.layers\.0\.0\.{_WB}", r"pixel_decoder.layers.\1.linear1.\2"),
            (enc + names["ffn"] + rf"\.layers\.1\.{_WB}", r"pixel_decoder.layers.\1.linear2.\2"),
            (enc + rf"norms\.0\.{_WB}", r"pixel_decoder.layers.\1.self_attn_norm.\2"),
            (enc + rf"norms\.1\.{_WB}", r"pixel_decoder.layers.\1.ffn_norm.\2"),
            (pixel + r"lateral_convs\.0\.conv\.weight", "pixel_decoder.lateral_conv.0.weight"),
            (pixel + rf"lateral_convs\.0\.gn\.{_WB}", r"pixel_decoder.lateral_conv.1.\1"),
            (pixel + r"output_convs\.0\.conv\.weight", "pixel_decoder.output_conv.0.weight"),
            (pixel + rf"output_convs\.0\.gn\.{_WB}", r"pixel_decoder.output_conv.1.\1"),
            (pixel + rf"mask_feature\.{_WB}", r"pixel_decoder.mask_features.\1"),
            # Transformer decoder and prediction heads.
            (dec + names["cross"] + rf"\.{_MHA}", r"transformer_decoder.layers.\1.cross_attn.\2"),
            (dec + names["self"] + rf"\.{_MHA}", r"transformer_decoder.layers.\1.self_attn.\2"),
            (dec + names["ffn"] + rf"\.layers\.0\.0\.{_WB}", r"transformer_decoder.layers.\1.linear1.\2"),
            (dec + names["ffn"] + rf"\.layers\.1\.{_WB}", r"transformer_decoder.layers.\1.linear2.\2"),
            (dec + rf"norms\.0\.{_WB}", r"transformer_decoder.layers.\1.cross_attn_norm.\2"),
            (dec + rf"norms\.1\.{_WB}", r"transformer_decoder.layers.\1.self_attn_norm.\2"),
            (dec + rf"norms\.2\.{_WB}", r"transformer_decoder.layers.\1.ffn_norm.\2"),
            (rf"{head}\.transformer_decoder\.post_norm\.{_WB}", r"transformer_decoder.decoder_norm.\1"),
            (rf"{head}\.query_embed\.weight", "transformer_decoder.query_pos.weight"),
            (rf"{head}\.query_feat\.weight", "transformer_decoder.query_feat.weight"),
            (rf"{head}\.level_embed\.weight", "transformer_decoder.level_embed.weight"),
            (rf"{head}\.decoder_input_projs\.(\d+)\.{_WB}", r"transformer_decoder.input_proj.\1.\2"),
            (rf"{head}\.cls_embed\.{_WB}", r"transformer_decoder.class_head.\1"),
            (
                rf"{head}\.mask_embed\.([024])\.{_WB}",
                lambda m: f"transformer_decoder.mask_head.layers.{int(m[1]) // 2}.{m[2]}",
            ),
        ]
    )


_SWIN_BLOCK = r"backbone\.stages\.(\d+)\.blocks\.(\d+)\."
_BACKBONE_RULES = compile_rules(
    [
        # ViT-Adapter: the BEiT's own modules sit at the top of ``BEiTAdapter``; segscope keeps
        # the transformer under ``vit``.
        (r"backbone\.(cls_token|patch_embed\.proj\.(?:weight|bias)|blocks\..+)", r"backbone.vit.\1"),
        # mmcv's Swin.
        (rf"backbone\.patch_embed\.projection\.{_WB}", r"backbone.patch_embed.proj.\1"),
        (
            _SWIN_BLOCK + r"attn\.w_msa\.(relative_position_bias_table|qkv\.weight|qkv\.bias|proj\.weight|proj\.bias)",
            r"backbone.layers.\1.blocks.\2.attn.\3",
        ),
        (_SWIN_BLOCK + rf"ffn\.layers\.0\.0\.{_WB}", r"backbone.layers.\1.blocks.\2.mlp.fc1.\3"),
        (_SWIN_BLOCK + rf"ffn\.layers\.1\.{_WB}", r"backbone.layers.\1.blocks.\2.mlp.fc2.\3"),
        (_SWIN_BLOCK + rf"(norm[12])\.{_WB}", r"backbone.layers.\1.blocks.\2.\3.\4"),
        (
            r"backbone\.stages\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)",
            r"backbone.layers.\1.downsample.\2",
        ),
    ]
)


def _unfold_to_concat(tensor: Tensor) -> Tensor:
    """Patch-merging weights from ``nn.Unfold``'s channel order to the original's concatenation.

    Unfold lays out 4C inputs as (channel, ky, kx); the original concatenates the four
    neighbours (0,0), (1,0), (0,1), (1,1) of C channels each. Works on the reduction's
    ``[2C, 4C]`` weight and on the norm's ``[4C]`` vectors.
    """
    channels = tensor.shape[-1] // 4
    neighbours = tensor.unflatten(-1, (channels, 4))[..., [0, 2, 1, 3]]  # unfold's (ky, kx) -> concat order
    return neighbours.transpose(-1, -2).flatten(-2).contiguous()


def mmlab_weights(state_dict: Mapping[str, Tensor], head: str, kind: str) -> Iterator[tuple[str, Tensor]]:
    """The weights of an OpenMMLab state dict under their own names: DDP's ``module.`` removed
    (mmcv strips it too), non-weights (``_DROPPED``) left out. ``CheckpointError`` unless some
    weight sits under ``head`` (the model's head, e.g. ``decode_head``); ``kind`` names what
    the file should have been ("a mmdetection 2.x Mask2Former")."""
    keys = [key.removeprefix("module.") for key in state_dict]
    if not any(key.startswith(f"{head}.") for key in keys):
        prefixes = sorted({key.split(".", 1)[0] for key in keys})[:8]
        raise CheckpointError(f"not {kind} checkpoint: no '{head}.*' weights (top-level names: {prefixes})")
    for key, value in zip(keys, state_dict.values()):
        if not _DROPPED.fullmatch(key):
            yield key, value


def _convert(state_dict: Mapping[str, Tensor], model: nn.Module, head: str, style: str, name: str) -> StateDict:
    head_rules = _head_rules(head, style)
    own = model.state_dict()
    converted: StateDict = {}
    for key, value in mmlab_weights(state_dict, head, f"a {name} Mask2Former"):
        new_key = rename_key(key, head_rules) or rename_key(key, _BACKBONE_RULES) or key
        if ".downsample." in new_key and key.startswith("backbone.stages."):
            value = _unfold_to_concat(value)
        if new_key.endswith("relative_position_bias_table") and new_key in own and own[new_key].shape != value.shape:
            value = _resize_beit_table(model, new_key, value)
        converted[new_key] = value
    return converted


def _resize_beit_table(model: nn.Module, key: str, table: Tensor) -> Tensor:
    """A BEiT block's bias table resized to the target block's grid (Swin tables are not resized:
    a different window size is a different model)."""
    attention = model.get_submodule(key.rsplit(".", 1)[0])
    if not isinstance(attention, BeitAttention):
        return table  # the strict load names the mismatch
    side = round(((table.shape[0] - attention.extra_rows) ** 0.5 + 1) / 2)
    if (2 * side - 1) ** 2 + attention.extra_rows != table.shape[0]:
        raise CheckpointError(f"{key}: a table of {table.shape[0]} rows is not a square grid's")
    grid = (attention.table_grid,) * 2
    return resize_position_table(table, (side, side), grid, attention.extra_rows).detach().clone()


def convert_mmseg0_mask2former(state_dict: Mapping[str, Tensor], model: nn.Module) -> StateDict:
    """mmsegmentation 0.x (the ViT-Adapter project's ``segmentation/``) -> segscope."""
    return _convert(state_dict, model, "decode_head", "mmcv1", "mmsegmentation 0.x")


def convert_mmseg1_mask2former(state_dict: Mapping[str, Tensor], model: nn.Module) -> StateDict:
    """mmsegmentation 1.x -> segscope."""
    return _convert(state_dict, model, "decode_head", "mmcv2", "mmsegmentation 1.x")


def convert_mmdet2_mask2former(state_dict: Mapping[str, Tensor], model: nn.Module) -> StateDict:
    """mmdetection 2.x (the ViT-Adapter project's ``detection/``) -> segscope."""
    return _convert(state_dict, model, "panoptic_head", "mmcv1", "mmdetection 2.x")


def convert_mmdet3_mask2former(state_dict: Mapping[str, Tensor], model: nn.Module) -> StateDict:
    """mmdetection 3.x -> segscope."""
    return _convert(state_dict, model, "panoptic_head", "mmcv2", "mmdetection 3.x")


Converter = Callable[[Mapping[str, Tensor], nn.Module], StateDict]
MMLAB_CONVERTERS: dict[str, Converter] = {
    "mmseg0": convert_mmseg0_mask2former,
    "mmseg1": convert_mmseg1_mask2former,
    "mmdet2": convert_mmdet2_mask2former,
    "mmdet3": convert_mmdet3_mask2former,
}


def read_mmlab_checkpoint(path: str | Path) -> StateDict:
    """The ``state_dict`` of an mmcv/mmengine checkpoint, read without running pickled code.

    Their ``meta``/``message_hub`` entries hold the frameworks' own objects; those become
    inert placeholders (``safe_load.read_torch_file``) and are discarded. A ``.zip`` holding
    one checkpoint (how the ViT-Adapter project publishes its segmenters) is read through.
    """
    path = Path(path)
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            # A torch checkpoint is itself a zip, recognised by its pickle entry.
            if not any(name.endswith("data.pkl") for name in names):
                return _read_zipped_checkpoint(archive, names, path)
    return read_weights(path, opaque_metadata=True)


def _read_zipped_checkpoint(archive: zipfile.ZipFile, names: list[str], path: Path) -> StateDict:
    members = [name for name in names if name.endswith((".pth", ".pt", ".pth.tar"))]
    if len(members) != 1:
        raise CheckpointError(f"{path} is a zip archive with {len(members)} checkpoints ({members[:5]}); expected one")
    with tempfile.TemporaryDirectory(prefix="segscope-unzip-") as directory:
        target = Path(directory) / "checkpoint.pth"
        with archive.open(members[0]) as source, target.open("wb") as sink:
            shutil.copyfileobj(source, sink, length=1 << 20)
        return read_weights(target, opaque_metadata=True)
