"""Semantic training (COCO-Stuff style label maps) in the panoptic engine: loss, resume, mIoU, config checks."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segscope.checkpoints.safe_load import read_weights
from segscope.cli import main
from segscope.data.categories import COCO_STUFF
from segscope.data.synthetic import write_synthetic_semantic
from segscope.engine.checkpointing import epoch_path
from segscope.engine.train_config import TINY_SYNTHETIC, load_train_config
from segscope.engine.trainer import Trainer, task_dataset
from segscope.errors import ConfigError
from segscope.loading import load
from segscope.zoo import DEMO_CONFIG

# Label PNGs carry no names, so a semantic run names a category set; the synthetic labels
# 0..5 (and 255 for VOID) are read as the first six of COCO-Stuff's 171 classes. The demo
# model, smaller as in test_trainer, on 64-pixel crops of 64x64 scenes, 4 images a batch.
SEMANTIC = replace(
    TINY_SYNTHETIC,
    model=replace(DEMO_CONFIG, num_classes=len(COCO_STUFF), num_queries=10, decoder_layers=2, pixel_decoder_layers=1),
    task="semantic",
    categories="coco_stuff",
    crop_size=64,
    batch_size=4,
    log_interval=1,
)
EPOCHS = 12  # 16 images / 4 = 4 iterations an epoch


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    """A trainer after ``EPOCHS`` epochs on 16 synthetic training scenes (4 for validation)."""
    data = write_synthetic_semantic(tmp_path_factory.mktemp("stuff"), num_train=16, num_val=4, image_size=(64, 64))
    labels = np.asarray(Image.open(data / "semantic_train" / "000000000001.png"))
    assert (labels == 255).any()  # the data has ignore pixels
    trainer = Trainer(SEMANTIC, data, tmp_path_factory.mktemp("run"), device="cpu")
    trainer.train(max_epochs=EPOCHS)
    return trainer


def _losses(work_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (work_dir / "log.jsonl").read_text().splitlines()]


def test_semantic_training_loss_falls(trained: Trainer) -> None:
    losses = _losses(trained.work_dir)
    assert len(losses) == 4 * EPOCHS
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    print(f"mean loss, first 8 iterations {first:.2f}, last 8 {last:.2f}")
    assert last < 0.85 * first


def test_semantic_checkpoint_resumes_exactly_and_reads_back_as_a_semantic_model(
    trained: Trainer, tmp_path: Path
) -> None:
    shutil.copy(epoch_path(trained.work_dir, EPOCHS - 1), epoch_path(tmp_path, EPOCHS - 1))
    resumed = Trainer(SEMANTIC, trained.data_root, tmp_path, device="cpu")
    resumed.train(max_epochs=EPOCHS, resume=True)
    assert resumed.iteration == trained.iteration == 4 * EPOCHS
    assert len(_losses(tmp_path)) == 4  # only the last epoch ran again
    expected, got = read_weights(epoch_path(trained.work_dir, EPOCHS)), read_weights(epoch_path(tmp_path, EPOCHS))
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    loaded = load(epoch_path(tmp_path, EPOCHS))
    assert loaded.description.default_task == "semantic"
    assert loaded.description.categories == COCO_STUFF


def test_evaluating_a_semantic_run_reports_miou(trained: Trainer) -> None:
    results = trained.evaluate(epoch_path(trained.work_dir, EPOCHS))
    assert {"mIoU", "mAcc", "aAcc", "IoU"} <= results.keys() and "PQ" not in results
    assert len(results["IoU"]) == len(COCO_STUFF) and 0 <= results["mIoU"] <= 100
    assert json.loads((trained.work_dir / "eval_val.json").read_text())["mIoU"] == results["mIoU"]


def test_train_command_with_a_semantic_config_evaluates_miou(trained: Trainer, tmp_path: Path) -> None:
    config = tmp_path / "semantic.json"
    config.write_text(json.dumps(SEMANTIC.to_dict()))
    assert load_train_config(str(config)) == SEMANTIC
    work_dir = tmp_path / "run"
    args = ["train", "-c", str(config), "-d", str(trained.data_root), "-w", str(work_dir), "--max-epochs", "1"]
    assert main([*args, "--device", "cpu", "--eval"]) == 0
    results = json.loads((work_dir / "eval_val.json").read_text())
    assert "mIoU" in results and "PQ" not in results


def test_the_mmseg_coco_stuff_layout_is_read_with_its_label_suffix(tmp_path: Path) -> None:
    labels = np.full((6, 8), 170, dtype=np.uint8)
    labels[0] = 255
    for folder in ("images/train2017", "annotations/train2017"):
        (tmp_path / folder).mkdir(parents=True)
    Image.fromarray(np.zeros((6, 8, 3), dtype=np.uint8)).save(tmp_path / "images/train2017/000000000009.jpg")
    Image.fromarray(labels).save(tmp_path / "annotations/train2017/000000000009_labelTrainIds.png")
    config = replace(
        SEMANTIC,
        semantic_image_dir="images/{split}",
        semantic_label_dir="annotations/{split}",
        semantic_label_suffix="_labelTrainIds",
    )
    dataset, categories = task_dataset(config, tmp_path, "train2017")
    assert categories == COCO_STUFF
    assert len(dataset) == 1 and np.array_equal(dataset[0]["sem_seg"], labels)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"categories": None}, r"TrainConfig\.categories must name the category set .* for task 'semantic'"),
        (
            {"model": DEMO_CONFIG},
            r"TrainConfig\.categories 'coco_stuff' has 171 categories but the model predicts 6 classes",
        ),
        ({"categories": "ade20k"}, r"TrainConfig\.categories: unknown category set 'ade20k'"),
        ({"task": "panoptic"}, r"TrainConfig\.categories \('coco_stuff'\) is for task 'semantic'"),
        ({"task": "depth"}, r"TrainConfig\.task must be 'panoptic', 'semantic' or 'instance', got 'depth'"),
        ({"semantic_label_suffix": None}, r"TrainConfig\.semantic_label_suffix must be a string"),
    ],
)
def test_bad_semantic_configs_are_refused(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        replace(SEMANTIC, **changes)
