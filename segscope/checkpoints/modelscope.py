"""ModelScope model folders -> a state dict (the Cascade Mask R-CNN card's own release).

A ModelScope model is a folder holding ``configuration.json``, whose ``model.type`` names the
network class it was saved from, and the weights in ``pytorch_model.pt``: an mmcv checkpoint
whose ``state_dict`` keeps mmdetection 2.x module names (the card's ``cascade_mask_rcnn_swin``
wraps mmdetection's FPN, RPNHead and CascadeRoIHead around the Swin project's backbone), so its
weights convert as the Swin project's mmdetection 2.x release does. Read without running pickled
code (``mmlab.read_mmlab_checkpoint``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from segscope.checkpoints.mmlab import read_mmlab_checkpoint
from segscope.checkpoints.safe_load import StateDict
from segscope.errors import CheckpointError

# The file names ModelScope gives every PyTorch model (its ModelFile constants).
WEIGHTS_FILE = "pytorch_model.pt"
CONFIG_FILE = "configuration.json"


def modelscope_reader(model_type: str) -> Callable[[Path], StateDict]:
    """A reader of ModelScope folders (or their ``pytorch_model.pt``) saved from ``model_type``.

    A folder whose ``configuration.json`` names another model type is refused before its
    weights are read, so that a mix-up reads as such rather than as hundreds of missing keys.
    """

    def read(path: Path) -> StateDict:
        folder, weights = (path, path / WEIGHTS_FILE) if path.is_dir() else (path.parent, path)
        if not weights.is_file():
            raise CheckpointError(f"{path} is not a ModelScope model: {weights.name} not found")
        found = _model_type(folder / CONFIG_FILE)
        if found is not None and found != model_type:
            raise CheckpointError(
                f"{folder / CONFIG_FILE} describes a {found!r} model; this architecture reads {model_type!r}"
            )
        return read_mmlab_checkpoint(weights)

    return read


def _model_type(config_path: Path) -> str | None:
    """``model.type`` of a ModelScope ``configuration.json``; None when the file or the field is absent."""
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{config_path} is not valid JSON: {error}") from None
    model = config.get("model") if isinstance(config, dict) else None
    found = model.get("type") if isinstance(model, dict) else None
    return found if isinstance(found, str) else None
