"""Every kind of ``model=`` value resolves to a working model, and bad ones say why not."""

from __future__ import annotations

import functools
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import segscope
from segscope.checkpoints import download
from segscope.data.categories import COCO_PANOPTIC
from segscope.errors import CheckpointError
from segscope.loading import load

transformers = pytest.importorskip("transformers")


def _tiny_hf_model(num_labels: int, id2label: dict[int, str]) -> torch.nn.Module:
    swin = transformers.SwinConfig(
        embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8], window_size=7,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = transformers.Mask2FormerConfig(
        backbone_config=swin, num_labels=num_labels, id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        num_queries=10, decoder_layers=3, encoder_layers=1, dim_feedforward=64, encoder_feedforward_dim=64,
    )
    torch.manual_seed(0)
    return transformers.Mask2FormerForUniversalSegmentation(config).eval()


@pytest.fixture(scope="module")
def hf_directory(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    model = _tiny_hf_model(3, {0: "cat", 1: "dog", 2: "grass"})
    directory = tmp_path_factory.mktemp("hf") / "tiny-mask2former"
    model.save_pretrained(directory)
    return directory, model


def _assert_same_outputs(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    images = torch.randn(1, 3, 224, 256)
    with torch.inference_mode():
        expected = theirs(pixel_values=images)
        got = ours(images)
    assert (got.class_logits - expected.class_queries_logits).abs().max() <= 1e-4
    assert (got.mask_logits - expected.masks_queries_logits).abs().max() <= 1e-4


def test_local_transformers_directory_loads_and_matches_transformers(hf_directory) -> None:
    directory, hf_model = hf_directory
    loaded = load(directory)
    assert loaded.description.categories.names == ("cat", "dog", "grass")
    _assert_same_outputs(loaded.module, hf_model)
    # Its pipeline runs end to end.
    image = torch.randint(0, 255, (40, 50, 3), dtype=torch.uint8).numpy()
    result = segscope.pipeline(model=directory, device="cpu")(image)
    assert result["panoptic_seg"].shape == (40, 50)


def test_pytorch_model_bin_is_read_with_weights_only(hf_directory, tmp_path: Path) -> None:
    directory, hf_model = hf_directory
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    _assert_same_outputs(segscope.load_model(tmp_path), hf_model)


def test_coco_names_get_coco_panoptic_metadata(tmp_path: Path) -> None:
    model = _tiny_hf_model(133, dict(enumerate(COCO_PANOPTIC.names)))
    model.save_pretrained(tmp_path)
    loaded = load(tmp_path)
    assert loaded.description.categories == COCO_PANOPTIC  # thing/stuff flags and COCO ids


def test_hub_id_goes_through_huggingface_hub(hf_directory, monkeypatch: pytest.MonkeyPatch) -> None:
    directory, hf_model = hf_directory
    asked = []

    def fake_snapshot_download(repo_id: str, revision=None, allow_patterns=None) -> str:
        asked.append((repo_id, tuple(allow_patterns)))
        return str(directory)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    _assert_same_outputs(segscope.load_model("someone/tiny-mask2former"), hf_model)
    assert asked == [("someone/tiny-mask2former", tuple(download.HF_FILES))]


def test_offline_hub_download_explains_how_to_use_a_local_copy(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(CheckpointError, match="local directory"):
        load("facebook/mask2former-swin-tiny-coco-panoptic")


@pytest.fixture()
def file_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", tmp_path
    server.shutdown()


def test_url_to_a_segscope_checkpoint_downloads_once(tiny_checkpoint: Path, file_server, monkeypatch, tmp_path) -> None:
    base, served = file_server
    (served / "tiny.safetensors").write_bytes(tiny_checkpoint.read_bytes())
    cache = tmp_path / "cache"
    monkeypatch.setenv("SEGSCOPE_CACHE", str(cache))
    model = segscope.load_model(f"{base}/tiny.safetensors")
    assert isinstance(model, torch.nn.Module)
    assert download.url_cache_path(f"{base}/tiny.safetensors").is_file()
    assert download.url_cache_path(f"{base}/tiny.safetensors").name == "tiny.safetensors"


def test_unreachable_url_is_a_checkpoint_error(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SEGSCOPE_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match="could not reach http://127.0.0.1:9/model.safetensors"):
        load("http://127.0.0.1:9/model.safetensors")


def test_bad_model_values_name_the_problem(tmp_path: Path, hf_directory) -> None:
    with pytest.raises(CheckpointError, match="unknown model 'no-such-model'.*mask2former-r50-coco-panoptic"):
        load("no-such-model")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="no config.json"):
        load(tmp_path)
    directory, _ = hf_directory
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({**json.loads((directory / "config.json").read_text())}))
    with pytest.raises(CheckpointError, match="neither model.safetensors nor pytorch_model.bin"):
        load(broken)
    (broken / "config.json").write_text(json.dumps({"model_type": "detr"}))
    with pytest.raises(CheckpointError, match="'detr' model"):
        load(broken)
    (broken / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(CheckpointError, match="holds a JSON list, not a transformers config object"):
        load(broken)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("num_queries", -1, "num_queries must be an integer"),
        ("hidden_dim", 10**8, "hidden_dim must be an integer"),
        ("decoder_layers", "ten", "unsupported operand|decoder_layers"),
        ("id2label", ["cat"], "id2label must map class indices to names, got a list"),
    ],
)
def test_transformers_config_values_are_checked_before_building(
    hf_directory, tmp_path: Path, key: str, value: object, message: str
) -> None:
    directory, _ = hf_directory
    config = json.loads((directory / "config.json").read_text())
    config[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((directory / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=rf"config\.json: .*({message})"):
        load(tmp_path)


def test_truncated_transformers_weights_are_refused(hf_directory, tmp_path: Path) -> None:
    directory, _ = hf_directory
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    data = (directory / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load(tmp_path)


def test_weights_of_another_shape_are_refused_by_key(hf_directory, tmp_path: Path) -> None:
    directory, _ = hf_directory
    config = json.loads((directory / "config.json").read_text())
    config["num_labels"] = 5
    config["id2label"] = {str(i): f"c{i}" for i in range(5)}
    config["label2id"] = {f"c{i}": i for i in range(5)}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((directory / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"shape mismatch.*class_head"):
        load(tmp_path)
