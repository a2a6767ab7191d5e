"""``segscope predict``: outputs never replace inputs or each other, bad images are skipped and
counted, and the COCO formats score the same with the COCO tools as ``segscope eval``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import segscope
from segscope.cli import main
from segscope.data.panoptic_png import rgb_to_id
from segscope.data.synthetic import write_synthetic_dataset
from segscope.errors import OptionError
from segscope.export import unique_stems


@pytest.fixture()
def folder(picture: Path, tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    Image.open(picture).convert("RGB").save(images / "a.png")
    Image.open(picture).convert("RGB").save(images / "a.jpg")
    Image.open(picture).convert("RGB").save(images / "b.png")
    return images


def _predict(*args: str) -> int:
    return main(["predict", *args, "--device", "cpu"])


# No lost files -----------------------------------------------------------------------------------


def test_predicting_a_folder_into_itself_never_overwrites_an_input(tiny_checkpoint: Path, folder: Path, capsys) -> None:
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert _predict(str(folder), "-m", str(tiny_checkpoint), "--out", str(folder)) == 2
    assert "would overwrite an input image" in capsys.readouterr().err
    # Not even --overwrite writes over an input.
    assert _predict(str(folder), "-m", str(tiny_checkpoint), "--out", str(folder), "--overwrite") == 2
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_images_sharing_a_stem_get_one_result_each(tiny_checkpoint: Path, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _predict(str(folder), "-m", str(tiny_checkpoint), "--out", str(out)) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["a_jpg.json", "a_jpg.png", "a_png.json", "a_png.png", "b.json", "b.png"]
    sources = {json.loads((out / f"{stem}.json").read_text())["source"] for stem in ("a_jpg", "a_png", "b")}
    assert sources == {str(folder / n) for n in ("a.jpg", "a.png", "b.png")}


def test_unique_stems_resolve_every_collision() -> None:
    assert unique_stems(["a.jpg", "a.png", "b.png"]) == ["a_jpg", "a_png", "b"]
    # "a_jpg.gif" would take the stem the clash rule gives a.jpg: a counter separates them.
    assert unique_stems(["a.jpg", "a.png", "a_jpg.gif"]) == ["a_jpg", "a_png", "a_jpg-2"]


def test_earlier_results_are_replaced_only_with_overwrite(
    tiny_checkpoint: Path, picture: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    assert _predict(str(picture), "-m", str(tiny_checkpoint), "--out", str(out)) == 0
    (out / "picture.json").write_text("my notes")
    assert _predict(str(picture), "-m", str(tiny_checkpoint), "--out", str(out)) == 2
    assert "already exist" in capsys.readouterr().err and (out / "picture.json").read_text() == "my notes"
    assert _predict(str(picture), "-m", str(tiny_checkpoint), "--out", str(out), "--overwrite") == 0
    assert json.loads((out / "picture.json").read_text())["task"] == "panoptic"


def test_unreadable_image_in_a_folder_is_reported_skipped_and_counted(
    tiny_checkpoint: Path, folder: Path, tmp_path: Path, capsys
) -> None:
    data = (folder / "b.png").read_bytes()
    (folder / "b.png").write_bytes(data[: len(data) // 2])  # truncated
    (folder / "c.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    code = _predict(str(folder), "-m", str(tiny_checkpoint), "--out", str(out), "--batch-size", "2")
    err = capsys.readouterr().err
    assert code == 1
    assert "b.png" in err and "c.jpg" in err and "2 of 4 image(s) could not be read" in err
    assert sorted(p.name for p in out.iterdir()) == ["a_jpg.json", "a_jpg.png", "a_png.json", "a_png.png"]


def test_no_scores_leaves_scores_out_of_the_overlay(tiny_checkpoint: Path, picture: Path, tmp_path: Path) -> None:
    result = segscope.pipeline(model=tiny_checkpoint, device="cpu")(picture)
    with_scores, without = np.asarray(result.draw()), np.asarray(result.draw(show_scores=False))
    assert not np.array_equal(with_scores, without)  # the flag has something to change
    for flag, expected in (([], with_scores), (["--no-scores"], without)):
        out = tmp_path / ("plain" if flag else "scored")
        assert _predict(str(picture), "-m", str(tiny_checkpoint), "-o", str(out), *flag) == 0
        np.testing.assert_array_equal(np.asarray(Image.open(out / "picture.png")), expected)


# Errors: segscope's own are one line, anything else keeps its traceback --------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_a_one_line_error(tiny_checkpoint: Path, picture: Path, tmp_path: Path) -> None:
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "segscope.cli",
            "predict",
            str(picture),
            "-m",
            str(tiny_checkpoint),
            "-o",
            str(tmp_path / "out"),
            "--device",
            "cuda",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert process.returncode == 2
    assert process.stderr.startswith("segscope: error: device 'cuda' was asked for but no CUDA GPU")
    assert "Traceback" not in process.stderr


def test_unknown_device_is_an_option_error(tiny_checkpoint: Path) -> None:
    with pytest.raises(OptionError, match="unknown device 'gpu0'"):
        segscope.pipeline(model=tiny_checkpoint, device="gpu0")


def test_an_internal_value_error_is_not_disguised_as_bad_input(monkeypatch, picture: Path, tmp_path: Path) -> None:
    def broken(*args, **kwargs):
        raise ValueError("a bug inside segscope")

    monkeypatch.setattr(sys.modules["segscope.pipeline"], "pipeline", broken)
    with pytest.raises(ValueError, match="a bug inside segscope"):
        main(["predict", str(picture), "--out", str(tmp_path / "out")])


# --threshold --------------------------------------------------------------------------------------


def test_threshold_is_the_panoptic_object_mask_threshold(tiny_checkpoint: Path, picture: Path) -> None:
    # The tiny model's own object-mask threshold is 0.0: every query competes for pixels.
    default = segscope.pipeline(model=tiny_checkpoint, device="cpu")(picture)
    assert len(default["segments_info"]) > 0
    scores = sorted(s["score"] for s in default["segments_info"])
    strict = segscope.pipeline(model=tiny_checkpoint, device="cpu", threshold=scores[-1])(picture)
    # Queries scoring at or below the threshold take no pixels.
    assert all(s["score"] > scores[-1] for s in strict["segments_info"])
    assert len(strict["segments_info"]) < len(default["segments_info"])


def test_threshold_is_refused_for_the_semantic_task(
    tiny_checkpoint: Path, picture: Path, tmp_path: Path, capsys
) -> None:
    with pytest.raises(OptionError, match="no score threshold"):
        segscope.pipeline(model=tiny_checkpoint, task="semantic", threshold=0.3)
    args = [str(picture), "-m", str(tiny_checkpoint), "-o", str(tmp_path), "--task", "semantic", "--threshold", "0.3"]
    assert _predict(*args) == 2
    assert "no score threshold" in capsys.readouterr().err


# Formats ------------------------------------------------------------------------------------------


def test_label_png_holds_the_semantic_map(tiny_checkpoint: Path, picture: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = [str(picture), "-m", str(tiny_checkpoint), "-o", str(out), "--task", "semantic", "--format", "label-png"]
    assert _predict(*args) == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.*")) == ["labels/picture.png"]
    expected = segscope.pipeline(model=tiny_checkpoint, task="semantic", device="cpu")(picture)["semantic_seg"]
    np.testing.assert_array_equal(np.asarray(Image.open(out / "labels" / "picture.png")), expected)


def test_format_for_another_task_is_refused(tiny_checkpoint: Path, picture: Path, tmp_path: Path, capsys) -> None:
    assert _predict(str(picture), "-m", str(tiny_checkpoint), "-o", str(tmp_path), "--format", "coco-results") == 2
    assert "use --task instance" in capsys.readouterr().err
    assert _predict(str(picture), "-m", str(tiny_checkpoint), "-o", str(tmp_path), "--format", "overlay,svg") == 2


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 synthetic validation scenes the demo model never saw, with every annotation kind."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("scenes"), num_train=0, num_val=12, seed=5)


def test_coco_results_score_in_pycocotools_as_segscope_eval_does(scenes: Path, tmp_path: Path) -> None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    out = tmp_path / "out"
    args = [str(scenes / "val"), "-m", "demo", "-o", str(out), "--task", "instance", "--threshold", "0"]
    assert _predict(*args, "--format", "coco-results") == 0
    detections = json.loads((out / "coco_results.json").read_text())
    assert isinstance(detections, list) and {"image_id", "category_id", "segmentation", "bbox", "score"} <= set(
        detections[0]
    )
    gt = COCO(str(scenes / "annotations" / "instances_val.json"))
    official = {}
    for iou_type in ("bbox", "segm"):
        evaluation = COCOeval(gt, gt.loadRes(str(out / "coco_results.json")), iou_type)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
        official[iou_type] = 100 * evaluation.stats[0]

    figures = tmp_path / "eval.json"
    eval_args = ["eval", "-m", "demo", "-d", str(scenes), "-t", "instance", "-o", str(figures), "--device", "cpu"]
    assert main(eval_args) == 0
    ours = json.loads(figures.read_text())
    print(f"pycocotools on predict output: box AP {official['bbox']:.2f}, mask AP {official['segm']:.2f}")
    assert official["bbox"] > 1 and official["segm"] > 1  # a real comparison, not two zeros
    assert ours["bbox"]["AP"] == pytest.approx(official["bbox"], abs=1e-9)
    assert ours["segm"]["AP"] == pytest.approx(official["segm"], abs=1e-9)


def test_coco_json_gives_the_image_ids(scenes: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    annotations = scenes / "annotations" / "instances_val.json"
    image = sorted((scenes / "val").iterdir())[3]
    args = [
        str(image),
        "-m",
        "demo",
        "-o",
        str(out),
        "-t",
        "instance",
        "-f",
        "coco-results",
        "--coco-json",
        str(annotations),
    ]
    assert _predict(*args) == 0
    expected = next(i["id"] for i in json.loads(annotations.read_text())["images"] if i["file_name"] == image.name)
    assert {d["image_id"] for d in json.loads((out / "coco_results.json").read_text())} == {expected}


def test_coco_panoptic_output_matches_the_result_and_scores_in_panopticapi(scenes: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _predict(str(scenes / "val"), "-m", "demo", "-o", str(out), "--format", "coco-panoptic") == 0
    document = json.loads((out / "panoptic.json").read_text())
    assert len(document["annotations"]) == 12
    first = document["annotations"][0]
    image = scenes / "val" / first["file_name"]
    result = segscope.pipeline(model="demo", device="cpu")(image)
    ids = rgb_to_id(np.asarray(Image.open(out / "panoptic" / first["file_name"])))
    np.testing.assert_array_equal(ids, result["panoptic_seg"])
    assert [(s["id"], s["category_id"]) for s in first["segments_info"]] == [
        (s["id"], s["category_id"]) for s in result["segments_info"]
    ]

    figures = tmp_path / "eval.json"
    assert main(["eval", "-m", "demo", "-d", str(scenes), "-t", "panoptic", "-o", str(figures), "--device", "cpu"]) == 0
    ours = json.loads(figures.read_text())
    evaluation = pytest.importorskip("panopticapi.evaluation", reason="panopticapi is the optional reference")
    official = evaluation.pq_compute(
        str(scenes / "annotations" / "panoptic_val.json"),
        str(out / "panoptic.json"),
        gt_folder=str(scenes / "panoptic_val"),
        pred_folder=str(out / "panoptic"),
    )
    print(f"panopticapi on predict output: PQ {100 * official['All']['pq']:.3f}, segscope eval {ours['All']['PQ']:.3f}")
    for group in ("All", "Things", "Stuff"):
        assert ours[group]["PQ"] == pytest.approx(100 * official[group]["pq"], abs=1e-9)
