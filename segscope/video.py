"""Videos and webcams: decode frames, segment them in batches, write an annotated video and JSON lines.

Frames are decoded and encoded with PyAV (``av``), whose wheels carry FFmpeg with libx264: no
system FFmpeg is needed. A run over ``clip.mp4`` writes, in the output folder:

| format    | file          | content                                                                   |
| --------- | ------------- | ------------------------------------------------------------------------- |
| `overlay` | `clip.mp4`    | the annotated video: H.264, same frame count, size and frame rate          |
| `json`    | `clip.jsonl`  | one JSON object per frame and line: `frame`, `time` (s) + `to_json()`      |

A webcam is the source ``webcam:N`` (device N: ``/dev/videoN`` through V4L2 on Linux, AVFoundation
device N on macOS); its outputs are named ``webcamN``, and it runs until Ctrl-C or ``max_frames``.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO

import av
import numpy as np
from tqdm.auto import tqdm

from segscope.errors import ImageLoadError, OptionError
from segscope.fileio import atomic_path
from segscope.pipeline import SegmentationPipeline
from segscope.results import SegmentationResult
from segscope.visualize import DrawStyle

VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".ts"})
WEBCAM_PREFIX = "webcam:"
# What a video run can write, by --format name; the other formats describe single images.
VIDEO_FORMATS = {"overlay": ".mp4", "json": ".jsonl"}
# A webcam that does not announce its frame rate is recorded at this one.
_DEFAULT_RATE = Fraction(30)


@dataclass(frozen=True)
class VideoInfo:
    """What a video stream is: ``width`` x ``height`` pixels at ``rate`` frames per second;
    ``frame_count`` is None where the container does not say (webcams, some streams)."""

    width: int
    height: int
    rate: Fraction
    frame_count: int | None


@dataclass(frozen=True)
class VideoFrame:
    """One decoded frame: its position in the stream, its time in seconds and its HxWx3 uint8 RGB pixels."""

    index: int
    time: float
    image: np.ndarray


def is_video_path(path: str | Path) -> bool:
    """Whether ``path`` names a video file (by its suffix)."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def webcam_index(source: str) -> int | None:
    """``"webcam:0"`` -> 0; None for any other source. A malformed device number is an ``OptionError``."""
    if not source.startswith(WEBCAM_PREFIX):
        return None
    number = source[len(WEBCAM_PREFIX) :]
    if not number.isdigit():
        raise OptionError(f"a webcam source is webcam:N with N the device number (webcam:0), got {source!r}")
    return int(number)


class VideoReader:
    """The frames of a video file or a webcam, decoded to RGB. Use as a context manager.

    Raises ``ImageLoadError`` naming the source when it cannot be opened, holds no video stream,
    or breaks off while decoding.
    """

    def __init__(self, source: str | Path, *, format: str | None = None, name: str | None = None) -> None:
        self.name = name or str(source)
        try:
            self._container = av.open(str(source), format=format)
        except (av.error.FFmpegError, OSError) as error:
            raise ImageLoadError(f"cannot read video {self.name}: {error}") from error
        if not self._container.streams.video:
            self._container.close()
            raise ImageLoadError(f"{self.name} holds no video stream")
        self._stream = self._container.streams.video[0]
        self._stream.thread_type = "AUTO"
        context = self._stream.codec_context
        rate = self._stream.average_rate or self._stream.guessed_rate or _DEFAULT_RATE
        self.info = VideoInfo(context.width, context.height, Fraction(rate), self._stream.frames or None)

    @classmethod
    def webcam(cls, index: int) -> VideoReader:
        """Device ``index`` of this machine's cameras (V4L2 on Linux, AVFoundation on macOS)."""
        if sys.platform.startswith("linux"):
            return cls(f"/dev/video{index}", format="v4l2", name=f"webcam {index} (/dev/video{index})")
        if sys.platform == "darwin":
            return cls(str(index), format="avfoundation", name=f"webcam {index}")
        raise OptionError(f"webcam capture is supported on Linux and macOS, not on {sys.platform}")

    def frames(self) -> Iterator[VideoFrame]:
        """Every frame in stream order."""
        index = 0
        try:
            for frame in self._container.decode(self._stream):
                time = float(frame.time) if frame.time is not None else index / self.info.rate
                yield VideoFrame(index, time, frame.to_ndarray(format="rgb24"))
                index += 1
        except av.error.FFmpegError as error:
            raise ImageLoadError(f"cannot decode {self.name} after frame {index}: {error}") from error

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class VideoWriter:
    """Encodes HxWx3 uint8 RGB frames into an MP4 file: H.264 (libx264) where PyAV has it, else MPEG-4.

    Frame ``k`` is shown at ``k / info.rate`` seconds. Odd widths or heights, which 4:2:0 chroma
    cannot hold, are encoded in 4:4:4 so that the size is kept exactly.
    """

    def __init__(self, path: str | Path, info: VideoInfo) -> None:
        self._container = av.open(str(path), mode="w", format="mp4")
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        self._stream = self._container.add_stream(codec, rate=info.rate)
        self._stream.width, self._stream.height = info.width, info.height
        even = info.width % 2 == 0 and info.height % 2 == 0
        self._stream.pix_fmt = "yuv420p" if even or codec != "libx264" else "yuv444p"
        if codec == "libx264":
            self._stream.options = {"crf": "18"}
        self._size = (info.height, info.width)
        self.count = 0

    def write(self, image: np.ndarray) -> None:
        """Append one HxWx3 uint8 RGB frame of the video's size."""
        if image.shape != (*self._size, 3):
            raise ValueError(f"frame of shape {image.shape} in a video of size {self._size}")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        frame.pts = self.count
        self._container.mux(self._stream.encode(frame))
        self.count += 1

    def close(self) -> None:
        """Flush the encoder and finish the file."""
        self._container.mux(self._stream.encode(None))
        self._container.close()


