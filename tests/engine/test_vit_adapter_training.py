"""ViT-Adapter training: BEiT's layer-wise lr decay, the cards' presets, and the tiny recipe learns."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from segscope.data.synthetic import write_synthetic_panoptic
from segscope.engine.optim import build_optimizer
from segscope.engine.train_config import TRAIN_CONFIGS, SolverConfig
from segscope.engine.trainer import Trainer
from segscope.models import build_model


def _lr_by_name(model: torch.nn.Module, solver: SolverConfig) -> dict[str, float]:
    optimizer = build_optimizer(model, solver)
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: group["lr"] for group in optimizer.param_groups for p in group["params"]}


def test_panoptic_preset_decays_the_24_blocks_as_beits_rule() -> None:
    """BEiT's ``LayerDecayOptimizerConstructor``: with L = 24 blocks, block i trains at
    0.9 ** (24 - i), the patch embedding at 0.9 ** 25, everything else at the base rate."""
    preset = TRAIN_CONFIGS["vitadapter-beitv2-l-coco-panoptic"]
    with torch.device("meta"):
        model = build_model(preset.model)
    lr = _lr_by_name(model, preset.solver)
    base = preset.solver.lr
    assert lr["backbone.vit.patch_embed.proj.weight"] == pytest.approx(base * 0.9**25)
    assert lr["backbone.vit.blocks.0.attn.qkv.weight"] == pytest.approx(base * 0.9**24)
    assert lr["backbone.vit.blocks.23.mlp.fc2.bias"] == pytest.approx(base * 0.9)
    full_rate = (
        "backbone.spm.fc1.weight",
        "backbone.interactions.3.injector.gamma",
        "transformer_decoder.query_feat.weight",
    )
    for name in full_rate:
        assert lr[name] == pytest.approx(base)
    # The segmentation recipe's variant also sinks the decoder's embeddings and heads.
    sunk = _lr_by_name(model, replace(preset.solver, layer_decay_head_embeddings=True))
    assert sunk["transformer_decoder.query_feat.weight"] == pytest.approx(base * 0.9**25)
    assert sunk["transformer_decoder.class_head.weight"] == pytest.approx(base * 0.9**25)
    assert sunk["pixel_decoder.level_embed"] == pytest.approx(base)


def test_no_decay_leaves_every_rate_alone() -> None:
    preset = TRAIN_CONFIGS["vitadapter-tiny-synthetic"]
    model = build_model(preset.model)
    solver = replace(preset.solver, layer_decay=1.0)
    assert set(_lr_by_name(model, solver).values()) == {solver.lr}


def test_tiny_vit_adapter_loss_falls_on_synthetic_shapes(tmp_path: Path) -> None:
    data = write_synthetic_panoptic(tmp_path / "shapes", num_train=16, num_val=2, seed=5)
    preset = TRAIN_CONFIGS["vitadapter-tiny-synthetic"]
    config = replace(
        preset,
        model=replace(preset.model, num_queries=10, decoder_layers=2, pixel_decoder_layers=1),
        batch_size=4,
        log_interval=1,
    )
    trainer = Trainer(config, data, tmp_path / "work", device="cpu")
    trainer.train(max_epochs=25)  # 4 iterations an epoch
    losses = [json.loads(line)["loss"] for line in (tmp_path / "work" / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 100
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    print(f"mean loss, first 10 iterations {first:.2f}, last 10 {last:.2f}")
    assert last < 0.75 * first


def test_coco_stuff_preset_is_the_cards_recipe() -> None:
    preset = TRAIN_CONFIGS["vitadapter-beit-l-cocostuff164k-semantic"]
    assert (preset.task, preset.categories, preset.crop_size) == ("semantic", "coco_stuff", 896)
    assert (preset.solver.lr, preset.solver.warmup_iters, preset.solver.poly_power) == (2e-5, 1500, 1.0)
    assert preset.solver.clip_grad_norm == 0.0 and preset.freeze_backbone_batchnorm is False
    with torch.device("meta"):
        model = build_model(preset.model)
    lr = _lr_by_name(model, preset.solver)
    assert lr["transformer_decoder.query_feat.weight"] == pytest.approx(2e-5 * 0.9**25)
    assert lr["backbone.vit.blocks.12.attn.proj.weight"] == pytest.approx(2e-5 * 0.9**12)


def test_zero_clip_norm_means_no_clipping(tmp_path: Path) -> None:
    """mmseg's recipes do not clip; a clip norm of 0 must not zero the gradients."""
    data = write_synthetic_panoptic(tmp_path / "shapes", num_train=4, num_val=1, seed=1)
    preset = TRAIN_CONFIGS["vitadapter-tiny-synthetic"]
    config = replace(
        preset,
        model=replace(preset.model, num_queries=5, decoder_layers=1, pixel_decoder_layers=1),
        solver=replace(preset.solver, clip_grad_norm=0.0, warmup_iters=0, weight_decay=0.0),  # only gradients move
        batch_size=4,
    )
    trainer = Trainer(config, data, tmp_path / "work", device="cpu")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train(max_epochs=1)
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert len(moved) > len(before) // 2
