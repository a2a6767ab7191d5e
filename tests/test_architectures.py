"""The contract every registered architecture keeps (``segscope.registry``).

Each architecture's ``example_config`` goes through what the rest of segscope does with a
model: build, forward, save and load, the pipeline on every task it serves (and a clear error
for the others), one training step in the engine, and evaluation. A new architecture gets
these checks by registering; per-model tests are for what is particular to it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from segscope.checkpoints.segscope_format import ModelDescription, read_model, save_model
from segscope.config import PreprocessConfig
from segscope.data.categories import CategorySet
from segscope.data.synthetic import SYNTHETIC_CATEGORIES, write_synthetic_dataset
from segscope.engine.evaluate import evaluate
from segscope.engine.train_config import TINY_SYNTHETIC
from segscope.engine.trainer import Trainer
from segscope.errors import OptionError
from segscope.loading import load
from segscope.models import build_model
from segscope.models.backbones import Backbone
from segscope.pipeline import SegmentationPipeline
from segscope.registry import TASKS, architectures

ARCHITECTURES = sorted(architectures())
SYNTHETIC_THINGS = CategorySet(tuple(c for c in SYNTHETIC_CATEGORIES.categories if c.isthing))
PREPROCESS = PreprocessConfig(short_side=64, max_size=96)
# A figure each task's evaluation must report, as a path into its result.
_FIGURE = {"panoptic": ("All", "PQ"), "semantic": ("mIoU",), "instance": ("segm", "AP")}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("scenes"), num_train=4, num_val=2, image_size=(64, 80))


@pytest.fixture(scope="module", params=ARCHITECTURES)
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A randomly initialised example of the architecture, saved with the synthetic categories."""
    architecture = architectures()[request.param]
    # An instance-only architecture predicts the scenes' things (the instances JSON's categories).
    categories = SYNTHETIC_CATEGORIES if set(architecture.tasks) - {"instance"} else SYNTHETIC_THINGS
    config = architecture.example_config(len(categories))
    torch.manual_seed(0)
    model = build_model(config)
    path = tmp_path_factory.mktemp(request.param) / "model.safetensors"
    task = architecture.tasks[0]
    save_model(path, model.state_dict(), ModelDescription(config, categories, PREPROCESS, task))
    return request.param, path


def test_builds_with_its_config_and_a_backbone(saved: tuple[str, Path]) -> None:
    name, path = saved
    architecture = architectures()[name]
    config = architecture.example_config(3)
    model = build_model(config)
    assert model.config == config and isinstance(model.backbone, Backbone)
    assert config.num_classes == 3 and config.architecture == name


def test_saved_model_reads_back_as_the_same_architecture_and_outputs(saved: tuple[str, Path]) -> None:
    name, path = saved
    _, description = read_model(path)
    assert type(description.config) is architectures()[name].config_class
    first, second = load(path), load(path)
    images = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = first.module(images), second.module(images)
    flat_a, flat_b = _tensors(a), _tensors(b)
    assert flat_a and all(torch.equal(x, y) for x, y in zip(flat_a, flat_b))


@pytest.mark.parametrize("task", TASKS)
def test_pipeline_serves_its_tasks_and_names_the_others(saved: tuple[str, Path], task: str) -> None:
    name, path = saved
    loaded = load(path)
    if task not in architectures()[name].tasks:
        with pytest.raises(OptionError, match=f"not '{task}'"):
            SegmentationPipeline(loaded, task=task, device="cpu")
        return
    image = np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    result = SegmentationPipeline(loaded, task=task, device="cpu")(image)
    assert result.task == task
    assert result.masks.shape[1:] == (70, 90)
    assert len(result.labels) == len(result.masks) == len(result.scores)
    assert set(result.labels) <= set(SYNTHETIC_CATEGORIES.names)


# Semantic training needs a named category set for its label maps; the synthetic scenes' are
# carried by their JSON files, so the contract trains on those two.
@pytest.mark.parametrize("task", ["panoptic", "instance"])
def test_one_training_step_moves_the_weights(saved: tuple[str, Path], scenes: Path, tmp_path: Path, task: str) -> None:
    name, path = saved
    if task not in architectures()[name].tasks:
        pytest.skip(f"{name} does not serve {task}")
    _, description = read_model(path)
    config = replace(
        TINY_SYNTHETIC, model=description.config, batch_size=2, crop_size=64, preprocess=PREPROCESS, task=task
    )
    if task == "instance":  # the instances JSON lists the things only
        config = replace(config, model=replace(description.config, num_classes=len(SYNTHETIC_THINGS)))
    trainer = Trainer(config, scenes, tmp_path, device="cpu")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train(max_epochs=1)  # 4 images: 2 iterations
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert len(moved) > len(before) // 2, f"{name}: only {len(moved)} of {len(before)} tensors moved"


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_parameter_takes_part_in_the_loss(name: str) -> None:
    """DDP (no ``find_unused_parameters``) needs a gradient for every parameter at every step,
    also when a batch holds no object at all."""
    torch.manual_seed(0)
    model = build_model(architectures()[name].example_config(3)).train()
    masks = torch.zeros(1, 64, 64, dtype=torch.bool)
    masks[0, 8:40, 16:56] = True
    one = {"labels": torch.tensor([1]), "masks": masks, "boxes": torch.tensor([[16.0, 8.0, 56.0, 40.0]])}
    empty = {"labels": torch.zeros(0, dtype=torch.long), "masks": masks[:0], "boxes": torch.zeros(0, 4)}
    for targets in ([one, empty], [empty, empty]):
        model.zero_grad(set_to_none=True)
        torch.stack(list(model(torch.randn(2, 3, 64, 64), targets).values())).sum().backward()
        unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not unused, f"{name}: no gradient for {unused[:5]}"


def test_evaluation_of_each_task(saved: tuple[str, Path], scenes: Path) -> None:
    name, path = saved
    loaded = load(path)
    for task in architectures()[name].tasks:
        figure = evaluate(loaded, scenes, task, "val", device="cpu")
        for key in _FIGURE[task]:
            figure = figure[key]
        assert isinstance(figure, float) and (np.isnan(figure) or 0.0 <= figure <= 100.0), (task, figure)


def _tensors(outputs: object) -> list[torch.Tensor]:
    """Every tensor in a model's raw outputs (a tensor, a dataclass, a sequence or a dict)."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        return [t for value in outputs.values() for t in _tensors(value)]
    if isinstance(outputs, (list, tuple)):
        return [t for value in outputs for t in _tensors(value)]
    if hasattr(outputs, "__dataclass_fields__"):
        return [t for field in outputs.__dataclass_fields__ for t in _tensors(getattr(outputs, field))]
    return []
