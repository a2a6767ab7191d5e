"""Fixtures of the data tests: a small synthetic data set in COCO layout, written once."""

from __future__ import annotations

from pathlib import Path

import pytest

from segscope.data.synthetic import write_synthetic_dataset


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Panoptic, instance and semantic annotations of 12 train and 2 val 64x64 scenes.

    With seed 0, train image 9 holds a crowd, so all three COCO mask encodings occur.
    """
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), 12, 2, (64, 64), seed=0)
