"""The ``segscope`` command: predict, train, eval, models, convert."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from segscope.errors import SegscopeError

if TYPE_CHECKING:
    from segscope.engine.distributed import DistributedContext
    from segscope.pipeline import SegmentationPipeline
    from segscope.visualize import DrawStyle

Command = Callable[[argparse.Namespace], int]


def _add_predict(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "predict",
        help="segment an image, a URL, a folder of images, a video or a webcam",
        description="Write the results of each image in the chosen formats. Nothing is written over an input; "
        "files of an earlier run are replaced only with --overwrite. An unreadable image in a folder is "
        "reported and skipped, and the command then exits with status 1. A video (clip.mp4, .mov, .avi, .mkv, "
        "...) or webcam:N gives an annotated video (overlay: clip.mp4) and one JSON line per frame "
        "(json: clip.jsonl). Under torchrun the images are shared out across the processes.",
    )
    parser.add_argument(
        "source", help="image file, http(s) URL, folder of images, video file, or webcam:N (camera N, e.g. webcam:0)"
    )
    parser.add_argument("--model", "-m", default="demo", help="zoo name, Hub id, directory or checkpoint")
    parser.add_argument("--task", "-t", choices=("panoptic", "semantic", "instance"), help="default: the model's task")
    parser.add_argument("--out", "-o", default="segscope_out", help="output directory (default: segscope_out)")
    parser.add_argument(
        "--format",
        "-f",
        default="overlay,json",
        help="comma-separated, from: overlay (S.png), json (S.json), coco-results (coco_results.json, instance), "
        "coco-panoptic (panoptic/S.png + panoptic.json, panoptic), label-png (labels/S.png, semantic); "
        "videos: overlay (S.mp4), json (S.jsonl); default: overlay,json",
    )
    parser.add_argument(
        "--coco-json", help="a COCO JSON whose images[] give the image ids of coco-results / coco-panoptic "
        "(default: numeric file names, as in COCO, are the ids)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace output files left by an earlier run")
    parser.add_argument(
        "--device", help="cpu, cuda, cuda:1, ... (default: cuda if available; under torchrun each process's GPU)"
    )
    parser.add_argument("--batch-size", type=int, default=1, help="images or video frames per forward pass")
    parser.add_argument(
        "--threshold",
        type=float,
        help="lowest score kept: instance (default 0.5) and panoptic (default: the model's object-mask "
        "threshold); not used by the semantic task",
    )
    parser.add_argument("--max-frames", type=int, help="videos and webcams: stop after this many frames")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="run the network under autocast in this dtype (float16: CUDA only); post-processing stays float32",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the network (needs a C++ compiler; batches are padded to size buckets, so the first "
        "batch of each bucket is slow): pays off over many images",
    )
    drawing = parser.add_argument_group("overlay pictures and videos")
    drawing.add_argument("--alpha", type=float, default=0.5, help="opacity of the colours, 0 (contours only) to 1")
    drawing.add_argument("--no-labels", action="store_true", help="write no captions (class names, scores)")
    drawing.add_argument("--no-scores", action="store_true", help="leave scores out of the captions")
    drawing.add_argument(
        "--boxes",
        action=argparse.BooleanOptionalAction,
        help="draw bounding boxes (--no-boxes: none; default: for instances only)",
    )
    drawing.add_argument("--font-size", type=int, help="caption size in pixels (default: grows with the image)")
    parser.set_defaults(run=_predict)


def _predict(args: argparse.Namespace) -> int:
    from segscope.engine import distributed
    from segscope.pipeline import pipeline
    from segscope.visualize import DrawStyle

    style = DrawStyle(
        alpha=args.alpha,
        labels=not args.no_labels,
        scores=not args.no_scores,
        boxes=args.boxes,
        font_size=args.font_size,
    )
    context = distributed.setup(args.device)
    try:
        segmenter = pipeline(
            "image-segmentation",
            model=args.model,
            task=args.task,
            device=context.device,
            batch_size=args.batch_size,
            threshold=args.threshold,
            dtype=args.dtype,
            compile=args.compile,
        )
        if _is_video_source(args.source):
            return _predict_video(args, segmenter, style, context)
        return _predict_images(args, segmenter, style, context)
    finally:
        distributed.teardown()


def _is_video_source(source: str) -> bool:
    from segscope.video import is_video_path, webcam_index

    return webcam_index(source) is not None or (is_video_path(source) and Path(source).is_file())


def _predict_video(
    args: argparse.Namespace, segmenter: SegmentationPipeline, style: DrawStyle, context: DistributedContext
) -> int:
    """Segment a video file or webcam frame by frame into a video and JSON lines (one process)."""
    from segscope.errors import OptionError
    from segscope.export import check_output_paths, parse_formats
    from segscope.video import VideoReader, predict_video, video_output_paths, webcam_index

    if context.is_distributed:
        raise OptionError("a video is segmented by one process; run it without torchrun")
    if args.max_frames is not None and args.max_frames < 1:
        raise OptionError(f"--max-frames must be >= 1, got {args.max_frames}")
    camera = webcam_index(args.source)
    stem = f"webcam{camera}" if camera is not None else Path(args.source).stem
    paths = video_output_paths(Path(args.out), stem, parse_formats(args.format, segmenter.task))
    inputs = [] if camera is not None else [Path(args.source)]
    check_output_paths(list(paths.values()), inputs, args.overwrite, input_kind="video")
    with VideoReader.webcam(camera) if camera is not None else VideoReader(args.source) as reader:
        count = predict_video(segmenter, reader, paths, style, args.max_frames)
    print(f"wrote {count} frame(s) to {', '.join(str(p) for p in paths.values())}")
    return 0


def _predict_images(
    args: argparse.Namespace, segmenter: SegmentationPipeline, style: DrawStyle, context: DistributedContext
) -> int:
    """Segment images; under torchrun each process takes its share (``engine.sharding``) and rank 0
    writes the files that gather every image."""
    from segscope.engine.sharding import gather_to_main, raise_together, shard_indices, sum_across
    from segscope.errors import ImageLoadError, InputNotFoundError
    from segscope.export import NEEDS_IMAGE_IDS, PredictionWriter, parse_formats, unique_stems
    from segscope.io import list_images
    from segscope.net import is_url

    formats = parse_formats(args.format, segmenter.task)
    source = Path(args.source)
    sources: list = [args.source]
    inputs: list[Path] = []
    if source.is_dir():
        sources = inputs = list_images(source)
        names = [p.name for p in sources]
    elif is_url(args.source):
        names = [Path(args.source.split("?")[0]).name or "image"]
    elif source.exists():
        inputs, names = [source], [source.name]
    else:
        raise InputNotFoundError(f"no such image file, video or folder: {source}")
    image_ids = _image_ids(names, args.coco_json) if NEEDS_IMAGE_IDS.intersection(formats) else None
    out = Path(args.out)
    # Every process checks the whole plan before any writes, and all stop if one refuses it.
    refused: SegscopeError | None = None
    try:
        writer = PredictionWriter(
            out,
            formats,
            unique_stems(names),
            inputs,
            image_ids,
            segmenter.categories,
            overwrite=args.overwrite,
            style=style,
        )
    except SegscopeError as error:
        refused = error
    raise_together(refused, context)
    mine = list(shard_indices(len(sources), context))
    failed, single_error = 0, None
    outcomes = segmenter.iter_outcomes([sources[i] for i in mine], progress=len(sources) > 1 and context.is_main)
    for position, outcome in outcomes:
        index = mine[position]
        if isinstance(outcome, ImageLoadError):
            if len(sources) == 1:
                single_error = outcome
                continue
            failed += 1
            print(f"segscope: skipped: {outcome}", file=sys.stderr)
            continue
        writer.write(index, str(sources[index]), segmenter.model.name, outcome)
    raise_together(single_error, context)
    gathered = gather_to_main(writer.records(), context)
    if context.is_main:
        for records in gathered[1:]:
            writer.add_records(records)
        writer.finish()
    failed = sum_across([failed], context)[0]
    if context.is_main:
        print(f"wrote {len(sources) - failed} result(s) to {out}")
        if failed:
            print(f"segscope: {failed} of {len(sources)} image(s) could not be read and were skipped", file=sys.stderr)
    return 1 if failed else 0


def _image_ids(names: list[str], coco_json: str | None) -> list[int]:
    """COCO image ids of input files: from ``coco_json``'s images[], else numeric file names."""
    from segscope.errors import AnnotationError, InputNotFoundError, OptionError

    if coco_json is None:
        stems = [Path(name).stem for name in names]
        if not all(stem.isdigit() for stem in stems):
            odd = next(name for name, stem in zip(names, stems) if not stem.isdigit())
            raise OptionError(
                f"{odd} has no numeric name to serve as its COCO image id; pass --coco-json with the "
                "dataset's annotation file"
            )
        return [int(stem) for stem in stems]
    path = Path(coco_json)
    if not path.is_file():
        raise InputNotFoundError(f"no such COCO JSON: {path}")
    try:
        images = json.loads(path.read_text())["images"]
        ids = {Path(image["file_name"]).name: int(image["id"]) for image in images}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise AnnotationError(f"{path}: cannot read images[].file_name / id: {error!r}") from error
    missing = [name for name in names if name not in ids]
    if missing:
        raise OptionError(f"{path} lists no image named {missing[0]} ({len(missing)} input(s) unlisted)")
    return [ids[name] for name in names]


