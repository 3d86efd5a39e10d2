"""Ignite handlers for MVFA workflows: few-shot memory and calibration, the scores table,
metrics JSON, and atomic (resumable) checkpoints."""

from __future__ import annotations

import csv
import itertools
import json
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any
from pathlib import Path

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import DiskSaver
from monai.data import decollate_batch
from monai.handlers import CheckpointLoader, CheckpointSaver, MLFlowHandler, StatsHandler, TensorBoardStatsHandler
from monai.utils.enums import CommonKeys as Keys

from medad.checkpoint import CheckpointError, read_checkpoint, save_model
from medad.decision import GIVEN_RULE, conformal_p_values, decision_rates
from medad.detector import MVFADetector, unwrap
from medad.io import atomic_write, strict_json
from medad.metrics import AnomalyEvaluation

logger = logging.getLogger(__name__)

__all__ = [
    "AtomicCheckpointSaver",
    "AtomicDiskSaver",
    "FewShotMemoryHandler",
    "MLflowArtifacts",
    "MetricsJSONWriter",
    "ModelSaver",
    "RunSettings",
    "ScoresWriter",
    "TrainingCheckpoint",
    "check_resumable",
    "for_this_rank",
    "gather_rows",
    "is_saving_rank",
    "latest_checkpoint",
    "mlflow_runs",
]


class FewShotMemoryHandler:
    """Build the few-shot memory bank, the fusion calibration and the decision thresholds.

    MVFA's memory holds the adapter tokens of the augmented normal support images; the
    calibration stores the min-max ranges of the raw scores over the whole augmented support
    set, so that single images can be fused without the rest of a test set; the thresholds
    follow :mod:`medad.decision` against exactly that memory.

    Give it to :class:`medad.engines.MVFATrainer` as ``fewshot_memory`` (not in the handler
    list): the trainer attaches it before every other handler, so that the memory exists before
    any handler saves ``model.pt`` when training completes, whatever the order of the list.

    Args:
        items: few-shot items (see :func:`medad.fewshot.fewshot_training_data`).
        batch_size: images per forward pass.
        every: also rebuild every ``every`` epochs (for validation during training); the
            memory is always built when training completes.
        memory_size: at most that many memory tokens per level (a coreset, see
            :meth:`medad.MVFADetector.build_memory`); ``None``: MVFA's exact memory.
        fitted: records of the support images (:func:`medad.data.fitted_records`), stored with
            the model so that evaluation leaves them out.
    """

    def __init__(
        self,
        items: Sequence[dict],
        batch_size: int = 8,
        every: int | None = None,
        memory_size: int | None = None,
        fitted: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        self.images = torch.stack([torch.as_tensor(item["image"]) for item in items])
        self.normal = torch.tensor([int(item["label"]) == 0 for item in items])
        if not bool(self.normal.any()):
            raise ValueError("the few-shot items hold no normal image for the memory bank")
        # Pixel thresholds from the items with a pixel annotation (an own mask, or all-normal).
        self.annotated = torch.tensor([bool(item.get("has_mask")) for item in items])
        size = self.images.shape[-2:]
        self.masks = torch.stack([
            torch.zeros(1, *size) if item.get("mask") is None else torch.as_tensor(item["mask"]).float() for item in items
        ])
        self.batch_size, self.every, self.memory_size = batch_size, every, memory_size
        self.fitted = list(fitted)

    def attach(self, engine: Engine) -> None:
        if self.every:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.every), self)
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        self.build(unwrap(engine.network))

    def build(self, detector: MVFADetector) -> None:
        """Build ``detector``'s memory (unless its method has none: the ``clip`` baseline),
        calibration and thresholds from the items."""
        was_training = detector.training
        detector.eval()
        start = time.perf_counter()
        if detector.takes_memory:
            detector.build_memory(self.images[self.normal], self.batch_size, self.memory_size)
        detector.calibrate(
            self.images, self.batch_size, labels=(~self.normal).long(), masks=self.masks, annotated=self.annotated
        )
        detector.set_fitted(self.fitted)  # a new support set: earlier support and calibration no longer apply
        detector.train(was_training)
        seconds = time.perf_counter() - start
        logger.info(
            "few-shot memory of %d normal images and calibration on %d support images in %.1f s (%.1f images/s); "
            "thresholds: %s", int(self.normal.sum()), len(self.images), seconds,
            (int(self.normal.sum()) + len(self.images)) / max(seconds, 1e-9), detector.effective_thresholds(),
        )


