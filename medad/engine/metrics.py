"""Ignite metrics for MVFA: image AUROC/AP/F1-max and pixel AUROC/AP/F1-max/AUPRO.

The paper fuses zero- and few-shot scores after min-max normalisation over the whole evaluated
set, so no fused value is known before the last image. :class:`AnomalyEvaluation` therefore
spills the raw maps of each batch to a temporary file (memory stays bounded by one batch)
while tracking their ranges, and at the end streams them back in chunks through the fusion
into histogram accumulators (:mod:`medad.model.metric_ops`). With ``fusion="calibrated"`` it uses the
detector's stored ranges instead, as single-image inference does.

Under ``torch.distributed`` (each rank evaluating its own shard, e.g. with
``DistributedSampler(even_divisible=False)``), ``compute()`` gives every rank the result of one
process on the whole set: the raw scores' ranges are all-reduced (min and max) before fusing,
the histogram counts summed, and the image scores and labels all-gathered.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence

import ignite.distributed as idist
import numpy as np
import torch
from ignite.metrics import Metric, MetricsLambda

from medad.model.detector import MVFADetector, unwrap
from medad.model.methods import RawScores
from medad.model.metric_ops import BinnedScores, PROCurve, image_metrics
from medad.model.scoring import FusionRange, fuse

__all__ = ["METRIC_NAMES", "AnomalyEvaluation", "anomaly_metric", "anomaly_metrics"]

#: Names of the values :class:`AnomalyEvaluation` computes.
METRIC_NAMES = (
    "image_auroc",
    "image_ap",
    "image_f1_max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1_max",
    "aupro",
    "selection_score",
)
_MAPS = ("zero_map", "few_map")
_SCORES = ("zero_score", "few_score")


class _Spill:
    """Append-only float32 arrays of equal-shaped records on disk, read back in chunks.

    The file is anonymous (``tempfile.TemporaryFile``: unlinked at once on POSIX), so it goes
    away when it is closed or the process ends, however it ends; a named file was left behind
    by every evaluation, since the last one is only closed by the next ``reset``.
    """

    def __init__(self, directory: str | os.PathLike | None, record_shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.record_shape, self.dtype = record_shape, np.dtype(dtype)
        self.file = tempfile.TemporaryFile(prefix="medad-scores-", suffix=".bin", dir=directory)
        self.count = 0

    def append(self, records: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(records, dtype=self.dtype).tobytes())
        self.count += len(records)

    def chunks(self, size: int):
        record_bytes = math.prod(self.record_shape) * self.dtype.itemsize
        self.file.flush()
        for start in range(0, self.count, size):
            n = min(size, self.count - start)
            # positional reads leave the file's offset, where appends go, as it is
            data = os.pread(self.file.fileno(), n * record_bytes, start * record_bytes)
            yield np.frombuffer(bytearray(data), dtype=self.dtype).reshape(n, *self.record_shape)

    def close(self) -> None:
        self.file.close()


class AnomalyEvaluation(Metric):
    """Accumulate MVFA's raw scores over an evaluation and compute all anomaly metrics at once.

    Args:
        detector: the evaluated :class:`medad.MVFADetector` (its fusion and image-score rules).
        fusion: ``"set"``: min-max over the evaluated set (the paper); ``"calibrated"``: the
            detector's stored calibration (what single-image inference gets).
        spill_dir: folder for the temporary score file (default: the system temp folder).
        bins, pro_thresholds: resolution of the pixel histograms and of the AUPRO curve.
        output_transform: maps the engine output to a dictionary with ``zero_map``,
            ``zero_score``, optionally ``few_map``/``few_score``, ``label``, ``mask`` and
            ``has_mask`` (batched tensors, or a list of per-sample dictionaries). Pixel metrics
            take the images whose ``has_mask`` is true (all, without the key): an abnormal image
            without a mask counts for the image-level metrics only.

    ``compute()`` returns a dictionary with :data:`METRIC_NAMES`; pixel metrics are NaN when no
    image of the set has an annotated anomaly. ``selection_score`` is the authors' model
    selection criterion: pixel AUROC + image AUROC where masks exist, else image AUROC.
    """

    def __init__(
        self,
        detector: torch.nn.Module,
        fusion: str = "set",
        spill_dir: str | os.PathLike | None = None,
        bins: int = 2**20,
        pro_thresholds: int = 4096,
        output_transform: Callable = lambda output: output,
        device: str | torch.device = "cpu",
    ) -> None:
        if fusion not in ("set", "calibrated"):
            raise ValueError(f"fusion must be 'set' or 'calibrated', got {fusion!r}")
        self.detector: MVFADetector = unwrap(detector)
        self.fusion = fusion
        self.spill_dir = spill_dir
        self.bins, self.pro_thresholds = bins, pro_thresholds
        self._spills: dict[str, _Spill] = {}
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        for spill in self._spills.values():
            spill.close()
        self._spills = {}
        self._ranges: dict[str, list[float]] = {}
        self._scores: dict[str, list[np.ndarray]] = {"label": [], "has_mask": [], "blank": [], **{name: [] for name in _SCORES}}
        self._result: dict[str, float] | None = None
        self.image_scores: np.ndarray | None = None
        self.decision_scores: np.ndarray | None = None
        self.labels: np.ndarray | None = None
        self.pixel_curve: BinnedScores | None = None
        self.pro_curve: PROCurve | None = None
        self.fusion_ranges: dict[str, FusionRange] | None = None
        self.map_range: tuple[float, float] | None = None

    def iteration_completed(self, engine) -> None:
        # Ignite would reduce a mapping output to ('y_pred', 'y'); this metric reads several keys.
        self.update(self._output_transform(engine.state.output))

    def update(self, output: Mapping | Sequence[Mapping]) -> None:
        batch = _as_batch(output)
        for name in _MAPS + ("mask",):
            if name in batch:
                values = batch[name].detach().float().reshape(len(batch["zero_score"]), *batch[name].shape[-2:])
                values = values.cpu().numpy()
                if name not in self._spills:
                    dtype = np.uint8 if name == "mask" else np.float32
                    self._spills[name] = _Spill(self.spill_dir, values.shape[1:], dtype)
                self._spills[name].append(values > 0.5 if name == "mask" else values)
                if name != "mask":
                    self._track(name, values)
        for name in _SCORES:
            if name in batch:
                values = batch[name].detach().float().cpu().numpy().reshape(-1)
                self._scores[name].append(values)
                self._track(name, values)
        for name in ("label", "has_mask", "blank"):
            if name in batch:
                self._scores[name].append(batch[name].detach().cpu().numpy().reshape(-1))
        self._result = None

    def _track(self, name: str, values: np.ndarray) -> None:
        low, high = float(values.min()), float(values.max())
        if name in self._ranges:
            low, high = min(low, self._ranges[name][0]), max(high, self._ranges[name][1])
        self._ranges[name] = [low, high]

    def compute(self) -> dict[str, float]:
        if self._result is not None:
            return self._result
        if "zero_map" not in self._spills:
            raise RuntimeError("AnomalyEvaluation must have at least one batch before it can be computed")
        distributed = idist.get_world_size() > 1
        observed = _merge_ranges(idist.all_gather(self._ranges)) if distributed else self._ranges
        has_few = "few_map" in self._spills
        ranges = None
        if has_few:
            if self.fusion == "set":
                ranges = {name: FusionRange(*observed[name]) for name in _MAPS + _SCORES}
            else:
                ranges = self.detector.calibrated_ranges()
        low, high = _final_map_range(observed, ranges)
        pixels = BinnedScores(low, high, self.bins)
        pro = PROCurve(low, high, self.pro_thresholds)
        scores_seen = {name: np.concatenate(values) for name, values in self._scores.items() if values}
        # Scores on the scale of the model's stored thresholds (its calibration), where the set's differ.
        rescale = has_few and self.fusion == "set" and self.detector.is_calibrated
        image_scores, decision_scores, offset, chunk = [], [], 0, 64
        spilled = {name: spill.chunks(chunk) for name, spill in self._spills.items()}
        has_masks = False
        for zero_map in spilled["zero_map"]:
            n = len(zero_map)
            raw = RawScores(
                torch.from_numpy(zero_map),
                torch.from_numpy(scores_seen["zero_score"][offset : offset + n]),
                torch.from_numpy(next(spilled["few_map"])) if has_few else None,
                torch.from_numpy(scores_seen["few_score"][offset : offset + n]) if has_few else None,
            )
            final = self.detector.finalize(raw, ranges)
            image_scores.append(final.score.numpy())
            if rescale:
                decision_scores.append(self.detector.finalize(raw).score.numpy())
            if "mask" in spilled:
                masks = torch.from_numpy(next(spilled["mask"]).astype(bool))
                maps = final.anomaly_map
                if "has_mask" in scores_seen:  # pixel metrics over the images with a pixel annotation
                    annotated = torch.from_numpy(scores_seen["has_mask"][offset : offset + n].astype(bool))
                    masks, maps = masks[annotated], maps[annotated]
                if bool(masks.any()):
                    has_masks = True
                if len(maps):
                    pixels.update(maps, masks)
                    pro.update(maps, masks)
            offset += n
        image_scores, labels = np.concatenate(image_scores), scores_seen["label"]
        #: This process's labels (1 abnormal), in the order of ``image_scores``.
        self.labels = labels
        #: This process's final image scores, in the order it saw the images (for the scores table).
        self.image_scores = image_scores
        #: The same images' scores with the detector's stored calibration, the scale its thresholds were
        #: chosen on (``image_scores`` themselves unless fusing over the set), 0 for images the evaluator
        #: found blank (its ``skip_blank``, as inference): the scores inference gives the same files;
        #: ``None`` for an uncalibrated few-shot detector fused over the set.
        if rescale:
            self.decision_scores = np.concatenate(decision_scores)
        else:
            self.decision_scores = None if has_few and self.fusion == "set" else image_scores
        if self.decision_scores is not None and "blank" in scores_seen:  # the evaluator's blank rule, as inference
            self.decision_scores = np.where(scores_seen["blank"].astype(bool), 0.0, self.decision_scores).astype(np.float32)
        #: The fusion ranges of the final maps (``None``: the detector's own rule) and their (low, high).
        self.fusion_ranges, self.map_range = ranges, (low, high)
        if distributed:
            # Image metrics do not depend on the order of the images: the shards' concatenation will do.
            shards = idist.all_gather((image_scores, labels, has_masks))  # any picklable object: a list in rank order
            image_scores = np.concatenate([shard[0] for shard in shards])
            labels = np.concatenate([shard[1] for shard in shards])
            has_masks = any(shard[2] for shard in shards)
            if has_masks:
                _all_reduce_sum(pixels.counts, pro.pixels.counts, pro.region_weights, pro.regions)
        result = {f"image_{key}": value for key, value in image_metrics(image_scores, labels).items()}
        #: The streamed pixel histograms (ROC, PR) and PRO curve, over all ranks; ``None`` without masks.
        self.pixel_curve, self.pro_curve = (pixels, pro) if has_masks else (None, None)
        if has_masks:
            result.update(
                pixel_auroc=pixels.auroc(), pixel_ap=pixels.average_precision(), pixel_f1_max=pixels.f1_max(), aupro=pro.aupro()
            )
            result["selection_score"] = result["pixel_auroc"] + result["image_auroc"]
        else:
            result.update({name: float("nan") for name in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro")})
            result["selection_score"] = result["image_auroc"]
        self._result = result
        return result


def _final_map_range(observed: Mapping[str, Sequence[float]], ranges: Mapping[str, FusionRange] | None) -> tuple[float, float]:
    """Range of the final maps, from the ``observed`` (low, high) of the raw maps: fusion is
    increasing in both inputs, so it maps extremes to extremes."""
    zero = observed["zero_map"]
    if ranges is None:
        return zero[0], zero[1]
    few = observed["few_map"]
    ends = [
        float(fuse(torch.tensor(z), torch.tensor(f), ranges["zero_map"], ranges["few_map"]))
        for z, f in ((zero[0], few[0]), (zero[1], few[1]))
    ]
    return ends[0], ends[1]


def _merge_ranges(per_rank: Sequence[Mapping[str, Sequence[float]]]) -> dict[str, list[float]]:
    """The (low, high) of each score over all ranks."""
    merged: dict[str, list[float]] = {}
    for ranges in per_rank:
        for name, (low, high) in ranges.items():
            if name in merged:
                low, high = min(low, merged[name][0]), max(high, merged[name][1])
            merged[name] = [low, high]
    return merged


def _all_reduce_sum(*tensors: torch.Tensor) -> None:
    """Sum each tensor over the ranks, in place (ignite reduces on ``idist.device()``, the rank's
    GPU where there is one, and hands the sum back on the tensor's own device)."""
    for tensor in tensors:
        tensor.copy_(idist.all_reduce(tensor, op="SUM"))


def _as_batch(output: Mapping | Sequence[Mapping]) -> dict[str, torch.Tensor]:
    """Engine output as batched tensors, whether or not the evaluator decollated it."""
    if isinstance(output, Mapping):
        return {key: torch.as_tensor(value) for key, value in output.items() if isinstance(value, torch.Tensor)}
    keys = [key for key, value in output[0].items() if isinstance(value, torch.Tensor)]
    return {key: torch.stack([torch.as_tensor(item[key]) for item in output]) for key in keys}


def anomaly_metric(source: AnomalyEvaluation, name: str) -> MetricsLambda:
    """One named value of an :class:`AnomalyEvaluation`, as an Ignite metric.

    Several of these share one ``source``: Ignite updates it once per iteration and the source
    computes all values once per evaluation.
    """
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {name!r}; choose from {METRIC_NAMES}")
    return MetricsLambda(lambda result: result[name], source)


def anomaly_metrics(source: AnomalyEvaluation, prefix: str = "", exclude: Sequence[str] = ("selection_score",)) -> dict[str, MetricsLambda]:
    """Every value of ``source`` as a named Ignite metric (``prefix`` + name), e.g. for an evaluator's
    ``additional_metrics``."""
    return {prefix + name: anomaly_metric(source, name) for name in METRIC_NAMES if name not in exclude}
