"""What users of detectron2 and mmdetection expect around the training loop: command-line
overrides, TensorBoard, evaluation every N epochs keeping the best checkpoint, keep-last-N."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from segscope.cli import main
from segscope.data.synthetic import write_synthetic_panoptic
from segscope.engine.checkpointing import prune_checkpoints
from segscope.engine.train_config import TINY_SYNTHETIC, apply_overrides
from segscope.engine.trainer import Trainer
from segscope.errors import ConfigError

SMALL = replace(
    TINY_SYNTHETIC,
    model=replace(TINY_SYNTHETIC.model, num_queries=5, decoder_layers=1, pixel_decoder_layers=1),
    batch_size=4,
    crop_size=64,
    log_interval=1,
)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_panoptic(tmp_path_factory.mktemp("shapes"), num_train=4, num_val=2, image_size=(64, 64))


def test_overrides_reach_nested_fields_and_are_checked() -> None:
    config = apply_overrides(
        SMALL,
        ["solver.lr=2e-4", "model.backbone.drop_path_rate=0.2", "solver.step_milestones=[0.5, 0.8]", "name=my-run"],
    )
    assert (config.solver.lr, config.model.backbone.drop_path_rate) == (2e-4, 0.2)
    assert config.solver.step_milestones == (0.5, 0.8) and config.name == "my-run"
    assert SMALL.solver.lr != 2e-4  # the preset itself is untouched
    with pytest.raises(ConfigError, match="SolverConfig has no field 'lrr'; it has \\['lr'"):
        apply_overrides(SMALL, ["solver.lrr=1"])
    with pytest.raises(ConfigError, match="TrainConfig.crop_size must be an integer"):
        apply_overrides(SMALL, ["crop_size=-1"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(SMALL, ["crop_size"])
    with pytest.raises(ConfigError, match="has no fields"):
        apply_overrides(SMALL, ["crop_size.x=1"])


def test_keep_last_n_never_touches_other_files(tmp_path: Path) -> None:
    for epoch in (1, 2, 3, 10):
        (tmp_path / f"epoch_{epoch}.pth").write_bytes(b"x")
    (tmp_path / "best.pth").write_bytes(b"x")
    removed = prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["epoch_1.pth", "epoch_2.pth"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pth", "epoch_10.pth", "epoch_3.pth"]
    assert prune_checkpoints(tmp_path, keep=0) == []


def test_best_checkpoint_follows_the_best_figure(shapes: Path, tmp_path: Path, monkeypatch) -> None:
    config = replace(SMALL, eval_interval=1, tensorboard=False)
    trainer = Trainer(config, shapes, tmp_path, device="cpu")
    figures = iter([10.0, 5.0, 20.0])
    monkeypatch.setattr(trainer, "evaluate", lambda: {"All": {"PQ": next(figures)}})
    bests = []

    original = trainer._evaluate_and_keep_best

    def record(checkpoint: Path) -> None:
        original(checkpoint)
        bests.append(json.loads((tmp_path / "best.json").read_text())["epoch"])

    monkeypatch.setattr(trainer, "_evaluate_and_keep_best", record)
    trainer.train(max_epochs=3)
    assert bests == [1, 1, 3]  # epoch 2 scored worse and did not replace epoch 1
    best = torch.load(tmp_path / "best.pth", weights_only=True)
    assert best["epoch"] == 3


def test_train_command_overrides_evaluates_keeps_and_logs(shapes: Path, tmp_path: Path) -> None:
    work = tmp_path / "run"
    args = ["train", "-c", "mask2former-tiny-synthetic", "-d", str(shapes), "-w", str(work), "--max-epochs", "3"]
    args += ["--set", "crop_size=64", "--set", "batch_size=4", "--set", "model.num_queries=5"]
    args += ["--set", "eval_interval=2", "--set", "keep_checkpoints=2", "--set", "log_interval=1"]
    assert main(args) == 0
    assert sorted(p.name for p in work.glob("epoch_*.pth")) == ["epoch_2.pth", "epoch_3.pth"]
    best = json.loads((work / "best.json").read_text())
    assert best["metric"] == "All_PQ" and best["epoch"] in (2, 3) and (work / "best.pth").is_file()
    records = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "All_PQ" in r] == [2, 3]  # every 2 epochs and after the last
    assert list((work / "tensorboard").glob("events.out.tfevents.*"))
    assert main([*args[:-2], "--set", "no_such_field=1"]) == 2


def test_copy_paste_training_is_seeded_and_pastes_things(shapes: Path, tmp_path: Path) -> None:
    config = replace(SMALL, copy_paste=1.0, tensorboard=False)
    first = Trainer(config, shapes, tmp_path / "a", device="cpu")
    samples = [first.samples[i] for i in range(4)]
    plain = Trainer(replace(config, copy_paste=0.0), shapes, tmp_path / "b", device="cpu")
    # Pasting adds objects (things only) to at least one of the four images.
    assert sum(len(s.labels) for s in samples) > sum(len(plain.samples[i].labels) for i in range(4))
    stuff = torch.tensor([not c.isthing for c in first.train_set.categories.categories])
    for pasted, original in zip(samples, (plain.samples[i] for i in range(4))):
        # Stuff is never pasted: its segments can only be covered, never added.
        assert stuff[pasted.labels].sum() <= stuff[original.labels].sum()
    again = Trainer(config, shapes, tmp_path / "c", device="cpu")
    assert all(torch.equal(s.image, again.samples[i].image) for i, s in enumerate(samples))
    first.train(max_epochs=1)
