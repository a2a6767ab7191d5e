"""One loaded model, and a pipeline for each (task, threshold) that requests ask for."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from segscope.loading import LoadedModel
from segscope.pipeline import SegmentationPipeline
from segscope.registry import architecture_of
from segscope.results import SegmentationResult


class Segmenters:
    """Pipelines over one model, built on first use and kept (the newest ``cache_size``).

    Args:
        model: the loaded model; every pipeline shares its module.
        task: the task of requests that name none (None: the model's own).
        device: where the model runs (None: CUDA when available).
        batch_size: the server's batch size, so that one batch is one forward pass.

    Raises (from ``get``, and from the constructor for ``task`` / ``device``):
        OptionError: an unknown task, one the model does not serve, a bad threshold, an absent device.
    """

    def __init__(
        self, model: LoadedModel, task: str | None, device: str | None, batch_size: int, cache_size: int = 32
    ) -> None:
        self.model = model
        self.device = device
        self.batch_size = batch_size
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str | None, float | None], SegmentationPipeline] = OrderedDict()
        self._lock = threading.Lock()
        self._default_task = task or model.description.default_task
        self.default = self.get(None, None)

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks the model's architecture serves."""
        return tuple(architecture_of(self.model.description.config).tasks)

    def cached(self, task: str | None, threshold: float | None) -> SegmentationPipeline | None:
        """The pipeline for these settings if it is built, else None."""
        key = (task or self._default_task, threshold)
        with self._lock:
            segmenter = self._cache.get(key)
            if segmenter is not None:
                self._cache.move_to_end(key)
            return segmenter

    def get(self, task: str | None, threshold: float | None) -> SegmentationPipeline:
        """The pipeline for ``task`` (None: the server's default) and ``threshold`` (None: the task's).

        Building one moves the shared module to the device: call it where no batch runs meanwhile
        (the batch worker's thread).
        """
        segmenter = self.cached(task, threshold)
        if segmenter is not None:
            return segmenter
        task = task or self._default_task
        key = (task, threshold)
        segmenter = SegmentationPipeline(
            self.model, task=task, device=self.device, batch_size=self.batch_size, threshold=threshold
        )
        with self._lock:
            self._cache[key] = segmenter
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return segmenter

    def model_info(self) -> dict[str, Any]:
        """What ``GET /v1/models`` says of the model: name, tasks, default task and classes."""
        description = self.model.description
        return {
            "name": self.model.name,
            "architecture": architecture_of(description.config).name,
            "default_task": self.default.task,
            "tasks": list(self.tasks),
            "classes": [
                {"index": index, "id": c.id, "name": c.name, "isthing": c.isthing, "color": list(c.color)}
                for index, c in enumerate(description.categories.categories)
            ],
        }


def run_batch(segmenter: SegmentationPipeline, images: Sequence[np.ndarray]) -> list[SegmentationResult]:
    """Segment decoded ``images`` with ``segmenter`` as one batch (the batcher's batch function)."""
    return segmenter(list(images))
