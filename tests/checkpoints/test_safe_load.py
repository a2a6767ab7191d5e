"""Weight files are read without running pickled code, and loaded strictly."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from segscope.checkpoints.safe_load import load_state_dict_strict, read_weights
from segscope.errors import CheckpointError


class _Payload:
    """Pickles to a call of ``os.system``: a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_torch_checkpoint_with_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="never runs arbitrary pickled code"):
        read_weights(path)
    assert not marker.exists()


def test_plain_pickle_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pth"
    path.write_bytes(pickle.dumps({"w": [1, 2, 3]}, protocol=2))
    with pytest.raises(CheckpointError):
        read_weights(path)


def test_truncated_files_raise_checkpoint_error_naming_the_file(tmp_path: Path) -> None:
    tensors = {"w": torch.randn(64, 64)}
    good_st, good_pt = tmp_path / "m.safetensors", tmp_path / "m.pth"
    save_file(tensors, str(good_st))
    torch.save(tensors, good_pt)
    for good in (good_st, good_pt):
        cut = good.with_name("cut" + good.suffix)
        cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        with pytest.raises(CheckpointError, match="cut"):
            read_weights(cut)


def test_wrapped_state_dicts_are_unwrapped(tmp_path: Path) -> None:
    path = tmp_path / "trainer.pth"
    torch.save({"model": {"w": torch.ones(2)}, "epoch": 3}, path)
    assert torch.equal(read_weights(path)["w"], torch.ones(2))


def test_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        read_weights(tmp_path / "nope.safetensors")


def test_strict_load_names_missing_unexpected_and_mismatched_keys() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    state = model.state_dict()
    state.pop("1.bias")
    state["0.weight"] = torch.zeros(5, 3)
    state["head.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as error:
        load_state_dict_strict(model, state, "ckpt.pth")
    message = str(error.value)
    assert "missing keys [1]: 1.bias" in message
    assert "unexpected keys [1]: head.extra" in message
    assert "0.weight: checkpoint (5, 3) vs model (4, 3)" in message
    # Nothing was loaded: the model keeps its own weights.
    assert model[0].weight.shape == (4, 3)
