"""The evaluation runner feeds the metrics what the pipeline predicts, for every task."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segscope.data.synthetic import write_synthetic_dataset
from segscope.engine.evaluate import evaluate
from segscope.errors import AnnotationError
from segscope.loading import load
from segscope.pipeline import SegmentationPipeline


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("scenes"), num_train=0, num_val=4, seed=21)


def test_model_with_other_categories_is_refused(tiny_checkpoint: Path, scenes: Path) -> None:
    with pytest.raises(ValueError, match="category ids"):
        evaluate(load(tiny_checkpoint), scenes, "panoptic", "val")


def test_semantic_label_outside_the_classes_is_refused_naming_its_file(tmp_path: Path, monkeypatch) -> None:
    data = write_synthetic_dataset(tmp_path, num_train=0, num_val=2, seed=3, kinds=("semantic",))
    label_file = sorted((data / "semantic_val").iterdir())[0]
    labels = np.asarray(Image.open(label_file)).copy()
    labels[0, 0] = 40  # the demo knows 6 classes
    Image.fromarray(labels).save(label_file)
    segmented = []
    monkeypatch.setattr(SegmentationPipeline, "_run_batch", lambda self, images: segmented.append(1) or [])
    with pytest.raises(AnnotationError, match=rf"{label_file.name} holds label 40, outside 0\.\.5"):
        evaluate(load("demo"), data, "semantic", "val")
    assert segmented == []  # refused when the file is read, before its image is segmented


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