def segment_frames(
    segmenter: SegmentationPipeline,
    frames: Iterable[VideoFrame],
    total: int | None = None,
    progress: bool = True,
) -> Iterator[tuple[VideoFrame, SegmentationResult]]:
    """Segment ``frames`` ``segmenter.batch_size`` at a time, yielding each frame with its result.

    Works on any frame source (file, webcam, a list in a test). ``total`` sizes the progress bar.
    """
    with tqdm(total=total, disable=not progress, unit="frame") as bar:
        batch: list[VideoFrame] = []
        for frame in frames:
            batch.append(frame)
            if len(batch) == segmenter.batch_size:
                yield from _segment_batch(segmenter, batch, bar)
                batch = []
        if batch:
            yield from _segment_batch(segmenter, batch, bar)


def _segment_batch(
    segmenter: SegmentationPipeline, batch: list[VideoFrame], bar: tqdm
) -> Iterator[tuple[VideoFrame, SegmentationResult]]:
    for frame, result in zip(batch, segmenter.iter_results([f.image for f in batch], progress=False)):
        bar.update()
        yield frame, result


def video_output_paths(out: Path, stem: str, formats: Iterable[str]) -> dict[str, Path]:
    """The files a video run writes, by format; formats that only describe images are refused."""
    formats = tuple(formats)
    others = [f for f in formats if f not in VIDEO_FORMATS]
    if others:
        raise OptionError(
            f"format(s) {', '.join(others)} describe single images; a video gets "
            f"overlay ({stem}.mp4) and json ({stem}.jsonl)"
        )
    return {name: out / f"{stem}{VIDEO_FORMATS[name]}" for name in formats}


def predict_video(
    segmenter: SegmentationPipeline,
    reader: VideoReader,
    paths: dict[str, Path],
    style: DrawStyle | None = None,
    max_frames: int | None = None,
    progress: bool = True,
) -> int:
    """Segment ``reader``'s frames into the files of ``paths`` (see ``video_output_paths``).

    Each file appears under its name only once complete. Ctrl-C ends the run early and keeps the
    frames done so far (the way to stop a webcam). Returns the number of frames written.
    """
    info = reader.info
    total = info.frame_count if max_frames is None else min(max_frames, info.frame_count or max_frames)
    frames = _first(reader.frames(), max_frames)
    with _atomic_or_none(paths.get("overlay")) as video_path, _atomic_or_none(paths.get("json")) as json_path:
        writer = VideoWriter(video_path, info) if video_path is not None else None
        lines: IO[str] | None = open(json_path, "w") if json_path is not None else None
        count = 0
        try:
            for frame, result in segment_frames(segmenter, frames, total, progress):
                if writer is not None:
                    writer.write(np.asarray(result.draw(style=style)))
                if lines is not None:
                    record = {"frame": frame.index, "time": round(frame.time, 6), "source": reader.name}
                    lines.write(json.dumps({**record, "model": segmenter.model.name, **result.to_json()}) + "\n")
                count += 1
        except KeyboardInterrupt:
            print(f"segscope: stopped after {count} frame(s)", file=sys.stderr)
        finally:
            if writer is not None:
                writer.close()
            if lines is not None:
                lines.close()
    return count


def _first(frames: Iterator[VideoFrame], limit: int | None) -> Iterator[VideoFrame]:
    for frame in frames:
        if limit is not None and frame.index >= limit:
            return
        yield frame



def _atomic_or_none(path: Path | None) -> contextlib.AbstractContextManager[Path | None]:
    """``atomic_path(path)``, or a context yielding None when there is no path."""
    return atomic_path(path) if path is not None else contextlib.nullcontext()
