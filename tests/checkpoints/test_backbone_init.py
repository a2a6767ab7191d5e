"""ImageNet backbone releases load into segscope's backbones and compute what their own code does.

References: torchvision's ResNet and timm's Swin (random weights, saved in each release's exact
layout); the official Swin layout is checked through timm's own converter from it.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from timm.models.swin_transformer import checkpoint_filter_fn

from segscope.checkpoints import backbone_init
from segscope.checkpoints.backbone_init import load_backbone_weights, resize_relative_position_table
from segscope.config import ResNetConfig, SwinConfig
from segscope.errors import CheckpointError, InputNotFoundError
from segscope.models.backbones import build_backbone

SWIN_T = SwinConfig(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7, drop_path_rate=0.0)


def _randomize(module: torch.nn.Module) -> None:
    """Random values everywhere, BatchNorm statistics included, so no weight goes unchecked."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point():
                values = torch.rand(tensor.shape, generator=generator) + 0.5 if "running_var" in name else None
                tensor.copy_(values if values is not None else 0.1 * torch.randn(tensor.shape, generator=generator))


def test_torchvision_resnet50_file_gives_torchvisions_features(tmp_path: Path) -> None:
    reference = torchvision.models.resnet50().eval()
    _randomize(reference)
    path = tmp_path / "resnet50-0676ba61.pth"
    torch.save(reference.state_dict(), path)  # the release is a bare state dict with fc.*

    backbone = build_backbone(ResNetConfig(depth=50)).eval()
    left = load_backbone_weights(backbone, path)
    assert left == []  # every weight and statistic comes from the file

    images = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        x = reference.maxpool(reference.relu(reference.bn1(reference.conv1(images))))
        expected = []
        for layer in (reference.layer1, reference.layer2, reference.layer3, reference.layer4):
            x = layer(x)
            expected.append(x)
        got = backbone(images)
    for ours, theirs in zip(got, expected, strict=True):
        # segscope runs its convolutions channels-last: the same sums in another order.
        assert ((ours - theirs).abs().max() / theirs.abs().max()).item() <= 1e-5


def _timm_swin_t() -> torch.nn.Module:
    # At 448 px every stage is larger than a window: at 224 the last stage is one 7x7 window,
    # which timm's classifier leaves unshifted and detection Swins (Mask2Former's) shift.
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=448).eval()
    _randomize(model)
    return model


