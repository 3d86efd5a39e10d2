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

A site replaces the image threshold with one chosen on its own images (:mod:`medad.site`), by
one of two rules on the model's own score scale:

- ``conformal_fpr`` (normal images): split-conformal. With the scores ``r_1..r_n`` of ``n``
  normal calibration images, a new image's p-value is ``(1 + #{r_i >= s}) / (n + 1)``; an image is
  abnormal when ``p <= alpha``. For a new normal image exchangeable with the calibration images,
  ``P(p <= alpha) <= alpha``: the false-positive rate is at most ``alpha`` whatever the scores'
  distribution (:func:`conformal_p_values`, :func:`conformal_threshold`).
- ``target_sensitivity`` (labelled images): the highest threshold at which at least the target
  fraction of the abnormal calibration images is flagged (:func:`sensitivity_threshold`).

Every surface (bundle inference, evaluation, MONAI Label, :func:`medad.predict_input`)
takes :func:`effective_thresholds` unless the user gives a value, and reports the p-value of
each score where the model holds conformal reference scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from medad.checkpoint import Thresholds
from medad.metric_ops import BinnedScores

__all__ = [
    "CONFORMAL_RULE",
    "SENSITIVITY_RULE",
    "conformal_p_values",
    "conformal_threshold",
    "decision_rates",
    "effective_thresholds",
    "f1_best_threshold",
    "map_scale",
    "pixel_f1_threshold",
    "sensitivity_threshold",
]

#: Rule names of the site thresholds (module docstring).
CONFORMAL_RULE = "conformal_fpr"
SENSITIVITY_RULE = "target_sensitivity"

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
    return Thresholds(float(image), float(pixel), image_rule, pixel_rule, stored.reference_scores, stored.provenance)


def conformal_p_values(scores: Sequence[float] | np.ndarray, reference: Sequence[float] | np.ndarray) -> np.ndarray:
    """Split-conformal p-values ``(1 + #{r >= s}) / (n + 1)`` of ``scores`` against the ``n``
    reference (normal calibration) scores; float64, same shape as ``scores``.

    >>> conformal_p_values([0.1, 0.5, 0.95], [0.2, 0.4, 0.6, 0.8]).tolist()
    [1.0, 0.6, 0.2]
    """
    reference = np.sort(np.asarray(reference, dtype=np.float64).reshape(-1))
    if reference.size == 0:
        raise ValueError("conformal p-values need at least one reference score")
    scores = np.asarray(scores, dtype=np.float64)
    at_least = reference.size - np.searchsorted(reference, scores, side="left")  # #{r >= s}
    return (1.0 + at_least) / (reference.size + 1.0)


def conformal_threshold(normal_scores: Sequence[float] | np.ndarray, target_fpr: float) -> float:
    """The image threshold ``t`` with ``score >= t`` exactly when the conformal p-value is at
    most ``target_fpr`` (module docstring): the next float above the ``(n - m)``-th smallest
    normal score, ``m = floor(target_fpr (n + 1)) - 1``.

    Raises ``ValueError`` when ``n < 1 / target_fpr - 1``: no score could then be flagged.

    >>> conformal_threshold([0.2, 0.4, 0.6, 0.8], 0.4) > 0.6
    True
    """
    if not 0 < target_fpr < 1:
        raise ValueError(f"target_fpr must be between 0 and 1, got {target_fpr}")
    ordered = np.sort(np.asarray(normal_scores, dtype=np.float64).reshape(-1))
    allowed = math.floor(target_fpr * (ordered.size + 1) + 1e-9) - 1  # calibration scores that may reach a flagged one
    if allowed < 0:
        needed = math.ceil(1 / target_fpr - 1 - 1e-9)
        raise ValueError(
            f"a false-positive rate of {target_fpr} needs at least {needed} normal calibration images, got "
            f"{ordered.size}: add normal images or raise target_fpr"
        )
    return float(np.nextafter(ordered[ordered.size - 1 - allowed], np.inf))


def sensitivity_threshold(abnormal_scores: Sequence[float] | np.ndarray, target_sensitivity: float) -> float:
    """The highest threshold ``t`` with at least ``target_sensitivity`` of the abnormal scores
    ``>= t``: the ``ceil(target n)``-th highest abnormal score.

    >>> sensitivity_threshold([0.9, 0.3, 0.7, 0.5], 0.75)
    0.5
    """
    if not 0 < target_sensitivity <= 1:
        raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
    ordered = np.sort(np.asarray(abnormal_scores, dtype=np.float64).reshape(-1))[::-1]
    if ordered.size == 0:
        raise ValueError("a target sensitivity needs abnormal calibration images, got none")
    return float(ordered[math.ceil(target_sensitivity * ordered.size - 1e-9) - 1])


def decision_rates(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray, threshold: float,
                   confidence: float = 0.95) -> dict[str, float | int | list[float] | None]:
    """Sensitivity and specificity of ``score >= threshold`` with exact (Clopper-Pearson)
    ``confidence`` intervals; ``None`` for a class without images.

    >>> decision_rates([0.9, 0.2, 0.6, 0.1], [1, 0, 1, 0], 0.5)["sensitivity"]
    1.0
    """
    from scipy.stats import binomtest

    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(int)
    flagged = scores >= threshold
    rates: dict[str, float | int | list[float] | None] = {"threshold": float(threshold), "confidence": confidence}
    for name, label, hit in (("sensitivity", 1, flagged), ("specificity", 0, ~flagged)):
        count, total = int(hit[labels == label].sum()), int((labels == label).sum())
        rates[f"{name}_count"], rates[f"{name}_of"] = count, total
        if total == 0:
            rates[name], rates[f"{name}_ci"] = None, None
            continue
        interval = binomtest(count, total).proportion_ci(confidence_level=confidence, method="exact")
        rates[name], rates[f"{name}_ci"] = count / total, [float(interval.low), float(interval.high)]
    return rates