class ScoresWriter:
    """Write one row per image or volume to ``output_dir/filename`` when the evaluator completes:
    ``image``, ``score`` (the score inference decides on, with the model's calibration),
    ``label`` where known, the scalar outputs named in ``columns`` where present (e.g.
    ``score_p95`` of volumes), the decision ``anomalous`` with the ``threshold`` and the
    ``threshold_rule`` that chose it, and ``p_value`` where the model holds a site's conformal
    reference scores (:mod:`medad.decision`).

    ``threshold="model"`` takes the detector's image threshold (stored with the model, or the
    rule's default) when the run starts, after the model is loaded; a number is used as given
    (rule ``given``); ``None`` writes no decision.

    ``evaluation``: the run's :class:`medad.metrics.AnomalyEvaluation`; ``score`` is then its
    scores on the model's calibration (``decision_scores``), equal to inference's for the same
    file, and with ``fusion="set"`` the paper's scores fused over the evaluated set, on which its
    metrics are computed, are a separate column, ``score_set_fused``.

    Under ``torch.distributed`` every rank must attach it: ``save_rank`` gathers the rows and
    alone writes the file."""

    def __init__(
        self,
        output_dir: str | os.PathLike,
        filename: str = "scores.csv",
        threshold: float | str | None = None,
        columns: Sequence[str] = (),
        evaluation: AnomalyEvaluation | None = None,
        save_rank: int = 0,
    ) -> None:
        if isinstance(threshold, str) and threshold != "model":
            raise ValueError(f"threshold must be a number, 'model' or None, got {threshold!r}")
        self.path = Path(output_dir) / filename
        self.threshold, self.columns, self.evaluation = threshold, tuple(columns), evaluation
        self.save_rank = save_rank
        self._decision: tuple[float, str] | None = None
        self._reference: tuple[float, ...] = ()
        self.rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def start(self, engine: Engine) -> None:
        self.rows.clear()
        model = unwrap(engine.network).effective_thresholds()
        self._reference = model.reference_scores
        if self.threshold is None:
            self._decision = None
        elif self.threshold == "model":
            self._decision = (model.image, model.image_rule)
        else:
            self._decision = (float(self.threshold), GIVEN_RULE)

    def collect(self, engine: Engine) -> None:
        output = engine.state.output
        items = output if isinstance(output, list) else decollate_batch(output, detach=True)
        for item in items:
            if "score" not in item and self.evaluation is None:
                continue  # a few-shot detector before calibration has raw scores only
            meta = getattr(item.get(Keys.IMAGE), "meta", {})
            row = {"image": str(meta.get("filename_or_obj", len(self.rows)))}
            row["score"] = float(item["score"]) if "score" in item else float("nan")
            if Keys.LABEL in item:
                row["label"] = int(item[Keys.LABEL])
            for name in (name for name in self.columns if name in item):
                value = torch.as_tensor(item[name])
                row[name] = int(value) if value.dtype == torch.bool else float(value)
            self.rows.append(row)

    def write(self, engine: Engine) -> None:
        rows, decision = self.rows, self._decision
        if self.evaluation is not None:
            self.evaluation.compute()  # cached: the metrics computed it already
            evaluated, calibrated = self.evaluation.image_scores, self.evaluation.decision_scores
            set_fused = self.evaluation.fusion == "set" and unwrap(engine.network).has_memory
            for n, row in enumerate(rows):
                if calibrated is not None:
                    row["score"] = float(calibrated[n])
                if set_fused:
                    row["score_set_fused"] = float(evaluated[n])
                elif calibrated is None:
                    row["score"] = float(evaluated[n])
            if calibrated is None:
                decision = None  # an uncalibrated few-shot model: no score on its thresholds' scale
        for row in rows:
            if decision is not None:
                row.update(anomalous=int(row["score"] >= decision[0]), threshold=decision[0], threshold_rule=decision[1])
            if self._reference:
                row["p_value"] = float(conformal_p_values([row["score"]], self._reference)[0])
        rows = gather_rows(rows, self.save_rank)
        if rows is None:
            return
        fields = list(dict.fromkeys(key for row in rows for key in row))
        with atomic_write(self.path, newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)


