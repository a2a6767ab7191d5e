"""Turning whatever a user passes as ``model=`` into a ready model with its description.

Accepted: a zoo name, a segscope checkpoint (``.safetensors`` with a segscope header or a
trainer ``.pth``), a local transformers Mask2Former directory, a Hugging Face Hub id, or a
URL to a segscope checkpoint.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from torch import nn

from segscope.checkpoints import download
from segscope.checkpoints.convert import converted_weights
from segscope.checkpoints.safe_load import StateDict, load_state_dict_strict, read_weights
from segscope.checkpoints.segscope_format import ModelDescription, is_segscope_file, read_model
from segscope.config import PreprocessConfig
from segscope.data.categories import COCO_PANOPTIC, CategorySet, get_category_set
from segscope.errors import CheckpointError, InputNotFoundError
from segscope.models import build_model
from segscope.net import is_url
from segscope.zoo import ZooEntry, get_entry, list_models

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    """A model in eval mode and the description needed to feed it and read its outputs."""

    module: nn.Module
    description: ModelDescription
    name: str


def load(model: str | os.PathLike[str]) -> LoadedModel:
    """Resolve ``model`` (see module docstring), build the network and load its weights."""
    spec = os.fspath(model)
    entry = get_entry(spec)
    if entry is not None and entry.source.format not in ("hf", "segscope"):
        # A foreign release: its converter needs the model it converts for.
        description = _zoo_description(entry)
        module = build_model(description.config)
        path = download.fetch_url(entry.source.url, sha256=entry.source.sha256)
        converted_weights(path, entry.source.format, module)
        return LoadedModel(module.eval(), description, entry.name)
    state_dict, description, name = _resolve(spec)
    module = build_model(description.config)
    load_state_dict_strict(module, state_dict, name)
    return LoadedModel(module.eval(), description, name)


def describe(model: str | os.PathLike[str]) -> ModelDescription:
    """What ``model`` (a zoo name or a segscope checkpoint) is, without its weights."""
    spec = os.fspath(model)
    entry = get_entry(spec)
    if entry is not None:
        return _zoo_description(entry)
    path = Path(spec).expanduser()
    if path.is_file() and (path.suffix != ".safetensors" or is_segscope_file(path)):
        return read_model(path)[1]
    raise CheckpointError(
        f"{spec!r} is neither a zoo model ({', '.join(list_models())}) nor a segscope checkpoint"
    )


def _zoo_description(entry: ZooEntry) -> ModelDescription:
    if entry.source.format == "segscope":  # a packaged model describes itself
        return _load_zoo_entry(entry)[1]
    return ModelDescription(entry.config, get_category_set(entry.categories), entry.preprocess, entry.default_task)


def _resolve(spec: str) -> tuple[StateDict, ModelDescription, str]:
    entry = get_entry(spec)
    if entry is not None:
        return *_load_zoo_entry(entry), entry.name
    path = Path(spec).expanduser()
    if path.is_dir():
        return *read_hf_directory(path), spec
    if path.is_file():
        if path.suffix == ".safetensors" and not is_segscope_file(path):
            raise CheckpointError(
                f"{path} is a safetensors file without a segscope header; for a transformers "
                f"checkpoint pass its directory (with config.json) instead"
            )
        return *read_model(path), spec
    if is_url(spec):
        return *read_model(download.fetch_url(spec)), spec
    if _HUB_ID.match(spec) and not path.suffix:
        return *read_hf_directory(download.fetch_hub_directory(spec)), spec
    if path.suffix or os.sep in spec:
        raise InputNotFoundError(f"model file or directory not found: {spec}")
    raise CheckpointError(f"unknown model {spec!r}; zoo models: {', '.join(list_models())}")


def _load_zoo_entry(entry: ZooEntry) -> tuple[StateDict, ModelDescription]:
    source = entry.source
    if source.format == "hf":
        state_dict, description = read_hf_directory(download.fetch_hub_directory(source.hub_id))
        return state_dict, ModelDescription(
            description.config, description.categories, entry.preprocess, entry.default_task
        )
    if source.format == "segscope":
        path = resources.files("segscope") / source.package_file
        return read_model(Path(str(path)))
    raise CheckpointError(f"zoo entry {entry.name} has an unknown weight format {source.format!r}")


def read_hf_directory(directory: Path) -> tuple[StateDict, ModelDescription]:
    """Read a transformers ``Mask2FormerForUniversalSegmentation`` directory and convert it."""
    from segscope.checkpoints.hf import convert_hf_mask2former, mask2former_config_from_hf

    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory} has no config.json; is it a transformers model directory?")
    try:
        hf_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_path} is not valid JSON: {error}") from error
    if not isinstance(hf_config, dict):
        kind = type(hf_config).__name__
        raise CheckpointError(f"{config_path} holds a JSON {kind}, not a transformers config object")
    if hf_config.get("model_type") != "mask2former":
        raise CheckpointError(
            f"{config_path} describes a {hf_config.get('model_type')!r} model; segscope reads mask2former"
        )
    candidates = [directory / name for name in ("model.safetensors", "pytorch_model.bin")]
    weights = next((path for path in candidates if path.is_file()), None)
    if weights is None:
        raise CheckpointError(f"{directory} has neither model.safetensors nor pytorch_model.bin")
    try:
        config, class_names = mask2former_config_from_hf(hf_config)
    except (KeyError, TypeError, ValueError) as error:  # ValueError covers ConfigError and CheckpointError
        raise CheckpointError(f"{config_path}: {error}") from error
    description = ModelDescription(config, _categories_for(class_names), PreprocessConfig())
    return convert_hf_mask2former(read_weights(weights)), description


def _categories_for(class_names: list[str]) -> CategorySet:
    """COCO panoptic metadata when the names are COCO's, else names with generated colours.

    A transformers config carries names only; without thing/stuff flags every class is
    treated as a thing (its segments are never merged), as transformers does.
    """
    if list(class_names) == list(COCO_PANOPTIC.names):
        return COCO_PANOPTIC
    return CategorySet.from_names(class_names)
