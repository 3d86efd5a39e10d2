"""Ignite handlers for MVFA workflows: few-shot memory and calibration, the scores table, the
metrics JSON and the selected model, and which rank runs what. The resume policy lives in
:mod:`medad.engine.resume`, experiment tracking in :mod:`medad.engine.tracking`."""

from __future__ import annotations

import csv
import itertools
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any
from pathlib import Path

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from monai.data import decollate_batch
from monai.handlers import CheckpointSaver, StatsHandler, TensorBoardStatsHandler
from monai.utils.enums import CommonKeys as Keys

from medad.model.checkpoint import read_checkpoint, save_model
from medad.model.decision import GIVEN_RULE, checked_threshold_setting, conformal_p_values, decision_rates
from medad.model.detector import MVFADetector, unwrap
from medad.io.files import atomic_write, strict_json
from medad.engine.metrics import AnomalyEvaluation

logger = logging.getLogger(__name__)

__all__ = [
    "FewShotMemoryHandler",
    "MetricsJSONWriter",
    "ModelSaver",
    "ScoresWriter",
    "for_this_rank",
    "gather_rows",
    "is_saving_rank",
    "output_items",
    "write_rows",
]


class FewShotMemoryHandler:
    """Build the few-shot memory bank, the fusion calibration and the decision thresholds.

    MVFA's memory holds the adapter tokens of the augmented normal support images; the
    calibration stores the min-max ranges of the raw scores over the whole augmented support
    set, so that single images can be fused without the rest of a test set; the thresholds
    follow :mod:`medad.model.decision` against exactly that memory.

    Give it to :class:`medad.engine.engines.MVFATrainer` as ``fewshot_memory`` (not in the handler
    list): the trainer attaches it before every other handler, so that the memory exists before
    any handler saves ``model.pt`` when training completes, whatever the order of the list.

    Args:
        items: few-shot items (see :func:`medad.engine.fewshot.fewshot_training_data`).
        batch_size: images per forward pass.
        every: also rebuild every ``every`` epochs (for validation during training); the
            memory is always built when training completes.
        memory_size: at most that many memory tokens per level (a coreset, see
            :meth:`medad.MVFADetector.build_memory`); ``None``: MVFA's exact memory.
        fitted: records of the support images (:func:`medad.io.data.fitted_records`), stored with
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
    reference scores (:mod:`medad.model.decision`).

    ``threshold="model"`` takes the detector's image threshold (stored with the model, or the
    rule's default) when the run starts, after the model is loaded; a number is used as given
    (rule ``given``); ``None`` writes no decision.

    ``evaluation``: the run's :class:`medad.engine.metrics.AnomalyEvaluation`; ``score`` is then its
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
        self.path = Path(output_dir) / filename
        self.threshold, self.columns, self.evaluation = checked_threshold_setting(threshold), tuple(columns), evaluation
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
        for item in output_items(engine):
            row = self.row(item, len(self.rows))
            if row is not None:
                self.rows.append(row)

    def row(self, item: Mapping[str, Any], number: int) -> dict | None:
        """The row of one output item (``number``: its name where its image has no file name),
        without the decision; ``None`` for a few-shot detector before calibration (raw scores only)."""
        if "score" not in item and self.evaluation is None:
            return None
        meta = getattr(item.get(Keys.IMAGE), "meta", {})
        row = {"image": str(meta.get("filename_or_obj", number))}
        row["score"] = float(item["score"]) if "score" in item else float("nan")
        if Keys.LABEL in item:
            row["label"] = int(item[Keys.LABEL])
        for name in (name for name in self.columns if name in item):
            value = torch.as_tensor(item[name])
            row[name] = int(value) if value.dtype == torch.bool else float(value)
        return row

    def decide(self, row: dict, decision: tuple[float, str] | None) -> dict:
        """``row`` with the decision at ``decision`` (threshold, rule) where there is one, and its
        conformal ``p_value`` where the model holds reference scores."""
        if decision is not None:
            row.update(anomalous=int(row["score"] >= decision[0]), threshold=decision[0], threshold_rule=decision[1])
        if self._reference:
            row["p_value"] = float(conformal_p_values([row["score"]], self._reference)[0])
        return row

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
        rows = gather_rows([self.decide(row, decision) for row in rows], self.save_rank)
        if rows is not None:
            write_rows(self.path, rows)


def output_items(engine: Engine) -> list[dict]:
    """The items of the engine's last output (postprocessing decollates them; else decollated here)."""
    output = engine.state.output
    return output if isinstance(output, list) else decollate_batch(output, detach=True)


def write_rows(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> None:
    """``rows`` as a CSV table at ``path`` (atomically), with the columns of all rows in their
    first appearance's order."""
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with atomic_write(path, newline="") as handle:
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
    configs do not even build it elsewhere: ``"_disabled_": "$not medad.engine.handlers.is_saving_rank()"``.)"""
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
    :mod:`medad.model.decision`) and the fusion of the scores; both are logged too.

    With ``evaluation`` (the run's :class:`medad.engine.metrics.AnomalyEvaluation`) it adds
    ``decision``: sensitivity and specificity of the model's decision (its stored image
    threshold on the scores inference gives) with exact confidence intervals
    (:func:`medad.model.decision.decision_rates`)."""

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


class ModelSaver:
    """Write ``model.pt`` when training completes, and only then (:func:`medad.model.checkpoint.save_model`).

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
