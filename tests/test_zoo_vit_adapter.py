"""The two ViT-Adapter zoo entries: their cards' architecture facts, and loading their releases."""

from __future__ import annotations

import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from segscope import zoo
from segscope.checkpoints import download
from segscope.loading import load
from segscope.models import build_model
from segscope.pipeline import pipeline
from tests.checkpoints.mmlab_layouts import adapter_config, random_tensors, released_beit_adapter, released_head

SEMANTIC = "vitadapter-beit-l-cocostuff164k-semantic"
PANOPTIC = "vitadapter-beitv2-l-coco-panoptic"


def _parameters(name: str) -> int:
    with torch.device("meta"):
        model = build_model(zoo.ZOO[name].config)
    return sum(p.numel() for p in model.parameters())


def test_semantic_card_has_the_published_size_and_test_settings() -> None:
    # The ViT-Adapter project lists this model at 571M parameters.
    assert round(_parameters(SEMANTIC) / 1e6) == 571
    entry = zoo.ZOO[SEMANTIC]
    cfg, vit = entry.config, entry.config.backbone.vit
    assert (vit.embed_dim, vit.depth, vit.num_heads, vit.rel_pos_grid, vit.cls_token) == (1024, 24, 16, 56, True)
    assert cfg.backbone.interaction_indexes == ((0, 5), (6, 11), (12, 17), (18, 23))
    assert (cfg.backbone.deform_num_heads, cfg.backbone.deform_ratio, cfg.backbone.cffn_ratio) == (16, 0.5, 0.25)
    assert (cfg.pixel_decoder_dim, cfg.pixel_decoder_heads, cfg.pixel_decoder_ffn_dim) == (1024, 32, 4096)
    assert (cfg.num_queries, cfg.decoder_layers, cfg.num_classes) == (200, 9, 171)
    p = entry.preprocess
    assert (p.short_side, p.max_size, p.window, p.window_stride, p.resize_to_multiple) == (896, 3584, 896, 512, True)
    assert entry.default_task == "semantic" and entry.source.format == "mmseg0"


def test_panoptic_card_windows_and_head() -> None:
    entry = zoo.ZOO[PANOPTIC]
    cfg, vit = entry.config, entry.config.backbone.vit
    assert vit.window_sizes == (14, 14, 14, 14, 14, 56) * 4 and not vit.cls_token
    assert not cfg.backbone.vit_feature_per_interaction
    assert (cfg.hidden_dim, cfg.num_queries, cfg.pixel_decoder_ffn_dim, cfg.decoder_ffn_dim) == (256, 100, 1024, 2048)
    assert cfg.num_classes == 133 and entry.source.format == "mmdet2"
    assert (entry.preprocess.short_side, entry.preprocess.max_size) == (800, 1333)


def test_zipped_mmseg_release_loads_through_the_zoo_and_segments(tmp_path: Path, monkeypatch) -> None:
    """The release path end to end (download -> unzip -> convert -> strict load -> pipeline),
    with the entry reduced to a small model of the same layout."""
    small = replace(zoo.ZOO[SEMANTIC], config=replace(adapter_config(detection=False, table_grid=4), num_classes=171))
    monkeypatch.setitem(zoo.ZOO, SEMANTIC, small)
    shapes = released_beit_adapter(detection=False, pretrain_grid=6)
    shapes |= released_head("decode_head", mmcv2=False, in_channels=(32,) * 4)
    tensors = random_tensors(shapes)
    for key in ("decode_head.cls_embed.weight", "decode_head.cls_embed.bias"):
        tensors[key] = torch.randn(172, *tensors[key].shape[1:])
    checkpoint = tmp_path / "mask2former_beit_adapter_large_896_80k_cocostuff164k.pth"
    torch.save({"meta": {"CLASSES": ("person",)}, "state_dict": tensors}, checkpoint)
    archive = tmp_path / "release.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.write(checkpoint, "release/" + checkpoint.name)
    requested = []
    monkeypatch.setattr(download, "fetch_url", lambda url, **kw: requested.append(url) or archive)

    loaded = load(SEMANTIC)
    assert requested == [small.source.url]
    torch.testing.assert_close(loaded.module.backbone.level_embed, tensors["backbone.level_embed"])
    image = np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    segmenter = pipeline(model=loaded, device="cpu")
    result = segmenter(image)
    assert result.task == "semantic" and result.semantic_seg.shape == (70, 90)
    assert result.semantic_seg.max() < 171


def test_zoo_formats_are_known_to_the_converters() -> None:
    from segscope.registry import architecture_of

    for entry in zoo.ZOO.values():
        formats = architecture_of(entry.config).file_formats
        assert entry.source.format in formats or entry.source.format in ("hf", "segscope"), entry.name
    with pytest.raises(Exception, match="unknown checkpoint format"):
        from segscope.checkpoints.convert import converted_weights

        converted_weights("x.pth", "caffe", build_model(zoo.DEMO_CONFIG))
