"""The ``segscope`` command: predict, train, eval, models."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from segscope.errors import SegscopeError

Command = Callable[[argparse.Namespace], int]


def _add_predict(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "predict",
        help="segment an image, a URL or a folder of images",
        description="Write an overlay PNG and a JSON of segments (COCO RLE masks) per image.",
    )
    parser.add_argument("source", help="image file, http(s) URL or folder of images")
    parser.add_argument("--model", "-m", default="demo", help="zoo name, Hub id, directory or checkpoint")
    parser.add_argument("--task", "-t", choices=("panoptic", "semantic", "instance"), help="default: the model's task")
    parser.add_argument("--out", "-o", default="segscope_out", help="output directory (default: segscope_out)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threshold", type=float, default=0.5, help="instance task: minimum score")
    parser.add_argument("--no-scores", action="store_true", help="leave scores out of the pictures")
    parser.set_defaults(run=_predict)


def _predict(args: argparse.Namespace) -> int:
    from segscope.io import list_images
    from segscope.pipeline import pipeline

    segmenter = pipeline(
        "image-segmentation",
        model=args.model,
        task=args.task,
        device=args.device,
        batch_size=args.batch_size,
        threshold=args.threshold,
    )
    source = Path(args.source)
    if source.is_dir():
        sources: list = list_images(source)
        names = [p.stem for p in sources]
    else:
        sources = [args.source]
        names = [Path(args.source.split("?")[0]).stem or "image"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = segmenter.iter_results(sources, progress=len(sources) > 1)
    for name, source_item, result in zip(names, sources, results):
        result.draw(show_scores=not args.no_scores).save(out / f"{name}.png")
        record = {"source": str(source_item), "model": segmenter.model.name, **result.to_json()}
        (out / f"{name}.json").write_text(json.dumps(record))
    print(f"wrote {len(names)} result(s) to {out}")
    return 0


def _add_models(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("models", help="list the model zoo")
    parser.set_defaults(run=_models)


def _models(args: argparse.Namespace) -> int:
    from segscope.zoo import ZOO

    width = max(len(name) for name in ZOO)
    for name, entry in sorted(ZOO.items()):
        where = entry.source.hub_id or entry.source.url or "shipped with segscope"
        print(f"{name:<{width}}  {entry.default_task:<9}  {entry.card_metric:<28}  {where}")
    return 0


def _add_train(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "train",
        help="train Mask2Former on a COCO-panoptic directory (torchrun for several GPUs)",
        description="Checkpoints go to WORK_DIR/epoch_N.pth after every epoch; --resume continues from the newest.",
    )
    parser.add_argument("--config", "-c", required=True, help="preset name or JSON file")
    parser.add_argument("--data", "-d", required=True, help="dataset root (annotations/panoptic_{split}.json, ...)")
    parser.add_argument("--work-dir", "-w", required=True)
    parser.add_argument("--max-epochs", type=int, required=True)
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the work dir")
    parser.add_argument("--init", help="fine-tune from this model (zoo name, Hub id, directory or checkpoint)")
    parser.add_argument("--batch-size", type=int, help="per process; overrides the config")
    parser.add_argument("--num-workers", type=int, help="data loader workers; overrides the config")
    parser.add_argument("--device", help="default: this process's GPU under torchrun, else cuda if available, else cpu")
    parser.add_argument("--eval", action="store_true", help="evaluate PQ on the validation split at the end")
    parser.set_defaults(run=_train)


def _train(args: argparse.Namespace) -> int:
    from segscope.engine import distributed
    from segscope.engine.train_config import load_train_config
    from segscope.engine.trainer import Trainer

    config = load_train_config(args.config, batch_size=args.batch_size, num_workers=args.num_workers)
    trainer = Trainer(config, args.data, args.work_dir, device=args.device, init_from=args.init)
    if args.init and trainer.context.is_main:
        print(f"initialised from {args.init}; left as initialised: {trainer.skipped_init_keys or 'nothing'}")
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    parser = argparse.ArgumentParser(prog="segscope", description="Image segmentation: run, train, evaluate.")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_add_predict, _add_train, _add_eval, _add_models):
        add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``segscope`` command; errors print one line, not a traceback."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (SegscopeError, FileNotFoundError, ValueError) as error:
        print(f"segscope: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
