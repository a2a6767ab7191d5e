"""segscope's own checkpoint: one ``.safetensors`` file that also says what it holds.

The safetensors header carries the architecture config, the categories and the test-time
preprocessing as JSON, so a file alone is enough to rebuild the model and name its outputs.
Trainer checkpoints (``epoch_N.pth``) carry the same fields as plain data next to the
weights and are read through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from segscope.checkpoints.safe_load import StateDict, extract_state_dict, read_torch_file
from segscope.config import PreprocessConfig, config_to_dict
from segscope.data.categories import Category, CategorySet
from segscope.errors import CheckpointError, InputNotFoundError
from segscope.fileio import atomic_path

FORMAT_NAME = "segscope"
FORMAT_VERSION = "1"


@dataclass(frozen=True)
class ModelDescription:
    """Everything but the weights: how to build the model and read its outputs.

    ``config`` is any registered architecture's config (``segscope.registry``).
    """

    config: Any
    categories: CategorySet
    preprocess: PreprocessConfig
    default_task: str = "panoptic"

    def to_metadata(self) -> dict[str, str]:
        """JSON strings for a safetensors header or a trainer checkpoint."""
        from segscope.registry import architecture_of

        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "architecture": architecture_of(self.config).name,
            "config": json.dumps(config_to_dict(self.config)),
            "categories": json.dumps(categories_to_list(self.categories)),
            "preprocess": json.dumps(config_to_dict(self.preprocess)),
            "default_task": self.default_task,
        }

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], source: str) -> ModelDescription:
        """Inverse of ``to_metadata``; raises ``CheckpointError`` naming the source."""
        if metadata.get("format") != FORMAT_NAME:
            raise CheckpointError(f"{source} is not a segscope checkpoint (no 'format: segscope' header)")
        from segscope.registry import get_architecture

        try:
            # Files written before the registry existed hold Mask2Former without saying so.
            architecture = get_architecture(metadata.get("architecture", "mask2former"))
            config = architecture.config_from_dict(json.loads(metadata["config"]))
            categories = categories_from_list(json.loads(metadata["categories"]))
            preprocess = PreprocessConfig(
                **{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(metadata["preprocess"]).items()}
            )
        except CheckpointError as error:
            raise CheckpointError(f"{source}: {error}") from error
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{source} has a malformed segscope header: {error}") from error
        if len(categories) != config.num_classes:
            raise CheckpointError(
                f"{source}: {len(categories)} categories but the model predicts {config.num_classes} classes"
            )
        return cls(config, categories, preprocess, metadata.get("default_task", "panoptic"))


def categories_to_list(categories: CategorySet) -> list[dict[str, Any]]:
    """Categories as JSON-ready records."""
    return [
        {"id": c.id, "name": c.name, "isthing": c.isthing, "color": list(c.color)} for c in categories.categories
    ]


def categories_from_list(records: list[dict[str, Any]]) -> CategorySet:
    """Inverse of ``categories_to_list``."""
    return CategorySet(
        tuple(Category(int(r["id"]), str(r["name"]), bool(r["isthing"]), tuple(r["color"])) for r in records)
    )


def save_model(path: str | Path, state_dict: StateDict, description: ModelDescription) -> Path:
    """Write weights and description to ``path`` (a ``.safetensors`` file), atomically."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=description.to_metadata())
    return path


def read_model(path: str | Path) -> tuple[StateDict, ModelDescription]:
    """Read a segscope ``.safetensors`` model or a trainer ``.pth`` checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                state_dict = {key: handle.get_tensor(key) for key in handle.keys()}
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"cannot read safetensors file {path} (truncated?): {error}") from error
        return state_dict, ModelDescription.from_metadata(metadata, str(path))
    payload = read_torch_file(path)
    if not isinstance(payload, dict) or "segscope" not in payload:
        raise CheckpointError(f"{path} is not a segscope checkpoint (no 'segscope' entry)")
    description = ModelDescription.from_metadata(payload["segscope"], str(path))
    return extract_state_dict(payload, path), description


def is_segscope_file(path: str | Path) -> bool:
    """Whether ``path`` is a safetensors file with a segscope header (cheap: reads the header)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("format") == FORMAT_NAME
    except (SafetensorError, OSError):
        return False


def trainer_payload(state_dict: StateDict, description: ModelDescription, **extra: Any) -> dict[str, Any]:
    """A dict for ``torch.save`` that ``read_model`` understands (trainer checkpoints)."""
    weights = {k: v.detach().cpu() for k, v in state_dict.items()}
    return {"model": weights, "segscope": description.to_metadata(), **extra}

