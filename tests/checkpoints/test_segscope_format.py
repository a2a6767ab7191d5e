"""segscope's own checkpoint file round-trips weights and description."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from segscope.checkpoints.segscope_format import (
    ModelDescription,
    is_segscope_file,
    read_model,
    save_model,
    trainer_payload,
)
from segscope.errors import CheckpointError
from tests.conftest import TINY_CATEGORIES, TINY_CONFIG, TINY_PREPROCESS

DESCRIPTION = ModelDescription(TINY_CONFIG, TINY_CATEGORIES, TINY_PREPROCESS, "semantic")


def test_safetensors_round_trip_keeps_weights_and_description(tmp_path: Path) -> None:
    weights = {"a.weight": torch.randn(3, 2), "b": torch.arange(4)}
    path = save_model(tmp_path / "m.safetensors", weights, DESCRIPTION)
    assert is_segscope_file(path)
    state, description = read_model(path)
    assert description == DESCRIPTION
    assert all(torch.equal(state[k], v) for k, v in weights.items())


def test_trainer_checkpoint_is_a_model_too(tmp_path: Path) -> None:
    path = tmp_path / "epoch_1.pth"
    torch.save(trainer_payload({"w": torch.ones(2)}, DESCRIPTION, epoch=1), path)
    state, description = read_model(path)
    assert description.categories == TINY_CATEGORIES and torch.equal(state["w"], torch.ones(2))


def test_plain_safetensors_is_not_taken_for_a_segscope_model(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(1)}, str(path))
    assert not is_segscope_file(path)
    with pytest.raises(CheckpointError, match="not a segscope checkpoint"):
        read_model(path)


def test_category_count_must_match_the_model(tmp_path: Path) -> None:
    wrong = replace(DESCRIPTION, config=replace(TINY_CONFIG, num_classes=7))
    path = save_model(tmp_path / "m.safetensors", {"w": torch.ones(1)}, wrong)
    with pytest.raises(CheckpointError, match="4 categories but the model predicts 7"):
        read_model(path)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_queries", -1, r"num_queries must be an integer in \[1, 10000\], got -1"),
        ("hidden_dim", 10**9, "hidden_dim must be an integer"),
        ("object_mask_threshold", float("nan"), "object_mask_threshold must be a number"),
        ("decoder_layers", "9", "decoder_layers must be an integer"),
    ],
)
def test_header_values_are_checked_before_anything_is_built(
    tmp_path: Path, field: str, value: object, message: str
) -> None:
    # A header edited by hand (or by an attacker): the values must not reach torch.
    metadata = DESCRIPTION.to_metadata()
    config = json.loads(metadata["config"])
    config[field] = value
    metadata["config"] = json.dumps(config)
    path = tmp_path / "edited.safetensors"
    save_file({"w": torch.ones(1)}, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match=rf"edited\.safetensors has a malformed segscope header: .*{message}"):
        read_model(path)


def test_header_config_that_is_not_an_object_is_refused(tmp_path: Path) -> None:
    metadata = {**DESCRIPTION.to_metadata(), "config": "[1, 2]"}
    path = tmp_path / "edited.safetensors"
    save_file({"w": torch.ones(1)}, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match="malformed segscope header"):
        read_model(path)