def gather_rows(rows: list[dict], save_rank: int = 0) -> list[dict] | None:
    """All ranks' rows on ``save_rank`` in the data list's order (``None`` on the other ranks);
    ``rows`` itself in a single process (``ignite.distributed``'s gather).

    ``DistributedSampler(shuffle=False)`` deals item i to rank i % world size, so interleaving
    the shards restores the list's order."""
    if idist.get_world_size() == 1:
        return rows
    shards = idist.all_gather(rows)
    if not is_saving_rank(save_rank):
        return None
    return [row for group in itertools.zip_longest(*shards) for row in group if row is not None]


#: Handlers only the saving rank runs (MONAI's loggers and checkpoint savers have no ``save_rank``).
_SAVING_RANK_ONLY = (StatsHandler, TensorBoardStatsHandler, CheckpointSaver)


def is_saving_rank(save_rank: int = 0) -> bool:
    """Whether this process logs and saves: rank ``save_rank`` under ``torch.distributed``, or the
    only process. (``TensorBoardStatsHandler`` opens its event file when it is built, so the
    configs do not even build it elsewhere: ``"_disabled_": "$not medad.handlers.is_saving_rank()"``.)"""
    return idist.get_rank() == save_rank


def for_this_rank(handlers: Sequence[Any], save_rank: int = 0) -> list[Any]:
    """The handlers this process runs under ``torch.distributed``: all of them on ``save_rank``;
    elsewhere all but the loggers and checkpoint savers (medad's writers gather and keep their
    rank logic inside, as MONAI's savers do with ``save_rank``). Used by the multi-GPU overlays."""
    if is_saving_rank(save_rank):
        return list(handlers)
    return [handler for handler in handlers if not isinstance(handler, _SAVING_RANK_ONLY)]


