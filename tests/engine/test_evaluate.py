"""The evaluation runner feeds the metrics what the pipeline predicts, for every task."""

from __future__ import annotations

from pathlib import Path

import pytest

from segscope.data.synthetic import write_synthetic_dataset
from segscope.engine.evaluate import evaluate
from segscope.loading import load


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("scenes"), num_train=0, num_val=4, seed=21)


def test_model_with_other_categories_is_refused(tiny_checkpoint: Path, scenes: Path) -> None:
    with pytest.raises(ValueError, match="category ids"):
        evaluate(load(tiny_checkpoint), scenes, "panoptic", "val")


def test_every_task_produces_its_figures(scenes: Path) -> None:
    demo = load("demo")
    # The demo measured PQ 78, mIoU 96 and mask AP 45 on 64 scenes (README); 4 scenes vary more.
    panoptic = evaluate(demo, scenes, "panoptic", "val")
    assert set(panoptic) >= {"All", "Things", "Stuff", "per_class"} and panoptic["All"]["n"] == 6
    assert panoptic["All"]["PQ"] > 50
    semantic = evaluate(demo, scenes, "semantic", "val")
    assert semantic["mIoU"] > 80 and len(semantic["IoU"]) == 6
    instance = evaluate(demo, scenes, "instance", "val")
    assert set(instance) == {"bbox", "segm"} and instance["segm"]["AP"] > 20
    with pytest.raises(ValueError, match="unknown task"):
        evaluate(demo, scenes, "depth", "val")
