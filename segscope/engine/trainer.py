"""Training Mask2Former on panoptic or semantic data: one process or many under ``torchrun``.

Both tasks share one loop and one loss: ``task_dataset`` picks the data of ``config.task``,
whose ``to_targets`` gives the class-and-mask targets (one per segment or one per class).

Reproducibility: parameters are initialised from ``seed``; every epoch reseeds the global
RNG from ``(seed, epoch)`` and every sample draws its augmentation from a generator seeded
by ``(seed, epoch, index)``. A run resumed from ``epoch_N.pth`` therefore replays epochs
N+1... exactly as an uninterrupted run does.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from segscope.checkpoints.backbone_init import load_backbone_weights, resolve_weights_file
from segscope.checkpoints.safe_load import load_state_dict_strict
from segscope.checkpoints.segscope_format import ModelDescription, trainer_payload
from segscope.data.categories import CategorySet, get_category_set
from segscope.data.coco import CocoInstanceDataset, CocoPanopticDataset
from segscope.data.collate import collate
from segscope.data.semantic import SemanticSegDataset
from segscope.data.transforms import Sample, copy_paste, training_transform
from segscope.engine import distributed
from segscope.engine.checkpointing import (
    copy_atomic,
    epoch_path,
    latest_checkpoint,
    prune_checkpoints,
    read_training_state,
    save_atomic,
)
from segscope.engine.evaluate import evaluate_instances, evaluate_panoptic, evaluate_semantic
from segscope.engine.optim import build_optimizer, build_scheduler
from segscope.engine.train_config import TrainConfig
from segscope.errors import CheckpointError, ConfigError
from segscope.loading import LoadedModel, load
from segscope.models import build_model
from segscope.transforms import normalize

TaskDataset = CocoPanopticDataset | CocoInstanceDataset | SemanticSegDataset

# How ``Trainer.evaluate`` scores each task: PQ for panoptic, mIoU for semantic, COCO AP for instance.
_EVALUATIONS = {"panoptic": evaluate_panoptic, "semantic": evaluate_semantic, "instance": evaluate_instances}
# The figure that picks the best checkpoint, as a path into each task's results.
_HEADLINE = {"panoptic": ("All", "PQ"), "semantic": ("mIoU",), "instance": ("segm", "AP")}


def headline_figure(task: str, results: dict[str, Any]) -> tuple[str, float]:
    """``(name, value)`` of the figure that ranks checkpoints of ``task`` (higher is better)."""
    path = _HEADLINE[task]
    value: Any = results
    for key in path:
        value = value[key]
    return "_".join(path), float(value)


def _seed_for(*parts: int) -> int:
    """A 63-bit seed mixing ``parts`` (stable across processes and Python runs)."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value * 6364136223846793005 + part + 1442695040888963407) % (1 << 63)
    return value


class TrainingSamples(Dataset):
    """A panoptic or semantic dataset as training samples: augmented image and Mask2Former targets.

    Each item is a ``Sample`` (image ``[3,S,S]`` uint8, labels ``[N]``, masks ``[N,S,S]``): the
    targets are made at the original size and augmented with the image, as a label map would be.
    """

    def __init__(self, dataset: TaskDataset, config: TrainConfig, categories: CategorySet) -> None:
        self.dataset = dataset
        self.seed = config.seed
        self.epoch = 0
        self.transform = training_transform(config.crop_size, config.min_scale, config.max_scale)
        self.copy_paste = config.copy_paste
        # Objects that may be pasted: a panoptic dataset's things (stuff is not an object).
        self.pasteable = torch.tensor([c.isthing or config.task == "instance" for c in categories.categories])

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Sample:
        generator = torch.Generator().manual_seed(_seed_for(self.seed, self.epoch, index))
        sample = self._augmented(index, generator)
        if self.copy_paste and float(torch.rand(1, generator=generator)) < self.copy_paste:
            other = int(torch.randint(len(self.dataset), (1,), generator=generator))
            sample = copy_paste(sample, self._augmented(other, generator), self.pasteable, generator)
        return sample

    def _augmented(self, index: int, generator: torch.Generator) -> Sample:
        item = self.dataset[index]
        return self.transform(Sample.from_arrays(item["image"], *self.dataset.to_targets(item)), generator)