def _add_models(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("models", help="list the model zoo")
    parser.set_defaults(run=_models)


def _models(args: argparse.Namespace) -> int:
    from segscope.zoo import ZOO

    width = max(len(name) for name in ZOO)
    metric_width = max(len(entry.card_metric) for entry in ZOO.values())
    for name, entry in sorted(ZOO.items()):
        where = entry.source.hub_id or entry.source.url or "shipped with segscope"
        print(f"{name:<{width}}  {entry.default_task:<9}  {entry.card_metric:<{metric_width}}  {where}")
    return 0


def _add_train(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "train",
        help="train a model on panoptic, semantic or instance data (torchrun for several GPUs)",
        description="The config's task (panoptic, semantic or instance) says what --data holds and what the model "
        "learns. Checkpoints go to WORK_DIR/epoch_N.pth after every epoch; --resume continues from the newest.",
    )
    parser.add_argument("--config", "-c", required=True, help="preset name or JSON file")
    parser.add_argument(
        "--data",
        "-d",
        required=True,
        help="dataset root; panoptic: annotations/panoptic_{split}.json, panoptic_{split}/ and {split}/ (COCO); "
        "semantic: images and label PNGs in the config's semantic_image_dir and semantic_label_dir "
        "(default {split}/ and semantic_{split}/; mmseg's COCO-Stuff: images/{split}/ and annotations/{split}/ "
        "with semantic_label_suffix _labelTrainIds)",
    )
    parser.add_argument("--work-dir", "-w", required=True)
    parser.add_argument("--max-epochs", type=int, required=True)
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the work dir")
    parser.add_argument("--init", help="fine-tune from this model (zoo name, Hub id, directory or checkpoint)")
    parser.add_argument(
        "--backbone-init",
        help="start the backbone from ImageNet weights: a release name (torchvision-resnet50, swin-b-in22k-384, "
        "...), a URL or a file; overrides the config's backbone_init ('none': random)",
    )
    parser.add_argument("--batch-size", type=int, help="per process; overrides the config")
    parser.add_argument("--num-workers", type=int, help="data loader workers; overrides the config")
    parser.add_argument("--device", help="default: this process's GPU under torchrun, else cuda if available, else cpu")
    parser.add_argument(
        "--eval",
        action="store_true",
        help="evaluate the trained task on the validation split at the end: PQ (panoptic), mIoU (semantic) or "
        "COCO AP (instance)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of the config, repeatable: --set solver.lr=2e-4 --set model.num_queries=50 "
        "--set eval_interval=2 --set keep_checkpoints=3 (values are JSON)",
    )
    parser.set_defaults(run=_train)


def _train(args: argparse.Namespace) -> int:
    from segscope.engine import distributed
    from segscope.engine.train_config import apply_overrides, load_train_config
    from segscope.engine.trainer import Trainer

    config = load_train_config(args.config, batch_size=args.batch_size, num_workers=args.num_workers)
    config = apply_overrides(config, args.set)
    if args.backbone_init is not None:
        config = replace(config, backbone_init=None if args.backbone_init.lower() == "none" else args.backbone_init)
    trainer = Trainer(config, args.data, args.work_dir, device=args.device, init_from=args.init)
    source = args.init or config.backbone_init
    if source and trainer.context.is_main:
        print(f"initialised from {source}; left as initialised: {trainer.skipped_init_keys or 'nothing'}")
    try:
        last = trainer.train(args.max_epochs, resume=args.resume)
        if trainer.context.is_main:
            print(f"last checkpoint: {last}")
        if args.eval:
            trainer.evaluate(last)
    finally:
        distributed.teardown()
    return 0


def _add_eval(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "eval",
        help="evaluate a model on a COCO-format dataset (PQ, mIoU or COCO AP)",
        description="Prints the metric table and writes the figures as JSON.",
    )
    parser.add_argument("--model", "-m", required=True, help="zoo name, Hub id, directory or checkpoint")
    parser.add_argument("--data", "-d", required=True, help="dataset root in the COCO layout")
    parser.add_argument("--task", "-t", required=True, choices=("panoptic", "semantic", "instance"))
    parser.add_argument("--split", default="val")
    parser.add_argument("--out", "-o", help="JSON file for the figures (default: eval_<task>_<split>.json)")
    parser.add_argument("--device")
    parser.set_defaults(run=_eval)


def _eval(args: argparse.Namespace) -> int:
    from segscope.engine import distributed
    from segscope.engine.evaluate import evaluate
    from segscope.loading import load

    context = distributed.setup(args.device)
    try:
        results = evaluate(load(args.model), args.data, args.task, args.split, context.device, context)
    finally:
        distributed.teardown()
    if context.is_main:
        out = Path(args.out or f"eval_{args.task}_{args.split}.json")
        out.write_text(json.dumps(results, indent=2))
        print(f"wrote {out}")
    return 0


def _add_convert(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "convert",
        help="convert a checkpoint of another toolbox to a segscope .safetensors model",
        description="Reads SOURCE without running pickled code, converts its weights for the architecture of "
        "--model, loads them strictly (every key accounted for) and writes one .safetensors file that "
        "carries the config, the categories and the test-time settings.",
    )
    parser.add_argument(
        "source", help="the checkpoint file (a .pth, .pkl or a .zip holding one), or a ModelScope model folder"
    )
    parser.add_argument(
        "--format",
        "-f",
        required=True,
        help="the file's layout, one the architecture of --model reads (Mask2Former: detectron2, mmseg0, mmseg1, "
        "mmdet2, mmdet3; Cascade Mask R-CNN: mmdet2, modelscope)",
    )
    parser.add_argument(
        "--model",
        "-m",
        required=True,
        help="the architecture, categories and test settings the weights are for: a zoo name or a segscope checkpoint",
    )
    parser.add_argument("--out", "-o", required=True, help="the .safetensors file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.set_defaults(run=_convert)


def _convert(args: argparse.Namespace) -> int:
    from segscope.checkpoints.convert import converted_weights
    from segscope.checkpoints.segscope_format import save_model
    from segscope.errors import InputNotFoundError, OptionError
    from segscope.loading import describe
    from segscope.models import build_model

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise OptionError(f"--out must name a .safetensors file, got {out}")
    if out.exists() and not args.overwrite:
        raise OptionError(f"{out} exists; pass --overwrite to replace it")
    if not Path(args.source).exists():
        raise InputNotFoundError(f"checkpoint not found: {args.source}")
    description = describe(args.model)
    model = build_model(description.config)
    converted_weights(args.source, args.format, model)
    save_model(out, model.state_dict(), description)
    print(f"wrote {out} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")
    return 0


def _add_serve(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "serve",
        help="serve a model over HTTP (JSON API, web page), batching requests that arrive together",
        description="POST /v1/segment, GET /v1/models, GET /healthz, a web page at / and the API at /docs and "
        "/openapi.json. Needs the serve extra: pip install 'segscope[serve]'.",
    )
    parser.add_argument("--model", "-m", default="demo", help="zoo name, Hub id, directory or checkpoint")
    parser.add_argument("--task", "-t", choices=("panoptic", "semantic", "instance"), help="default task of requests")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--batch-size", type=int, default=8, help="most images per forward pass; 1: no batching")
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="longest wait for a batch to fill")
    parser.add_argument("--queue-size", type=int, default=64, help="requests held beyond the batch (503 past it)")
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload (413 past it)")
    parser.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image in pixels (413 past it)")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="longest a request waits for its result (504)")
    parser.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    from segscope.service.config import ServiceConfig
    from segscope.service.server import serve

    config = ServiceConfig(
        task=args.task,
        device=args.device,
        batch_size=args.batch_size,
        max_wait_ms=args.max_wait_ms,
        queue_size=args.queue_size,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_pixels=args.max_pixels,
        timeout_s=args.timeout_s,
    )
    serve(args.model, config, host=args.host, port=args.port)
    return 0


def _add_export(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "export",
        help="export a model's network to ONNX or TorchScript for deployment",
        description="Writes the network alone for a fixed input size: a normalized, padded [B,3,H,W] float32 batch "
        "in, the raw outputs out (Mask2Former: class_logits, mask_logits). The config, categories and "
        "preprocessing travel inside the file (ONNX metadata_props, TorchScript extra file segscope.json). "
        "The exported model is then run on a random batch and compared with PyTorch (ONNX: in onnxruntime).",
    )
    parser.add_argument("--model", "-m", required=True, help="zoo name, Hub id, directory or checkpoint")
    parser.add_argument("--format", "-f", required=True, choices=("onnx", "torchscript"))
    parser.add_argument("--out", "-o", required=True, help="the file to write (.onnx or .pt)")
    parser.add_argument(
        "--size", type=int, nargs=2, default=(800, 1216), metavar=("H", "W"),
        help="padded input size, multiples of 32 (default: 800 1216)",
    )
    parser.add_argument("--batch", type=int, default=1, help="images per forward pass (default: 1)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")
    parser.add_argument("--no-check", action="store_true", help="skip running the exported model")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.set_defaults(run=_export)


def _export(args: argparse.Namespace) -> int:
    from segscope.deploy import export_model
    from segscope.loading import load

    report = export_model(
        load(args.model), args.out, args.format, tuple(args.size), args.batch,
        opset=args.opset, check=not args.no_check, overwrite=args.overwrite,
    )
    shape = "x".join(str(side) for side in report.input_shape)
    print(f"wrote {report.path}: input pixel_values [{shape}] -> {', '.join(report.output_names)}")
    if report.max_abs_diff is not None:
        print(f"exported model vs PyTorch on a random batch: max |difference| {report.max_abs_diff:.2e}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    parser = argparse.ArgumentParser(prog="segscope", description="Image segmentation: run, train, evaluate.")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_add_predict, _add_train, _add_eval, _add_models, _add_convert, _add_serve, _add_export):
        add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``segscope`` command.

    segscope's own errors (bad input, see ``segscope.errors``) print one line and exit 2; any
    other exception is a bug and keeps its traceback.
    """
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except SegscopeError as error:
        print(f"segscope: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