def _official_layout(timm_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's keys in the layout of microsoft/Swin-Transformer's releases: the patch merging
    closes stage i (``layers.i.downsample``) and the classifier is ``head``."""
    official = {}
    for key, value in timm_state.items():
        if key.startswith("layers.") and ".downsample." in key:
            stage = int(key.split(".")[1])
            key = key.replace(f"layers.{stage}.downsample.", f"layers.{stage - 1}.downsample.", 1)
        official[key.replace("head.fc.", "head.")] = value
    return official


def _assert_same_features(backbone: torch.nn.Module, reference: torch.nn.Module) -> None:
    images = torch.randn(1, 3, 448, 448)
    with torch.no_grad():
        stages = reference.forward_intermediates(images, intermediates_only=True)
        got = backbone(images)
    for i, (ours, theirs) in enumerate(zip(got, stages, strict=True)):
        # segscope normalizes each output map with its own LayerNorm (norm0..norm3).
        norm = getattr(backbone, f"norm{i}")
        expected = F.layer_norm(theirs.permute(0, 2, 3, 1), norm.normalized_shape, norm.weight, norm.bias)
        torch.testing.assert_close(ours, expected.permute(0, 3, 1, 2), atol=2e-5, rtol=1e-4)


def test_timm_swin_file_gives_timms_features(tmp_path: Path) -> None:
    reference = _timm_swin_t()
    path = tmp_path / "timm_swin_t.pth"
    torch.save(reference.state_dict(), path)
    backbone = build_backbone(SWIN_T).eval()
    left = load_backbone_weights(backbone, path)
    assert left == [f"norm{i}.{p}" for i in range(4) for p in ("bias", "weight")]
    _assert_same_features(backbone, reference)


def test_official_swin_release_gives_the_same_backbone(tmp_path: Path) -> None:
    reference = _timm_swin_t()
    official = _official_layout(reference.state_dict())
    # timm's own converter from the official layout gives back its weights: the layout is right.
    converted_by_timm = checkpoint_filter_fn({"model": official}, reference)
    assert converted_by_timm.keys() == reference.state_dict().keys()
    path = tmp_path / "swin_tiny_patch4_window7_224.pth"
    torch.save({"model": official}, path)
    backbone = build_backbone(SWIN_T).eval()
    load_backbone_weights(backbone, path)
    _assert_same_features(backbone, reference)


def test_relative_position_tables_are_resized_for_another_window(tmp_path: Path) -> None:
    reference = _timm_swin_t()
    path = tmp_path / "swin_window7.pth"
    torch.save({"model": _official_layout(reference.state_dict())}, path)
    backbone = build_backbone(SwinConfig(**{**SWIN_T.__dict__, "window_size": 12}))
    load_backbone_weights(backbone, path)
    table = backbone.state_dict()["layers.0.blocks.0.attn.relative_position_bias_table"]
    released = reference.state_dict()["layers.0.blocks.0.attn.relative_position_bias_table"]
    assert table.shape == (23 * 23, 3)
    assert torch.equal(table, resize_relative_position_table(released, 23 * 23))
    # Bicubic resizing reproduces a constant grid exactly.
    assert torch.allclose(resize_relative_position_table(torch.full((169, 2), 3.0), 529), torch.full((529, 2), 3.0))


def test_a_release_for_another_backbone_is_refused_naming_keys(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    expected = r"(?s)resnet18.pth \(ImageNet weights\) does not fit ResNet:.*shape mismatch keys \[23\]: layer1.0.conv1"
    with pytest.raises(CheckpointError, match=expected):
        load_backbone_weights(build_backbone(ResNetConfig(depth=50)), path)
    with pytest.raises(
        CheckpointError, match=r"(?s)does not fit Swin:.*missing keys.*unexpected keys \[\d+\]: conv1.weight"
    ):
        load_backbone_weights(build_backbone(SWIN_T), path)


def test_unknown_source_names_the_known_releases() -> None:
    with pytest.raises(InputNotFoundError, match="torchvision-resnet50"):
        load_backbone_weights(build_backbone(ResNetConfig(depth=50)), "resnet-50-please")


def _detectron2_pickle(path: Path, state: dict[str, torch.Tensor], author: str) -> None:
    """A model-zoo ``.pkl`` as detectron2's conversion scripts write it: numpy arrays."""
    model = {k: v.numpy() for k, v in state.items()}
    with path.open("wb") as file:
        pickle.dump({"model": model, "__author__": author, "matching_heuristics": True}, file)


def _torchvision_to_detectron2(key: str) -> str:
    """detectron2's ``convert-torchvision-to-d2.py`` renaming (Mask2Former's R-50.pkl)."""
    if "layer" not in key:
        key = "stem." + key
    for stage in (1, 2, 3, 4):
        key = key.replace(f"layer{stage}", f"res{stage + 1}")
    for conv in (1, 2, 3):
        key = key.replace(f"bn{conv}", f"conv{conv}.norm")
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def test_mask2former_torchvision_r50_pickle_loads_as_the_torchvision_file(tmp_path: Path) -> None:
    reference = torchvision.models.resnet50()
    _randomize(reference)
    path = tmp_path / "R-50.pkl"
    _detectron2_pickle(
        path, {_torchvision_to_detectron2(k): v for k, v in reference.state_dict().items()}, "torchvision"
    )
    assert "stem.fc.weight" in pickle.loads(path.read_bytes())["model"]  # the classifier, dropped

    backbone = build_backbone(ResNetConfig(depth=50))
    assert load_backbone_weights(backbone, path) == []
    expected = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    got = backbone.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], v) for k, v in expected.items())