def task_dataset(config: TrainConfig, data_root: Path, split: str) -> tuple[TaskDataset, CategorySet]:
    """The ``split`` of ``config.task``'s data under ``data_root`` (layouts: see ``TrainConfig``)
    and the categories its class indices refer to."""
    if config.task == "semantic":
        categories = get_category_set(config.categories)
        image_dir, label_dir = config.semantic_dirs(data_root, split)
        semantic = SemanticSegDataset(
            image_dir, label_dir, categories=categories, label_suffix=config.semantic_label_suffix
        )
        return semantic, categories
    coco = CocoInstanceDataset if config.task == "instance" else CocoPanopticDataset
    dataset = coco(data_root, split)
    return dataset, dataset.categories


class Trainer:
    """Train, checkpoint, resume and evaluate a Mask2Former on panoptic or semantic data.

    Args:
        config: the training configuration (task, model, solver, augmentation, batch size).
        data_root: the data directory in the layout of ``config.task`` (see ``TrainConfig``).
        work_dir: where ``epoch_N.pth``, ``log.jsonl`` and evaluation results go.
        device: defaults to this process's GPU under torchrun, else CUDA if any, else CPU.
        init_from: fine-tune from this model (any ``model=`` value: zoo name, Hub id,
            directory, checkpoint); weights whose shapes differ (the class head, when the
            class count changes) keep their fresh initialisation. Without it the backbone
            starts from ``config.backbone_init`` (ImageNet weights), if set.

    The backbone's BatchNorm is frozen when it starts pretrained, unless
    ``config.freeze_backbone_batchnorm`` says otherwise.
    """

    def __init__(
        self,
        config: TrainConfig,
        data_root: str | Path,
        work_dir: str | Path,
        device: str | None = None,
        init_from: str | Path | None = None,
    ) -> None:
        self.config = config
        self.data_root = Path(data_root)
        self.work_dir = Path(work_dir)
        self.context = distributed.setup(device)
        self.train_set, categories = task_dataset(config, self.data_root, config.split_train)
        if len(categories) != config.model.num_classes:
            raise ConfigError(
                f"the model predicts {config.model.num_classes} classes but {self.data_root} has "
                f"{len(categories)} categories; set model.num_classes to match"
            )
        self.description = ModelDescription(config.model, categories, config.preprocess, config.task)
        torch.manual_seed(config.seed)
        model = build_model(config.model)
        # Names of weights the initialisation left as built (a new class head, output norms).
        self.skipped_init_keys: list[str] = []
        if init_from is not None:
            self.skipped_init_keys = initialise_from(model, init_from)
        elif config.backbone_init is not None:
            self.skipped_init_keys = self._load_backbone_init(model.backbone, config.backbone_init)
        pretrained = init_from is not None or config.backbone_init is not None
        freeze = pretrained if config.freeze_backbone_batchnorm is None else config.freeze_backbone_batchnorm
        self._frozen_norms = (
            [m for m in model.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
            if freeze
            else []
        )
        for norm in self._frozen_norms:
            norm.requires_grad_(False)
        self.model = model.to(self.context.device)
        self.samples = TrainingSamples(self.train_set, config, categories)
        self.sampler = DistributedSampler(
            self.samples,
            num_replicas=self.context.world_size,
            rank=self.context.rank,
            shuffle=True,
            seed=config.seed,
            drop_last=True,
        )
        self.loader = DataLoader(
            self.samples,
            batch_size=config.batch_size,
            sampler=self.sampler,
            num_workers=config.num_workers,
            collate_fn=collate,
            drop_last=True,
            pin_memory=self.context.device.type == "cuda",
        )
        if len(self.loader) == 0:
            raise ConfigError(
                f"{len(self.samples)} training images make no full batch of {config.batch_size} "
                f"per process over {self.context.world_size} process(es)"
            )
        self.optimizer = build_optimizer(self.model, config.solver)
        self.use_amp = config.solver.amp and self.context.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.iteration = 0
        self.epoch = 0
        self._board = None
        if config.tensorboard and self.context.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self._board = SummaryWriter(str(self.work_dir / "tensorboard"))

    def _load_backbone_init(self, backbone: torch.nn.Module, source: str) -> list[str]:
        """``load_backbone_weights`` in every process, the release fetched into the cache once.

        The cache's atomic writes assume one writer per file (rank 0): writers on several
        machines sharing the cache would delete each other's temporary files as abandoned.
        """
        if self.context.is_main:
            resolve_weights_file(source)
        distributed.barrier(self.context)
        return load_backbone_weights(backbone, source)

    @property
    def _network(self) -> torch.nn.Module:
        return self.model.module if isinstance(self.model, DistributedDataParallel) else self.model

    def train(self, max_epochs: int, resume: bool | str | Path = False) -> Path:
        """Train until ``max_epochs`` epochs are done; return the last checkpoint's path.

        ``resume=True`` continues from the newest ``epoch_N.pth`` in the work dir (starting
        fresh if there is none); a path continues from that checkpoint.
        """
        total_iterations = max_epochs * len(self.loader)
        scheduler = build_scheduler(self.optimizer, total_iterations, self.config.solver)
        if resume:
            checkpoint = latest_checkpoint(self.work_dir) if resume is True else Path(resume)
            if checkpoint is not None:
                self._restore(read_training_state(checkpoint), scheduler)
        if self.context.is_distributed and not isinstance(self.model, DistributedDataParallel):
            on_gpu = self.context.device.type == "cuda"
            if on_gpu and not self._frozen_norms:
                # BatchNorm that trains sees one or two images per GPU: pool its statistics over
                # all processes, as the references' SyncBN does (CUDA only, hence not on CPU runs).
                self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            self.model = DistributedDataParallel(self.model, device_ids=[self.context.local_rank] if on_gpu else None)
        last = epoch_path(self.work_dir, self.epoch)
        try:
            while self.epoch < max_epochs:
                self._train_epoch(scheduler, max_epochs)
                self.epoch += 1
                last = epoch_path(self.work_dir, self.epoch)
                if self.context.is_main:
                    save_atomic(self._state(scheduler), last)
                    prune_checkpoints(self.work_dir, self.config.keep_checkpoints)
                distributed.barrier(self.context)
                interval = self.config.eval_interval
                if interval and (self.epoch % interval == 0 or self.epoch == max_epochs):
                    self._evaluate_and_keep_best(last)
        finally:
            if self._board is not None:
                self._board.close()
        return last

    def _evaluate_and_keep_best(self, checkpoint: Path) -> None:
        """Evaluate the model in memory; copy ``checkpoint`` to ``best.pth`` when it scores the
        best figure so far (``best.json`` remembers it across resumes)."""
        results = self.evaluate()
        if not self.context.is_main:
            return
        name, figure = headline_figure(self.config.task, results)
        self._log({"epoch": self.epoch, "iteration": self.iteration, name: figure})
        if self._board is not None:
            self._board.add_scalar(f"val/{name}", figure, self.iteration)
        record = self.work_dir / "best.json"
        best = json.loads(record.read_text()) if record.is_file() else None
        if best is None or figure > best["value"]:
            copy_atomic(checkpoint, self.work_dir / "best.pth")
            record.write_text(json.dumps({"metric": name, "value": figure, "epoch": self.epoch}))

    def _train_epoch(self, scheduler: torch.optim.lr_scheduler.LRScheduler, max_epochs: int) -> None:
        torch.manual_seed(_seed_for(self.config.seed, self.epoch, self.context.rank))
        self.sampler.set_epoch(self.epoch)
        self.samples.epoch = self.epoch
        self.model.train()
        for norm in self._frozen_norms:
            norm.eval()  # use and keep the running statistics
        device = self.context.device
        bar = tqdm(
            self.loader,
            desc=f"epoch {self.epoch + 1}/{max_epochs}",
            disable=not self.context.is_main,
            unit="it",
        )
        started = time.perf_counter()
        for images, targets in bar:
            images = normalize(images.to(device, non_blocking=True), self.config.preprocess)
            targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
            autocast = torch.autocast("cuda", dtype=torch.float16) if self.use_amp else nullcontext()
            with autocast:
                # Every architecture's training forward returns its weighted losses.
                losses = self.model(images, targets)
            loss = torch.stack(list(losses.values())).sum()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at iteration {self.iteration}")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            if self.config.solver.clip_grad_norm > 0:  # 0: no clipping (mmseg's recipes)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.solver.clip_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            scheduler.step()
            self.iteration += 1
            if self.context.is_main and self.iteration % self.config.log_interval == 0:
                record = {
                    "epoch": self.epoch + 1,
                    "iteration": self.iteration,
                    "loss": round(loss.item(), 5),
                    "lr": scheduler.get_last_lr()[0],
                    "seconds": round(time.perf_counter() - started, 2),
                    **{k: round(v.item(), 5) for k, v in losses.items() if "_" not in k.removeprefix("loss_")},
                }
                bar.set_postfix(loss=record["loss"], lr=f"{record['lr']:.2e}")
                self._log(record)
                if self._board is not None:
                    self._board.add_scalar("train/loss", loss.item(), self.iteration)
                    self._board.add_scalar("train/lr", record["lr"], self.iteration)
                    for name, value in losses.items():
                        self._board.add_scalar(f"train/{name}", value.item(), self.iteration)

    def _log(self, record: dict[str, Any]) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        with open(self.work_dir / "log.jsonl", "a") as log:
            log.write(json.dumps(record) + "\n")

    def _state(self, scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict[str, Any]:
        return trainer_payload(
            self._network.state_dict(),
            self.description,
            optimizer=self.optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            epoch=self.epoch,
            iteration=self.iteration,
            train_config=json.dumps(self.config.to_dict()),
        )

    def _restore(self, state: dict[str, Any], scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
        load_state_dict_strict(self._network, state["model"], "resume checkpoint")
        self.optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.iteration = int(state["iteration"])

    def evaluate(self, checkpoint: str | Path | None = None, split: str | None = None) -> dict[str, Any]:
        """Scores of ``checkpoint`` (default: the model in memory) on ``split`` (default: val).

        Panoptic training is scored by PQ/SQ/RQ, semantic training by mIoU/aAcc/mAcc. Writes
        ``eval_<split>.json`` into the work dir and returns the figures.
        """
        if checkpoint is None:
            loaded = LoadedModel(self._network, self.description, "trainer")
        else:
            loaded = load(checkpoint)
        split = split or self.config.split_val
        dataset, _ = task_dataset(self.config, self.data_root, split)
        results = _EVALUATIONS[self.config.task](loaded, dataset, device=self.context.device, context=self.context)
        if self.context.is_main:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            (self.work_dir / f"eval_{split}.json").write_text(json.dumps(results, indent=2))
        return results


def initialise_from(model: torch.nn.Module, source: str | Path) -> list[str]:
    """Copy the weights of ``source`` into ``model`` where names and shapes agree.

    Returns the names of ``model``'s weights left as initialised. The architecture must be the
    same apart from those: a source sharing fewer than half of the weights is refused.
    """
    pretrained = load(source).module.state_dict()
    own = model.state_dict()
    fitting = {k: v for k, v in pretrained.items() if k in own and own[k].shape == v.shape}
    if len(fitting) < len(own) / 2:
        raise CheckpointError(
            f"{source} shares only {len(fitting)} of {len(own)} weights with the model being trained; "
            f"is it the same architecture?"
        )
    model.load_state_dict(fitting, strict=False)
    return sorted(set(own) - set(fitting))
