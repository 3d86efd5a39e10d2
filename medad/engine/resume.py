"""The training-state and resume policy: resume checkpoints written atomically, found again, and
used only by a run of the same settings (the bundle's ``train#handlers``)."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from typing import Any
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointLoader, CheckpointSaver

from medad.model.checkpoint import CheckpointError, read_checkpoint
from medad.io.files import atomic_write

logger = logging.getLogger(__name__)

__all__ = ["AtomicCheckpointSaver", "AtomicDiskSaver", "RunSettings", "TrainingCheckpoint", "check_resumable", "latest_checkpoint"]


def latest_checkpoint(ckpt_dir: str | os.PathLike, prefix: str = "resume") -> str | None:
    """The newest resume checkpoint (``<prefix>_checkpoint_epoch=N.pt`` or ``..._iteration=N.pt``,
    as MONAI's ``CheckpointSaver`` names them) in ``ckpt_dir``, or None."""
    found = []
    for path in Path(ckpt_dir).glob(f"{prefix}_*.pt"):
        match = re.search(r"(?:epoch|iteration)=(\d+)\.pt$", path.name)
        if match:
            found.append((int(match.group(1)), str(path)))
    return max(found)[1] if found else None


class AtomicDiskSaver(DiskSaver):
    """Ignite's ``DiskSaver`` writing each checkpoint through :func:`medad.io.files.atomic_write`: a run
    killed while saving never leaves a truncated file, a failed save removes its temporary file,
    files get the permissions ``open()`` gives (``0o666`` less the umask), and a full disk is named
    with the file being written (torch reports it as ``unexpected pos``).

    ``filename``: always this name (as MONAI's savers of ``final_filename`` and
    ``key_metric_filename``), instead of the one ignite's ``Checkpoint`` makes.
    """

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None, **kwargs: Any) -> None:
        super().__init__(dirname, **kwargs)
        self.filename = filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        with atomic_write(Path(self.dirname) / (self.filename or filename), "wb") as handle:
            torch.save(checkpoint, handle)

    def remove(self, filename: str) -> None:
        super().remove(self.filename or filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` saving through :class:`AtomicDiskSaver` (resume checkpoints and
    the selected model; ``model.pt`` itself is written by :class:`ModelSaver`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:  # MONAI builds ignite's DiskSaver for each; ignite's Checkpoint takes any
                fixed = getattr(checkpoint.save_handler, "filename", None)
                checkpoint.save_handler = AtomicDiskSaver(self.save_dir, fixed, require_empty=False)


class RunSettings:
    """The settings of a training run, saved in its resume checkpoints (as ``settings``): a run
    resumes only from a checkpoint of the same settings.

    A checkpoint made before a setting existed ran with that setting's value of then
    (:attr:`ADDED_LATER`), so a run with that value still resumes from it.
    """

    #: Settings added after the first resumable checkpoints, with the value every older run had.
    ADDED_LATER: Mapping[str, Any] = {"method": "mvfa", "memory_size": None, "init_checkpoint": None}

    def __init__(self, settings: Mapping[str, Any]) -> None:
        # plain JSON values, as they come back from a checkpoint (paths as text, tuples as lists)
        self.settings = json.loads(json.dumps(dict(settings), default=str))

    def state_dict(self) -> dict[str, Any]:
        return dict(self.settings)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass  # checked before resuming (TrainingCheckpoint.attach), nothing to restore

    def differences(self, saved: Mapping[str, Any]) -> list[str]:
        """``key: saved -> now`` for every setting that differs from ``saved``, except more
        ``epochs``: a resumed run that trains longer equals an uninterrupted run of that length
        (the data order of an epoch depends only on the seed and the epoch, the learning rate
        is constant), so continuing a run for more epochs is allowed."""
        saved = {**self.ADDED_LATER, **saved}
        keys = dict.fromkeys([*saved, *self.settings])
        longer = lambda key: key == "epochs" and isinstance(saved.get(key), int) and saved[key] <= self.settings.get(key, 0)  # noqa: E731
        return [
            f"{key}: {saved.get(key, '(unset)')!r} -> {self.settings.get(key, '(unset)')!r}"
            for key in keys
            if saved.get(key) != self.settings.get(key) and not longer(key)
        ]


def check_resumable(
    save_dir: str | os.PathLike, settings: Mapping[str, Any], resume: bool = True, file_prefix: str = "resume"
) -> None:
    """Raise ``ValueError`` when ``save_dir``'s newest resume checkpoint (which a run with
    ``resume`` would continue) was made with other ``settings``: the message lists the
    differences and how to start afresh."""
    newest = latest_checkpoint(save_dir, file_prefix) if resume else None
    if newest is None:
        return
    try:
        saved = read_checkpoint(newest).get("settings")
    except CheckpointError as error:
        raise CheckpointError(
            f"{error}: the run cannot resume from it; delete {newest} (the run then starts afresh), or set resume "
            "to false"
        ) from error
    now = RunSettings(settings)
    problems = ["it records no settings (made by an older medad)"] if saved is None else now.differences(saved)
    if problems:
        raise ValueError(
            f"{newest}: cannot resume: this checkpoint was made with other settings than this run's:\n  "
            + "\n  ".join(problems)
            + f"\nTo start afresh, delete {Path(save_dir) / (file_prefix + '_*.pt')}, choose another "
            "bundle_root, or set resume to false; to continue that run, rerun it with its own settings."
        )


class TrainingCheckpoint:
    """Checkpoints of the network, optimiser and trainer every ``interval`` epochs (or
    iterations), and resuming from the newest one when training starts again.

    MONAI's ``CheckpointLoader`` and (atomic) ``CheckpointSaver`` do the work; this handler
    only adds the trainer itself to what they save, which a bundle config cannot reference
    from the trainer's own handler list without a cycle, and the run's ``settings``: a
    checkpoint made with other settings (data, target, shots, seed, backbone, learning rate,
    epochs, ...) is not resumed from but refused, with the differences and how to start afresh.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        save_dict: dict,
        interval: int = 1,
        epoch_level: bool = True,
        resume: bool = True,
        file_prefix: str = "resume",
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.save_dir, self.save_dict = str(save_dir), dict(save_dict)
        self.interval, self.epoch_level = interval, epoch_level
        self.resume, self.file_prefix = resume, file_prefix
        self.settings = None if settings is None else RunSettings(settings)

    def attach(self, engine: Engine) -> None:
        objects = {**self.save_dict, "trainer": engine}
        if self.settings is not None:
            objects["settings"] = self.settings
        newest = latest_checkpoint(self.save_dir, self.file_prefix) if self.resume else None
        if newest is not None:
            if self.settings is not None:
                check_resumable(self.save_dir, self.settings.settings, self.resume, self.file_prefix)
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