def test_mask2former_swin_pickle_gives_timms_features(tmp_path: Path) -> None:
    reference = _timm_swin_t()
    path = tmp_path / "swin_tiny_patch4_window7_224.pkl"  # convert-pretrained-swin-model-to-d2.py
    _detectron2_pickle(path, _official_layout(reference.state_dict()), "third_party")
    backbone = build_backbone(SWIN_T).eval()
    load_backbone_weights(backbone, path)
    _assert_same_features(backbone, reference)


def test_detectron2_urls_resolve_to_detectrons_storage(monkeypatch: pytest.MonkeyPatch) -> None:
    fetched: list[str] = []
    monkeypatch.setattr(backbone_init.download, "fetch_url", lambda url, sha256=None: fetched.append(url) or Path())
    backbone_init.resolve_weights_file("detectron2://ImageNetPretrained/torchvision/R-50.pkl")
    assert fetched == ["https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/torchvision/R-50.pkl"]


# ---------------------------------------------------------------------------- BEiT releases


def _beit_release(tmp_path: Path, shared_table: bool) -> tuple[Path, torch.nn.Module]:
    """A timm BEiT at the release's 224 px (14x14 grid) saved in the official layout:
    ``{"model": ...}`` with the classifier, and (pretraining-only files) one shared table."""
    reference = timm.models.beit.Beit(
        img_size=224, patch_size=16, num_classes=5, embed_dim=32, depth=2, num_heads=2,
        use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1,
    ).eval()
    _randomize(reference)
    state = dict(reference.state_dict())
    if shared_table:
        state["rel_pos_bias.relative_position_bias_table"] = state.pop("blocks.0.attn.relative_position_bias_table")
        del state["blocks.1.attn.relative_position_bias_table"]
        state["mask_token"] = torch.zeros(1, 1, 32)
    path = tmp_path / "beit_release.pth"
    torch.save({"model": state}, path)
    return path, reference


def _adapter(grid: int, windows: tuple[int, ...] = ()):
    from segscope.config import BeitConfig, ViTAdapterConfig

    vit = BeitConfig(
        embed_dim=32, depth=2, num_heads=2, rel_pos_grid=grid, cls_token=not windows, window_sizes=windows,
        layer_scale_init=0.1,
    )
    return build_backbone(
        ViTAdapterConfig(
            vit=vit, conv_inplane=8, deform_num_heads=2, interaction_indexes=((0, 0), (1, 1)),
            vit_feature_per_interaction=False,
        )
    )


def test_beit_release_fills_the_transformer_with_timms_resized_tables(tmp_path: Path) -> None:
    path, reference = _beit_release(tmp_path, shared_table=False)
    backbone = _adapter(grid=6).eval()
    kept = load_backbone_weights(backbone, path)
    assert kept and all(not k.startswith("vit.") for k in kept)  # only the adapter starts fresh
    # At 96 px (a 6x6 grid) the transformer computes what timm's does with its own resizing.
    resized = timm.models.beit.Beit(
        img_size=96, patch_size=16, num_classes=5, embed_dim=32, depth=2, num_heads=2,
        use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1,
    ).eval()
    resized.load_state_dict(timm.models.beit.checkpoint_filter_fn(reference.state_dict(), resized))
    images = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        x = torch.cat((resized.cls_token, resized.patch_embed(images)), dim=1)
        for block in resized.blocks:
            x = block(x)
        assert (backbone.vit(images) - x).abs().max() <= 1e-4


def test_pretraining_release_shares_its_table_and_windowed_model_drops_class_rows(tmp_path: Path) -> None:
    path, reference = _beit_release(tmp_path, shared_table=True)
    backbone = _adapter(grid=14, windows=(7, 14))
    load_backbone_weights(backbone, path)
    shared = reference.state_dict()["blocks.0.attn.relative_position_bias_table"]
    # The 14-patch window keeps the shared table without its three class-token rows.
    torch.testing.assert_close(backbone.vit.blocks[1].attn.relative_position_bias_table, shared[:-3])
    assert backbone.vit.blocks[0].attn.relative_position_bias_table.shape == (13 * 13, 2)
    assert backbone.vit.cls_token is None


def test_non_beit_file_for_a_vit_adapter_is_named(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(CheckpointError, match="not a BEiT release"):
        load_backbone_weights(_adapter(grid=6), path)
