"""The one threshold rule of medad: which images decide a model's thresholds, and what applies
when it has none. Every rule's name (stored with the thresholds in ``model.pt``) is a constant here.

A trained model stores two thresholds (:class:`Thresholds`), chosen when its few-shot memory and
calibration are built, against exactly the memory it is saved with (:func:`support_thresholds`):

- **image** (is an image abnormal: ``score >= image``): with abnormal and normal support images,
  the threshold of highest F1 over the support set's final scores (:data:`SUPPORT_F1_RULE`).
- **pixel** (is a pixel anomalous: ``map >= pixel``): with support masks, the threshold of
  highest F1 over the support pixels (abnormal images' masks, normal images all-normal;
  :data:`SUPPORT_PIXEL_F1_RULE`); without masks, the image threshold where the image score is
  the map's maximum, so that an image is abnormal exactly when one of its pixels is labelled
  (:data:`IMAGE_THRESHOLD_RULE`).
- a model adapted to normal images only (:mod:`medad.engine.adaptation`) stores the highest held-out
  score and map value of those images (:data:`HELD_OUT_RULE`).
- a model without stored thresholds (a zero-shot model) uses the prior of MVFA's zero-shot
  outputs: half the number of adapted levels, where the abnormal probability summed over the
  levels exceeds one half on average (:data:`ZERO_SHOT_PRIOR_RULE`); a few-shot model without a
  threshold of its own (no labels in its support set; the pixel threshold of a data set without
  masks, whose image score is the detection score) uses 0.5, the middle of the calibrated range
  (:data:`CALIBRATED_MIDPOINT_RULE`).

A site replaces the image threshold with one chosen on its own images (:mod:`medad.engine.site`), by
one of two rules on the model's own score scale (:data:`SITE_RULES`):

- ``conformal_fpr`` (normal images): split-conformal. With the scores ``r_1..r_n`` of ``n``
  normal calibration images, a new image's p-value is ``(1 + #{r_i >= s}) / (n + 1)``; an image is
  abnormal when ``p <= alpha``. For a new normal image exchangeable with the calibration images,
  ``P(p <= alpha) <= alpha``: the false-positive rate is at most ``alpha`` whatever the scores'
  distribution (:func:`conformal_p_values`, :func:`conformal_threshold`).
- ``target_sensitivity`` (labelled images): the highest threshold at which at least the target
  fraction of the abnormal calibration images is flagged (:func:`sensitivity_threshold`).

Every surface (bundle inference, evaluation, MONAI Label, :func:`medad.predict_input`)
takes :func:`effective_thresholds` unless the user gives a value (:data:`GIVEN_RULE`), and reports
the p-value of each score where the model holds conformal reference scores.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from medad.model.metric_ops import BinnedScores

__all__ = [
    "CALIBRATED_MIDPOINT_RULE",
    "CONFORMAL_RULE",
    "GIVEN_RULE",
    "HELD_OUT_RULE",
    "IMAGE_THRESHOLD_RULE",
    "NO_RULE",
    "SENSITIVITY_RULE",
    "SITE_RULES",
    "SUPPORT_F1_RULE",
    "SUPPORT_PIXEL_F1_RULE",
    "ZERO_SHOT_PRIOR_RULE",
    "Thresholds",
    "conformal_p_values",
    "conformal_threshold",
    "decision_rates",
    "effective_thresholds",
    "f1_best_threshold",
    "map_scale",
    "pixel_f1_threshold",
    "sensitivity_threshold",
    "support_thresholds",
]

# Rule names, stored with each threshold in model files (the strings are the file format).
#: No threshold of the model's own (stored ``None``); :func:`effective_thresholds` supplies a default.
NO_RULE = "none"
#: A threshold given by the user (a run's ``threshold``, :func:`medad.predict_input`'s arguments).
GIVEN_RULE = "given"
#: Image threshold of highest F1 over the support set's final scores (:func:`f1_best_threshold`).
SUPPORT_F1_RULE = "support_f1"
#: Pixel threshold of highest pixel F1 over the support maps against their masks (:func:`pixel_f1_threshold`).
SUPPORT_PIXEL_F1_RULE = "support_pixel_f1"
#: Pixel threshold taken from the image one (image score = map maximum, support without masks).
IMAGE_THRESHOLD_RULE = "image_threshold"
#: Highest held-out image score and map value of normal images (:func:`medad.engine.adaptation.adapt_to_normal_images`).
HELD_OUT_RULE = "normal_heldout_max"
#: Site image threshold of split-conformal false-positive rate on normal images (:func:`conformal_threshold`).
CONFORMAL_RULE = "conformal_fpr"
#: Site image threshold of a target sensitivity on abnormal images (:func:`sensitivity_threshold`).
SENSITIVITY_RULE = "target_sensitivity"
#: Default of a model without memory: the middle of the zero-shot map range (:func:`map_scale`).
ZERO_SHOT_PRIOR_RULE = "zero_shot_prior"
#: Default of a few-shot model without a threshold of its own: 0.5, the middle of the calibrated range.
CALIBRATED_MIDPOINT_RULE = "calibrated_midpoint"

#: The rules a site threshold is chosen by (:mod:`medad.engine.site`).
SITE_RULES = (CONFORMAL_RULE, SENSITIVITY_RULE)

#: Bins of the pixel-threshold search over the support maps' range.
_PIXEL_BINS = 2**16


@dataclass(frozen=True)
class Thresholds:
    """Decision thresholds of a trained model and the rule that chose each (stored in its
    description, :class:`medad.model.checkpoint.ModelDescription`).

    ``image``: an image (or volume) is abnormal when its score is at least this; ``pixel``: a
    pixel is labelled anomalous when its map value is at least this. ``None`` where the model
    has no threshold of its own (see :func:`effective_thresholds`); ``image_rule`` and
    ``pixel_rule``: the rule names of this module. ``reference_scores``: the sorted scores of the
    normal images a site calibrated on, from which every surface reports each score's conformal
    p-value (:func:`conformal_p_values`); ``provenance``: how a site threshold was chosen (rule
    parameters, data, counts, date).
    """

    image: float | None = None
    pixel: float | None = None
    image_rule: str = NO_RULE
    pixel_rule: str = NO_RULE
    reference_scores: tuple[float, ...] = ()
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "reference_scores", tuple(sorted(float(value) for value in self.reference_scores)))
        object.__setattr__(self, "provenance", dict(self.provenance))

    def summary(self) -> dict[str, Any]:
        """The thresholds, their rules and provenance as plain values, with the number of reference
        scores in place of the scores themselves (for metrics files, logs and reports).

        Example:
            >>> Thresholds(0.7, 0.6, SUPPORT_F1_RULE, IMAGE_THRESHOLD_RULE, (0.2, 0.1)).summary()
            {'image': 0.7, 'pixel': 0.6, 'image_rule': 'support_f1', 'pixel_rule': 'image_threshold', 'reference_scores': 2}
        """
        summary = {"image": self.image, "pixel": self.pixel, "image_rule": self.image_rule, "pixel_rule": self.pixel_rule}
        if self.reference_scores:
            summary["reference_scores"] = len(self.reference_scores)
        if self.provenance:
            summary["provenance"] = dict(self.provenance)
        return summary


def f1_best_threshold(scores: torch.Tensor, labels: torch.Tensor) -> float | None:
    """The threshold ``t`` (one of ``scores``) of highest F1 for ``score >= t``; ``None`` unless
    ``labels`` (1 abnormal) hold both classes.

    Example:
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
    (binned over the maps' range, :class:`medad.model.metric_ops.BinnedScores`); ``None`` without
    positive pixels or for constant maps.

    Example (the lowest bin edge of highest F1: just above the highest normal pixel, 0.25):
        >>> maps = torch.tensor([[[0.0, 0.25], [0.5, 1.0]]])
        >>> pixel_f1_threshold(maps, maps >= 0.5)
        0.2500152587890625
    """
    # Not sklearn's precision_recall_curve: that sorts every support pixel; bin counts keep the
    # memory fixed, and the threshold is a bin edge, which sklearn would not give identically.
    low, high = float(maps.min()), float(maps.max())
    if not bool(masks.any()) or not high > low:
        return None
    binned = BinnedScores(low, high, bins=_PIXEL_BINS)
    binned.update(maps, masks)
    return binned.f1_best_threshold()


def checked_threshold_setting(threshold: float | str | None) -> float | str | None:
    """A run's ``threshold`` setting as given, once checked: a number, ``"model"`` (the model's
    own, :func:`effective_thresholds`) or ``None`` (no decision).

    Example:
        >>> checked_threshold_setting("model"), checked_threshold_setting(0.4)
        ('model', 0.4)
    """
    if isinstance(threshold, str) and threshold != "model":
        raise ValueError(f"threshold must be a number, 'model' or None, got {threshold!r}")
    return threshold


def map_scale(levels: int, has_memory: bool) -> tuple[float, float]:
    """The range ``(low, high)`` of a model's final maps by construction, one colour scale for
    every image it scores: a model with a memory bank fuses min-max normalised scores with its
    stored calibration, so its support set's maps span ``(0, 1)`` exactly (new images may exceed
    it); a zero-shot model's map sums the abnormal probability of ``levels`` levels: ``(0, levels)``.

    Example:
        >>> map_scale(4, has_memory=False), map_scale(4, has_memory=True)
        ((0.0, 4.0), (0.0, 1.0))
    """
    return (0.0, 1.0) if has_memory else (0.0, float(levels))


def effective_thresholds(stored: Thresholds, scale: tuple[float, float], has_memory: bool) -> Thresholds:
    """The thresholds that apply: the stored ones, the rule's default where one is missing (the
    middle of the model's map ``scale``, :func:`map_scale` for MVFA's scoring).

    Example:
        >>> applied = effective_thresholds(Thresholds(0.7, None, SUPPORT_F1_RULE), (0.0, 1.0), has_memory=True)
        >>> applied.image, applied.image_rule, applied.pixel, applied.pixel_rule
        (0.7, 'support_f1', 0.5, 'calibrated_midpoint')
        >>> effective_thresholds(Thresholds(), map_scale(4, has_memory=False), has_memory=False).image
        2.0
    """
    low, high = scale
    default, rule = 0.5 * (low + high), CALIBRATED_MIDPOINT_RULE if has_memory else ZERO_SHOT_PRIOR_RULE
    image, image_rule = (stored.image, stored.image_rule) if stored.image is not None else (default, rule)
    pixel, pixel_rule = (stored.pixel, stored.pixel_rule) if stored.pixel is not None else (default, rule)
    return Thresholds(float(image), float(pixel), image_rule, pixel_rule, stored.reference_scores, stored.provenance)


def support_thresholds(
    scores: torch.Tensor,
    maps: torch.Tensor,
    labels: torch.Tensor | None = None,
    masks: torch.Tensor | None = None,
    annotated: torch.Tensor | None = None,
    image_score_from_map: bool = False,
) -> Thresholds:
    """The thresholds a support set decides (module docstring), from its final ``scores`` ``(N,)``
    and maps ``(N, H, W)``: with ``labels`` ``(N,)`` (1 abnormal) of both classes the image
    threshold of highest F1 (:data:`SUPPORT_F1_RULE`); with it and ``masks`` (``N * H * W``
    elements, zeros for normal images) the pixel threshold of highest pixel F1 over the
    ``annotated`` images (bool ``(N,)``, default all; :data:`SUPPORT_PIXEL_F1_RULE`); where that
    gives none and ``image_score_from_map``, the image threshold (:data:`IMAGE_THRESHOLD_RULE`);
    otherwise ``None`` with :data:`NO_RULE`.

    Example:
        >>> scores = torch.tensor([0.25, 0.75], dtype=torch.float64)
        >>> maps = torch.tensor([[[0.0, 0.25]], [[0.5, 1.0]]])
        >>> def rules(t): return t.image, t.pixel, t.image_rule, t.pixel_rule
        >>> rules(support_thresholds(scores, maps, torch.tensor([0, 1]), image_score_from_map=True))
        (0.75, 0.75, 'support_f1', 'image_threshold')
        >>> rules(support_thresholds(scores, maps, torch.tensor([0, 1]), masks=maps >= 0.5))
        (0.75, 0.2500152587890625, 'support_f1', 'support_pixel_f1')
        >>> rules(support_thresholds(scores, maps))
        (None, None, 'none', 'none')
    """
    image = None if labels is None else f1_best_threshold(scores, labels)
    pixel, pixel_rule = None, NO_RULE
    if masks is not None and image is not None:
        keep = torch.ones(len(maps), dtype=torch.bool) if annotated is None else annotated.bool().cpu()
        maps, masks = maps.float().cpu()[keep], masks.reshape(maps.shape).bool().cpu()[keep]
        pixel = pixel_f1_threshold(maps, masks) if len(maps) else None
        pixel_rule = SUPPORT_PIXEL_F1_RULE if pixel is not None else NO_RULE
    if pixel is None and image is not None and image_score_from_map:
        pixel, pixel_rule = image, IMAGE_THRESHOLD_RULE
    return Thresholds(image, pixel, SUPPORT_F1_RULE if image is not None else NO_RULE, pixel_rule)


def conformal_p_values(scores: Sequence[float] | np.ndarray, reference: Sequence[float] | np.ndarray) -> np.ndarray:
    """Split-conformal p-values ``(1 + #{r >= s}) / (n + 1)`` of ``scores`` against the ``n``
    reference (normal calibration) scores; float64, same shape as ``scores``.

    Example:
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

    Example (just above 0.6: a score above it has the p-value (1 + 1) / 5 = 0.4, a score of 0.6 has 0.6):
        >>> conformal_threshold([0.2, 0.4, 0.6, 0.8], 0.4)
        0.6000000000000001
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

    Example:
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

    Example:
        >>> rates = decision_rates([0.9, 0.2, 0.6, 0.1], [1, 0, 1, 0], 0.5)
        >>> rates["sensitivity"], rates["sensitivity_count"], rates["sensitivity_of"]
        (1.0, 2, 2)
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
