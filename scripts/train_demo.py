"""Reproduce the demo model shipped in ``segscope/weights/demo.safetensors``.

Writes the synthetic shapes data set (256 training and 64 held-out images, seed 0), trains
the ``mask2former-tiny-synthetic`` config from scratch on the CPU, evaluates PQ on the
held-out split and exports the weights (float16) with their description to
``WORK_DIR/demo.safetensors``:

    python scripts/train_demo.py --work-dir work_dirs/demo --epochs 40

Replacing the shipped file is a deliberate act: ``--export segscope/weights/demo.safetensors``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from segscope.checkpoints.segscope_format import read_model, save_model
from segscope.data.synthetic import write_synthetic_panoptic
from segscope.engine.train_config import load_train_config
from segscope.engine.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=Path("work_dirs/demo"))
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--export", type=Path, help="default: WORK_DIR/demo.safetensors")
    args = parser.parse_args()
    export = args.export or args.work_dir / "demo.safetensors"

    data = write_synthetic_panoptic(args.work_dir / "data", num_train=256, num_val=64, seed=0)
    trainer = Trainer(load_train_config("mask2former-tiny-synthetic"), data, args.work_dir, device="cpu")
    last = trainer.train(max_epochs=args.epochs, resume=args.resume)
    results = trainer.evaluate(last, split="val")
    state_dict, description = read_model(last)
    save_model(export, {k: v.half() if v.is_floating_point() else v for k, v in state_dict.items()}, description)
    summary = {
        "checkpoint": str(last),
        "exported": str(export),
        **{group: results[group] for group in ("All", "Things", "Stuff")},
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
