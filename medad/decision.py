"""The one threshold rule of medad: which images decide a model's thresholds, and what applies
when it has none.

A trained model stores two thresholds (:class:`medad.checkpoint.Thresholds`), chosen when its
few-shot memory and calibration are built, against exactly the memory it is saved with:

- **image** (is an image abnormal: ``score >= image``): with abnormal and normal support images,
  the threshold of highest F1 over the support set's final scores (rule ``support_f1``).
- **pixel** (is a pixel anomalous: ``map >= pixel``): with support masks, the threshold of
  highest F1 over the support pixels (abnormal images' masks, normal images all-normal; rule
  ``support_pixel_f1``); without masks, the image threshold where the image score is the
  map's maximum, so that an image is abnormal exactly when one of its pixels is labelled
  (rule ``image_threshold``).
- a model without stored thresholds (a zero-shot model) uses the prior of MVFA's zero-shot
  outputs: half the number of adapted levels, where the abnormal probability summed over the
  levels exceeds one half on average (rule ``zero_shot_prior``); a few-shot model without a
  threshold of its own (no labels in its support set; the pixel threshold of a data set without
  masks, whose image score is the detection score) uses 0.5, the middle of the calibrated range
  (``calibrated_midpoint``).

Every surface (bundle inference, evaluation, MONAI Label, :meth:`medad.MVFADetector.predict_file`)
takes :func:`effective_thresholds` unless the user gives a value.
"""

from __future__ import annotations

import numpy as np
import torch

from medad.checkpoint import Thresholds
from medad.metric_ops import BinnedScores

__all__ = ["effective_thresholds", "f1_best_threshold", "map_scale", "pixel_f1_threshold"]

#: Bins of the pixel-threshold search over the support maps' range.
_PIXEL_BINS = 2**16


def f1_best_threshold(scores: torch.Tensor, labels: torch.Tensor) -> float | None:
    """The threshold ``t`` (one of ``scores``) of highest F1 for ``score >= t``; ``None`` unless
    ``labels`` (1 abnormal) hold both classes.

    >>> f1_best_threshold(torch.tensor([0.1, 0.4, 0.35, 0.8], dtype=torch.float64), torch.tensor([0, 0, 1, 1]))
    0.35
    """
    labels = labels.reshape(-1).long().cpu()
    if not 0 < int(labels.sum()) < labels.numel():
        return None
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(labels.numpy(), scores.reshape(-1).double().cpu().numpy())
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return float(thresholds[int(np.argmax(f1[:-1]))])


def pixel_f1_threshold(maps: torch.Tensor, masks: torch.Tensor) -> float | None:
    """The map threshold of highest pixel F1, maps ``(N, H, W)`` against masks of the same shape
    (binned over the maps' range, :class:`medad.metric_ops.BinnedScores`); ``None`` without
    positive pixels or for constant maps."""
    low, high = float(maps.min()), float(maps.max())
    if not bool(masks.any()) or not high > low:
        return None
    binned = BinnedScores(low, high, bins=_PIXEL_BINS)
    binned.update(maps, masks)
    return binned.f1_best_threshold()


def map_scale(levels: int, has_memory: bool) -> tuple[float, float]:
    """The range ``(low, high)`` of a model's final maps by construction, one colour scale for
    every image it scores: a model with a memory bank fuses min-max normalised scores with its
    stored calibration, so its support set's maps span ``(0, 1)`` exactly (new images may exceed
    it); a zero-shot model's map sums the abnormal probability of ``levels`` levels: ``(0, levels)``."""
    return (0.0, 1.0) if has_memory else (0.0, float(levels))


def effective_thresholds(stored: Thresholds, levels: int, has_memory: bool) -> Thresholds:
    """The thresholds that apply: the stored ones, the rule's default where one is missing (the
    middle of :func:`map_scale`)."""
    low, high = map_scale(levels, has_memory)
    default, rule = 0.5 * (low + high), "calibrated_midpoint" if has_memory else "zero_shot_prior"
    image, image_rule = (stored.image, stored.image_rule) if stored.image is not None else (default, rule)
    pixel, pixel_rule = (stored.pixel, stored.pixel_rule) if stored.pixel is not None else (default, rule)
    return Thresholds(float(image), float(pixel), image_rule, pixel_rule)
