"""Videos through ``segscope predict``: an annotated video and JSON lines, frame for frame."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

import segscope
from segscope.cli import main
from segscope.errors import ImageLoadError, OptionError
from segscope.video import VideoFrame, VideoInfo, VideoReader, VideoWriter, segment_frames, webcam_index

FRAMES, HEIGHT, WIDTH, RATE = 6, 64, 80, Fraction(12)


def _synthetic_frames(count: int = FRAMES) -> list[np.ndarray]:
    """A disc and a square moving over a striped background."""
    ys, xs = np.mgrid[:HEIGHT, :WIDTH]
    frames = []
    for k in range(count):
        image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
        image[..., 1] = np.where((xs // 6) % 2 == 0, 60, 160)
        image[(ys - 30) ** 2 + (xs - 15 - 5 * k) ** 2 < 100] = (230, 40, 40)
        image[8 + 2 * k : 28 + 2 * k, 50:70] = (40, 40, 220)
        frames.append(image)
    return frames


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    writer = VideoWriter(path, VideoInfo(WIDTH, HEIGHT, RATE, None))
    for frame in _synthetic_frames():
        writer.write(frame)
    writer.close()
    return path


def _decode(path: Path) -> tuple[list[np.ndarray], Fraction]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)], stream.average_rate


def test_predict_on_a_video_keeps_frames_size_and_rate_and_matches_images(clip: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["predict", str(clip), "-m", "demo", "-o", str(out), "--device", "cpu", "--batch-size", "4"]
    assert main(args) == 0
    annotated, rate = _decode(out / "clip.mp4")
    assert len(annotated) == FRAMES and annotated[0].shape == (HEIGHT, WIDTH, 3) and rate == RATE
    lines = [json.loads(line) for line in (out / "clip.jsonl").read_text().splitlines()]
    assert [line["frame"] for line in lines] == list(range(FRAMES))
    assert [line["time"] for line in lines] == pytest.approx([k / RATE for k in range(FRAMES)], abs=1e-5)
    # The lossy codec changed the pixels: compare with the frames as decoded, not the arrays drawn,
    # in the same batches (the network's float rounding is not the same at every batch size).
    decoded, _ = _decode(clip)
    expected = segscope.pipeline(model="demo", device="cpu", batch_size=4)(decoded)
    for line, result in zip(lines, expected):
        assert {k: line[k] for k in ("task", "height", "width", "segments")} == result.to_json()
    assert any(line["segments"] for line in lines)


def test_frames_are_segmented_in_batches_from_any_frame_source() -> None:
    # The iterator the webcam path uses, fed by a synthetic source: order and results as one by one.
    segmenter = segscope.pipeline(model="demo", device="cpu", batch_size=4)
    frames = [VideoFrame(k, k / 12, image) for k, image in enumerate(_synthetic_frames(5))]
    pairs = list(segment_frames(segmenter, iter(frames), total=None, progress=False))
    assert [frame.index for frame, _ in pairs] == list(range(5))
    single = segscope.pipeline(model="demo", device="cpu")
    for frame, result in pairs:
        assert result.to_json() == single(frame.image).to_json()


def test_max_frames_stops_early(clip: Path, tmp_path: Path) -> None:
    args = ["predict", str(clip), "-o", str(tmp_path), "--device", "cpu", "--max-frames", "2", "-f", "json"]
    assert main(args) == 0
    assert len((tmp_path / "clip.jsonl").read_text().splitlines()) == 2
    assert not (tmp_path / "clip.mp4").exists()


def test_unreadable_video_is_named_in_the_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all" * 10)
    with pytest.raises(ImageLoadError, match="broken.mp4"):
        VideoReader(broken)
    assert main(["predict", str(broken), "-o", str(tmp_path / "out"), "--device", "cpu"]) == 2
    assert "broken.mp4" in capsys.readouterr().err


def test_video_outputs_are_not_overwritten_without_overwrite(
    clip: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "clip.jsonl").write_text("mine\n")
    args = ["predict", str(clip), "-o", str(tmp_path), "--device", "cpu", "--max-frames", "1"]
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err and (tmp_path / "clip.jsonl").read_text() == "mine\n"
    assert main([*args, "--overwrite"]) == 0
    assert json.loads((tmp_path / "clip.jsonl").read_text())["frame"] == 0
    # Writing into the video's own folder would replace the input itself.
    assert main(["predict", str(clip), "-o", str(clip.parent), "--device", "cpu", "--overwrite"]) == 2
    assert "would overwrite an input video" in capsys.readouterr().err


def test_image_formats_are_refused_for_videos(clip: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["predict", str(clip), "-o", str(tmp_path), "--device", "cpu", "-f", "coco-panoptic"]) == 2
    assert "describe single images" in capsys.readouterr().err


def test_webcam_sources_are_spelled_webcam_colon_number() -> None:
    assert webcam_index("webcam:0") == 0 and webcam_index("webcam:12") == 12
    assert webcam_index("clip.mp4") is None
    with pytest.raises(OptionError, match="webcam:N"):
        webcam_index("webcam:front")


def test_odd_sizes_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "odd.mp4"
    writer = VideoWriter(path, VideoInfo(33, 21, Fraction(25), None))
    for _ in range(3):
        writer.write(np.full((21, 33, 3), 128, np.uint8))
    writer.close()
    frames, rate = _decode(path)
    assert len(frames) == 3 and frames[0].shape == (21, 33, 3) and rate == 25