class MetricsJSONWriter:
    """Write ``engine.state.metrics`` to ``output_dir/filename`` (strict JSON: ``null`` where a
    value is undefined, e.g. pixel metrics without masks) when the engine completes, with the
    decision thresholds that apply to the evaluated model (value, rule and provenance, see
    :mod:`medad.decision`) and the fusion of the scores; both are logged too.

    With ``evaluation`` (the run's :class:`medad.metrics.AnomalyEvaluation`) it adds
    ``decision``: sensitivity and specificity of the model's decision (its stored image
    threshold on the scores inference gives) with exact confidence intervals
    (:func:`medad.decision.decision_rates`)."""

    def __init__(
        self,
        output_dir: str | os.PathLike,
        filename: str = "metrics.json",
        fusion: str | None = None,
        evaluation: AnomalyEvaluation | None = None,
        save_rank: int = 0,
    ) -> None:
        self.path = Path(output_dir) / filename
        self.fusion, self.evaluation, self.save_rank = fusion, evaluation, save_rank

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        detector = unwrap(engine.network)
        thresholds = detector.effective_thresholds()
        metrics: dict = {name: float(value) for name, value in engine.state.metrics.items()}
        metrics["thresholds"] = thresholds.summary()
        metrics["fusion"] = self.fusion if detector.has_memory else "none"
        if self.evaluation is not None:
            self.evaluation.compute()  # cached
            scores = self.evaluation.decision_scores
            pairs = None if scores is None else list(zip(scores.tolist(), self.evaluation.labels.tolist()))
            if pairs is not None and idist.get_world_size() > 1:
                pairs = [pair for shard in idist.all_gather(pairs) for pair in shard]
            if pairs is not None:
                metrics["decision"] = decision_rates([s for s, _ in pairs], [label for _, label in pairs], thresholds.image)
                metrics["decision"]["rule"] = thresholds.image_rule
        if not is_saving_rank(self.save_rank):
            return
        logger.info("decision thresholds: %s; fusion of the scores: %s", metrics["thresholds"], metrics["fusion"])
        if "decision" in metrics:
            decision = metrics["decision"]
            logger.info(
                "at the model's threshold %.6g (%s): sensitivity %s, specificity %s", thresholds.image,
                thresholds.image_rule, decision["sensitivity"], decision["specificity"],
            )
        with atomic_write(self.path) as handle:
            json.dump(strict_json(metrics), handle, indent=2, allow_nan=False)


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
    """Ignite's ``DiskSaver`` writing each checkpoint through :func:`medad.io.atomic_write`: a run
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


class ModelSaver:
    """Write ``model.pt`` when training completes, and only then (:func:`medad.checkpoint.save_model`).

    MONAI's ``CheckpointSaver(save_final=True)`` also saves when the run fails, which would leave a
    ``model.pt`` without what completion adds (the few-shot memory, calibration and thresholds,
    built at ``COMPLETED`` by :class:`FewShotMemoryHandler` before any handler runs). This handler
    listens to ``COMPLETED`` alone: an exception, SIGINT or SIGTERM leaves the previous model as it
    was, whatever the order of the handler list.

    Args:
        save_path: the model file.
        selected: a model file that model selection wrote during training (the paper's protocol:
            the best validation so far, see ``configs/paper_selection.json``); when it exists, it
            becomes ``model.pt`` instead of the last state, and is removed.
        save_rank: under ``torch.distributed`` only this rank saves.
    """

    def __init__(self, save_path: str | os.PathLike, selected: str | os.PathLike | None = None, save_rank: int = 0) -> None:
        self.save_path = Path(save_path)
        self.selected = None if selected is None else Path(selected)
        self.save_rank = save_rank

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not is_saving_rank(self.save_rank):
            return
        if self.selected is not None and self.selected.is_file():
            save_model(read_checkpoint(self.selected), self.save_path)
            self.selected.unlink()
            logger.info("saved the selected model (%s) as %s", self.selected.name, self.save_path)
            return
        if self.selected is not None:
            logger.warning("no model was selected during training (no validation ran): saving the last state")
        save_model(unwrap(engine.network), self.save_path)
        logger.info("saved %s", self.save_path)


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


def mlflow_runs(engine: Engine) -> list[tuple[Any, str]]:
    """``(client, run_id)`` of every active MONAI ``MLFlowHandler`` attached to ``engine``, and of
    MLflow's active fluent run if any."""
    runs = []
    # private: MONAI's MLFlowHandler logs through its own client, not MLflow's active run, and the
    # bundle's tracking settings create and attach it, so medad holds no reference to it; ignite's
    # public has_event_handler(handler) needs that reference and it has no public list of attached
    # handlers: its registry (Engine._event_handlers) is read here, and nowhere else.
    for handlers in engine._event_handlers.values():
        for handler, *_ in handlers:
            owner = getattr(handler, "__self__", None)
            if isinstance(owner, MLFlowHandler) and getattr(owner, "cur_run", None) is not None:
                run = (owner.client, owner.cur_run.info.run_id)
                if run[1] not in [known[1] for known in runs]:
                    runs.append(run)
    try:
        import mlflow
    except ImportError:
        return runs
    active = mlflow.active_run()
    if active is not None and active.info.run_id not in [known[1] for known in runs]:
        runs.append((mlflow.MlflowClient(), active.info.run_id))
    return runs


class MLflowArtifacts:
    """Log ``paths`` (files, or folders by name with everything under them) as artifacts of the engine's
    MLflow run(s) when it completes: the runs of the MONAI ``MLFlowHandler`` attached to it
    (``--tracking mlflow``) or MLflow's active run; nothing without one. Attach it before the
    ``MLFlowHandler`` closes its run (bundle handler lists: anywhere, MONAI appends its own last).

    Args:
        paths: what to log; missing paths are skipped.
        artifact_folder: the folder in the run's artifacts.
        save_rank: under ``torch.distributed`` only this rank logs.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], artifact_folder: str | None = None, save_rank: int = 0) -> None:
        self.paths = [Path(path) for path in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
        self.artifact_folder, self.save_rank = artifact_folder, save_rank

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not is_saving_rank(self.save_rank):
            return
        for client, run_id in mlflow_runs(engine):
            for path in self.paths:
                if path.is_dir():  # a folder keeps its name: <artifact_folder>/<folder>/...
                    client.log_artifacts(run_id, str(path), "/".join(filter(None, (self.artifact_folder, path.name))))
                elif path.is_file():
                    client.log_artifact(run_id, str(path), self.artifact_folder)
