"""Ignite handlers for MVFA workflows: few-shot memory and calibration, the scores table,
metrics JSON, and atomic (resumable) checkpoints."""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.data import decollate_batch
from monai.handlers import CheckpointLoader, CheckpointSaver
from monai.utils.enums import CommonKeys as Keys

from medad.detector import unwrap
from medad.io import atomic_write

__all__ = [
    "AtomicCheckpointSaver",
    "FewShotMemoryHandler",
    "MetricsJSONWriter",
    "ScoresWriter",
    "TrainingCheckpoint",
    "latest_checkpoint",
]


class FewShotMemoryHandler:
    """Build the few-shot memory bank and the fusion calibration on a trainer.

    MVFA's memory holds the adapter tokens of the augmented normal support images; the
    calibration stores the min-max ranges of the raw scores over the whole augmented support
    set, so that single images can be fused without the rest of a test set.

    Args:
        items: few-shot items (see :func:`medad.fewshot.fewshot_training_data`).
        batch_size: images per forward pass.
        every: also rebuild every ``every`` epochs (for validation during training); the
            memory is always built when training completes.
    """

    def __init__(self, items: Sequence[dict], batch_size: int = 8, every: int | None = None) -> None:
        self.images = torch.stack([torch.as_tensor(item["image"]) for item in items])
        self.normal = torch.tensor([int(item["label"]) == 0 for item in items])
        if not bool(self.normal.any()):
            raise ValueError("the few-shot items hold no normal image for the memory bank")
        self.batch_size = batch_size
        self.every = every

    def attach(self, engine: Engine) -> None:
        if self.every:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.every), self)
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        detector = unwrap(engine.network)
        was_training = detector.training
        detector.eval()
        detector.build_memory(self.images[self.normal], self.batch_size)
        detector.calibrate(self.images, self.batch_size, labels=(~self.normal).long())
        detector.train(was_training)


class ScoresWriter:
    """Write one row per image or volume (``image``, ``score``, ``label`` where known, the
    scalar outputs named in ``columns`` where present, e.g. ``score_p95`` of volumes, and
    ``anomalous`` at ``threshold`` where given) to ``output_dir/filename`` when the evaluator
    completes. ``threshold="model"`` takes the detector's stored threshold (chosen on its
    support set, see :meth:`medad.MVFADetector.calibrate`) when the run starts, after
    ``CheckpointLoader``; a detector without one gets no ``anomalous`` column.

    Under ``torch.distributed`` every rank must attach it: rank 0 gathers the rows and alone
    writes the file."""

    def __init__(
        self,
        output_dir: str | os.PathLike,
        filename: str = "scores.csv",
        threshold: float | str | None = None,
        columns: Sequence[str] = (),
    ) -> None:
        if isinstance(threshold, str) and threshold != "model":
            raise ValueError(f"threshold must be a number, 'model' or None, got {threshold!r}")
        self.path = Path(output_dir) / filename
        self.threshold, self.columns = threshold, tuple(columns)
        self._threshold: float | None = None
        self.rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def start(self, engine: Engine) -> None:
        self.rows.clear()
        self._threshold = unwrap(engine.network).threshold if self.threshold == "model" else self.threshold

    def collect(self, engine: Engine) -> None:
        output = engine.state.output
        items = output if isinstance(output, list) else decollate_batch(output, detach=True)
        for item in items:
            if "score" not in item:
                continue  # a few-shot detector before calibration has raw scores only
            meta = getattr(item.get(Keys.IMAGE), "meta", {})
            row = {"image": str(meta.get("filename_or_obj", len(self.rows))), "score": float(item["score"])}
            if Keys.LABEL in item:
                row["label"] = int(item[Keys.LABEL])
            row.update({name: float(item[name]) for name in self.columns if name in item})
            if self._threshold is not None:
                row["anomalous"] = int(row["score"] >= self._threshold)
            self.rows.append(row)

    def write(self, engine: Engine) -> None:
        rows = self.rows
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Each rank scored its own shard; rank 0 writes them all. DistributedSampler(shuffle=False)
            # deals item i to rank i % world size, so interleaving the shards restores the list's order.
            shards: list = [None] * dist.get_world_size()
            dist.all_gather_object(shards, self.rows)
            if dist.get_rank() != 0:
                return
            rows = [row for group in itertools.zip_longest(*shards) for row in group if row is not None]
        fields = list(dict.fromkeys(key for row in rows for key in row))
        with atomic_write(self.path, newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)



