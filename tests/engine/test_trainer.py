"""Training: the loss falls, checkpoints resume exactly, torchrun runs it on several processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from segscope.checkpoints.safe_load import read_weights
from segscope.config import ResNetConfig
from segscope.data.synthetic import write_synthetic_panoptic
from segscope.engine.checkpointing import epoch_path, latest_checkpoint
from segscope.engine.train_config import TINY_SYNTHETIC, TrainConfig, load_train_config
from segscope.engine.trainer import Trainer, initialise_from
from segscope.loading import load
from segscope.models import build_model

# The demo recipe, smaller: fewer queries and layers, 4 images a batch, no log throttling.
SMALL = replace(
    TINY_SYNTHETIC,
    model=replace(TINY_SYNTHETIC.model, num_queries=10, decoder_layers=2, pixel_decoder_layers=1),
    batch_size=4,
    log_interval=1,
)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_panoptic(tmp_path_factory.mktemp("shapes"), num_train=32, num_val=4, seed=3)


def _losses(work_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (work_dir / "log.jsonl").read_text().splitlines()]


def test_loss_falls_over_two_hundred_iterations(shapes: Path, tmp_path: Path) -> None:
    trainer = Trainer(SMALL, shapes, tmp_path, device="cpu")
    trainer.train(max_epochs=25)  # 32 images / 4 = 8 iterations an epoch
    losses = _losses(tmp_path)
    assert len(losses) == 200
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    print(f"mean loss, first 20 iterations {first:.2f}, last 20 {last:.2f}")
    assert last < 0.6 * first


def test_resume_after_interruption_gives_the_same_weights(
    shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight = Trainer(SMALL, shapes, tmp_path / "straight", device="cpu")
    straight.train(max_epochs=2)

    interrupted = Trainer(SMALL, shapes, tmp_path / "resumed", device="cpu")
    train_epoch = interrupted._train_epoch

    def crash_during_second_epoch(*args) -> None:
        if interrupted.epoch == 1:
            raise KeyboardInterrupt("simulated crash")
        train_epoch(*args)

    monkeypatch.setattr(interrupted, "_train_epoch", crash_during_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        interrupted.train(max_epochs=2)
    assert latest_checkpoint(tmp_path / "resumed") == epoch_path(tmp_path / "resumed", 1)
    # A new process: a fresh trainer that only has the work dir.
    resumed = Trainer(SMALL, shapes, tmp_path / "resumed", device="cpu")
    resumed.train(max_epochs=2, resume=True)
    assert resumed.iteration == straight.iteration == 16
    expected = read_weights(epoch_path(tmp_path / "straight", 2))
    got = read_weights(epoch_path(tmp_path / "resumed", 2))
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    # And the optimizer moved the weights: the comparison is not between two untouched models.
    first = read_weights(epoch_path(tmp_path / "resumed", 1))
    assert any(not torch.equal(first[k], got[k]) for k in got)


def test_each_epoch_leaves_a_checkpoint_that_is_a_model(shapes: Path, tmp_path: Path) -> None:
    Trainer(SMALL, shapes, tmp_path, device="cpu").train(max_epochs=2)
    assert latest_checkpoint(tmp_path) == epoch_path(tmp_path, 2)
    assert not list(tmp_path.glob("*.tmp"))
    loaded = load(epoch_path(tmp_path, 2))
    assert loaded.description.categories.names[:3] == ("circle", "square", "triangle")


def test_class_count_must_match_the_data(shapes: Path, tmp_path: Path) -> None:
    wrong = replace(SMALL, model=replace(SMALL.model, num_classes=133))
    with pytest.raises(ValueError, match="133 classes but .* has 6 categories"):
        Trainer(wrong, shapes, tmp_path, device="cpu")


def test_config_round_trips_through_json(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(SMALL.to_dict()))
    assert load_train_config(str(path)) == SMALL
    assert load_train_config("mask2former-tiny-synthetic", batch_size=2).batch_size == 2
    with pytest.raises(FileNotFoundError, match="neither a preset"):  # an InputNotFoundError
        load_train_config("nope.json")


def test_torchrun_trains_on_two_processes(shapes: Path, tmp_path: Path) -> None:
    config = tmp_path / "small.json"
    config.write_text(json.dumps(SMALL.to_dict()))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
        "-m", "segscope.cli", "train", "--config", str(config), "--data", str(shapes),
        "--work-dir", str(tmp_path / "ddp"), "--max-epochs", "1", "--device", "cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert process.returncode == 0, process.stderr[-3000:]
    # 32 images over 2 processes of 4 each: 4 iterations, logged by rank 0 only.
    assert len(_losses(tmp_path / "ddp")) == 4
    assert (tmp_path / "ddp" / "epoch_1.pth").is_file()


def test_trainer_config_is_typed() -> None:
    assert isinstance(TINY_SYNTHETIC, TrainConfig)


def test_fine_tuning_starts_from_the_given_weights(shapes: Path, tmp_path: Path) -> None:
    Trainer(SMALL, shapes, tmp_path / "first", device="cpu").train(max_epochs=1)
    source = epoch_path(tmp_path / "first", 1)
    # Another seed, so that only the copy can make the weights equal.
    trainer = Trainer(replace(SMALL, seed=5), shapes, tmp_path / "tuned", device="cpu", init_from=source)
    assert trainer.skipped_init_keys == []
    expected = read_weights(source)
    assert all(torch.equal(v, expected[k]) for k, v in trainer.model.state_dict().items())


def test_fine_tuning_to_other_classes_keeps_all_but_the_class_head(shapes: Path, tmp_path: Path) -> None:
    Trainer(SMALL, shapes, tmp_path, device="cpu").train(max_epochs=1)
    model = build_model(replace(SMALL.model, num_classes=3))
    skipped = initialise_from(model, epoch_path(tmp_path, 1))
    assert skipped and all(k.startswith("transformer_decoder.class_head.") for k in skipped)


def test_fine_tuning_refuses_another_architecture(shapes: Path, tiny_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="same architecture"):
        initialise_from(build_model(SMALL.model), tiny_checkpoint)


def _batchnorm_keys(trainer: Trainer) -> list[str]:
    norms = [n for n, m in trainer.model.backbone.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    return [k for k in trainer.model.state_dict() if any(k.startswith(f"backbone.{n}.") for n in norms)]


def test_imagenet_backbone_is_loaded_and_its_batchnorm_frozen_while_the_rest_trains(
    shapes: Path, tmp_path: Path
) -> None:
    import torchvision

    release = torchvision.models.resnet18()
    with torch.no_grad():
        for name, tensor in release.state_dict().items():
            if "running_var" in name:
                tensor.uniform_(0.5, 1.5)
    torch.save(release.state_dict(), tmp_path / "resnet18-f37072fd.pth")
    config = replace(
        SMALL,
        model=replace(SMALL.model, backbone=ResNetConfig(depth=18)),
        backbone_init=str(tmp_path / "resnet18-f37072fd.pth"),
    )
    trainer = Trainer(config, shapes, tmp_path / "run", device="cpu")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    # The backbone starts as the release, tensor for tensor.
    released = release.state_dict()
    assert trainer.skipped_init_keys == []
    assert all(torch.equal(before[f"backbone.{k}"], v) for k, v in released.items() if not k.startswith("fc."))
    trainer.train(max_epochs=1)
    after = trainer.model.state_dict()
    frozen = _batchnorm_keys(trainer)
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["backbone.conv1.weight"], after["backbone.conv1.weight"])


def test_a_random_backbone_keeps_its_batchnorm_training(shapes: Path, tmp_path: Path) -> None:
    config = replace(SMALL, model=replace(SMALL.model, backbone=ResNetConfig(depth=18)))
    trainer = Trainer(config, shapes, tmp_path, device="cpu")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train(max_epochs=1)
    after = trainer.model.state_dict()
    running = [k for k in _batchnorm_keys(trainer) if k.endswith("running_mean")]
    assert running and all(not torch.equal(before[k], after[k]) for k in running)
    # Asked for explicitly, freezing still applies to a random backbone.
    frozen = Trainer(replace(config, freeze_backbone_batchnorm=True), shapes, tmp_path / "f", device="cpu")
    assert frozen._frozen_norms


def test_the_r50_preset_starts_from_torchvisions_imagenet_weights() -> None:
    from segscope.checkpoints.backbone_init import IMAGENET_WEIGHTS
    from segscope.engine.train_config import R50_COCO_PANOPTIC

    assert R50_COCO_PANOPTIC.backbone_init == "torchvision-resnet50"
    assert IMAGENET_WEIGHTS["torchvision-resnet50"][0].endswith("/resnet50-0676ba61.pth")


def test_training_config_values_are_checked(tmp_path: Path) -> None:
    from segscope.errors import ConfigError

    path = tmp_path / "config.json"
    path.write_text(json.dumps({**SMALL.to_dict(), "batch_size": -4}))
    with pytest.raises(ConfigError, match=r"batch_size must be an integer in \[1, 65536\], got -4"):
        load_train_config(str(path))
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="malformed training config"):
        load_train_config(str(path))


def test_trainer_is_importable_from_segscope_as_the_readme_shows() -> None:
    import segscope

    assert segscope.Trainer is Trainer and segscope.TrainConfig is TrainConfig


def test_backbone_init_flag_reaches_the_trainer(shapes: Path, tmp_path: Path, capsys) -> None:
    import torchvision

    from segscope.cli import main

    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    config = tmp_path / "small.json"
    config.write_text(json.dumps(SMALL.to_dict()))  # a Swin backbone: ResNet weights do not fit
    args = ["train", "-c", str(config), "-d", str(shapes), "-w", str(tmp_path / "run"), "--max-epochs", "1"]
    assert main([*args, "--device", "cpu", "--backbone-init", str(tmp_path / "r18.pth")]) == 2
    assert "(ImageNet weights) does not fit Swin" in capsys.readouterr().err


def test_train_demo_script_does_not_overwrite_the_shipped_weights(tmp_path: Path, monkeypatch) -> None:
    import importlib.util

    script = Path(__file__).resolve().parents[2] / "scripts" / "train_demo.py"
    spec = importlib.util.spec_from_file_location("train_demo", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    exported: list[Path] = []

    class FakeTrainer:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def train(self, max_epochs: int, resume: bool) -> Path:
            return tmp_path / "epoch_1.pth"

        def evaluate(self, checkpoint: Path, split: str) -> dict:
            return {group: {} for group in ("All", "Things", "Stuff")}

    monkeypatch.setattr(module, "Trainer", FakeTrainer)
    monkeypatch.setattr(module, "write_synthetic_panoptic", lambda root, **kwargs: root)
    monkeypatch.setattr(module, "read_model", lambda path: ({}, None))
    monkeypatch.setattr(module, "save_model", lambda path, state, description: exported.append(Path(path)))
    monkeypatch.setattr(sys, "argv", ["train_demo.py", "--work-dir", str(tmp_path / "demo")])
    module.main()
    assert exported == [tmp_path / "demo" / "demo.safetensors"]


def test_only_the_main_process_downloads_the_backbone_release(
    shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from segscope.engine import distributed, trainer

    events: list[str] = []
    monkeypatch.setattr(trainer, "resolve_weights_file", lambda source: events.append("fetch"))
    monkeypatch.setattr(trainer, "load_backbone_weights", lambda backbone, source: events.append("load") or [])
    monkeypatch.setattr(distributed, "barrier", lambda context: events.append(f"barrier {context.rank}"))
    config = replace(SMALL, backbone_init="https://example.invalid/swin.pth")
    for rank in (0, 1):
        context = distributed.DistributedContext(rank, 2, rank, torch.device("cpu"))
        monkeypatch.setattr(distributed, "setup", lambda device, context=context: context)
        Trainer(config, shapes, tmp_path / str(rank), device="cpu")
    assert events == ["fetch", "barrier 0", "load", "barrier 1", "load"]


def test_a_training_config_written_before_backbone_init_loads_unchanged(tmp_path: Path) -> None:
    earlier = SMALL.to_dict()
    del earlier["backbone_init"]
    earlier["freeze_backbone_batchnorm"] = True  # the old default, written out by to_dict
    path = tmp_path / "old.json"
    path.write_text(json.dumps(earlier))
    config = load_train_config(str(path))
    assert config.backbone_init is None and config.freeze_backbone_batchnorm is True