class MetricsJSONWriter:
    """Write ``engine.state.metrics`` to ``output_dir/filename`` (JSON) when the engine completes."""

    def __init__(self, output_dir: str | os.PathLike, filename: str = "metrics.json") -> None:
        self.path = Path(output_dir) / filename

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        metrics = {name: float(value) for name, value in engine.state.metrics.items()}
        with atomic_write(self.path) as handle:
            json.dump(metrics, handle, indent=2, allow_nan=True)


def latest_checkpoint(ckpt_dir: str | os.PathLike, prefix: str = "resume") -> str | None:
    """The newest resume checkpoint (``<prefix>_checkpoint_epoch=N.pt`` or ``..._iteration=N.pt``,
    as MONAI's ``CheckpointSaver`` names them) in ``ckpt_dir``, or None."""
    found = []
    for path in Path(ckpt_dir).glob(f"{prefix}_*.pt"):
        match = re.search(r"(?:epoch|iteration)=(\d+)\.pt$", path.name)
        if match:
            found.append((int(match.group(1)), str(path)))
    return max(found)[1] if found else None


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` writing every file to a temporary name and renaming it, so a
    run killed while saving never leaves a truncated ``model.pt`` or resume checkpoint.

    MONAI turns ignite's atomic writes off because they used to leave files readable by their
    owner only; ignite now adds group and other read permission after the rename.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                checkpoint.save_handler._atomic = True  # ignite's DiskSaver(atomic=True), set after MONAI built it


class TrainingCheckpoint:
    """Checkpoints of the network, optimiser and trainer every ``interval`` epochs (or
    iterations), and resuming from the newest one when training starts again.

    MONAI's ``CheckpointLoader`` and (atomic) ``CheckpointSaver`` do the work; this handler
    only adds the trainer itself to what they save, which a bundle config cannot reference
    from the trainer's own handler list without a cycle.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        save_dict: dict,
        interval: int = 1,
        epoch_level: bool = True,
        resume: bool = True,
        file_prefix: str = "resume",
    ) -> None:
        self.save_dir, self.save_dict = str(save_dir), dict(save_dict)
        self.interval, self.epoch_level = interval, epoch_level
        self.resume, self.file_prefix = resume, file_prefix

    def attach(self, engine: Engine) -> None:
        objects = {**self.save_dict, "trainer": engine}
        newest = latest_checkpoint(self.save_dir, self.file_prefix) if self.resume else None
        if newest is not None:
            CheckpointLoader(load_path=newest, load_dict=objects, map_location="cpu").attach(engine)
        AtomicCheckpointSaver(
            self.save_dir,
            objects,
            file_prefix=self.file_prefix,
            save_interval=self.interval,
            epoch_level=self.epoch_level,
            n_saved=1,
        ).attach(engine)
        if newest is not None:
            # The saver only prunes its own files: drop the one resumed from once a newer exists.
            event = Events.EPOCH_COMPLETED if self.epoch_level else Events.ITERATION_COMPLETED
            engine.add_event_handler(event(every=self.interval), self._prune, newest)

    def _prune(self, engine: Engine, resumed_from: str) -> None:
        if latest_checkpoint(self.save_dir, self.file_prefix) != resumed_from:
            Path(resumed_from).unlink(missing_ok=True)
