"""Site thresholds: the image threshold chosen on a site's own images and stored in ``model.pt``.

A model's own thresholds come from its support set (:mod:`medad.model.decision`); a site replaces the
image threshold with one chosen on its own calibration images, by a rule with a stated
guarantee (``conformal_fpr``: a target false-positive rate from normal images, with conformal
p-values; ``target_sensitivity``: from abnormal images). The scores are the ones inference
decides on (:func:`medad.predict_input`, the path every surface shares), so the threshold means
the same in the bundle's evaluation and inference, in Python and in MONAI Label. The model
records the rule, its target, the data, the counts, the date, the normal scores (for p-values)
and which images it calibrated on, which evaluation then leaves out.

>>> # thresholds = set_site_threshold(detector, items, rule="conformal_fpr", target=0.05, data="site_a/")
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np

from medad.model.checkpoint import save_model
from medad.io.data import calibration_items, fitted_records
from medad.model.decision import (
    CONFORMAL_RULE,
    SITE_RULES,
    Thresholds,
    conformal_threshold,
    decision_rates,
    sensitivity_threshold,
)
from medad.model.detector import MVFADetector, unwrap
from medad.surfaces.predict import predict_input

__all__ = ["SiteThresholdRun", "set_site_threshold"]

logger = logging.getLogger(__name__)


def set_site_threshold(
    detector: MVFADetector,
    items: Sequence[dict],
    rule: str = CONFORMAL_RULE,
    target: float = 0.05,
    data: str = "",
    details: dict[str, Any] | None = None,
    window: str | list[float] | None = None,
    slice_plane: str = "axial",
) -> Thresholds:
    """Score the calibration ``items`` (``image`` path, ``label`` 0 normal / 1 abnormal) as
    inference does, choose the image threshold by ``rule`` and store it in ``detector`` with
    its provenance; the pixel threshold stays the model's. Returns the stored thresholds.

    Args:
        rule: ``"conformal_fpr"`` (``target``: the false-positive rate on normal images, at most
            that for new normal images exchangeable with these) or ``"target_sensitivity"``
            (``target``: the fraction of abnormal images flagged, on these images).
        data: what the images are (recorded): a folder or datalist path.
        details: further provenance to record (split seed, fraction).
        window, slice_plane: preprocessing of volumes (:func:`medad.predict_input`).
    """
    if rule not in SITE_RULES:
        raise ValueError(f"rule must be one of {SITE_RULES}, got {rule!r}")
    if not items:
        raise ValueError(f"{data or 'calibration'}: no calibration images (the model's fitted images are left out)")
    labels = np.array([int(item["label"]) for item in items])
    scores = np.array([predict_input(detector, item["image"], window, slice_plane).score for item in items])
    normal, abnormal = scores[labels == 0], scores[labels == 1]
    if rule == CONFORMAL_RULE:
        if normal.size == 0:
            raise ValueError(f"{data}: a target false-positive rate needs normal calibration images, got none")
        image = conformal_threshold(normal, target)
    else:
        image = sensitivity_threshold(abnormal, target)
    stored = detector.effective_thresholds()
    provenance = {
        "rule": rule,
        "target": float(target),
        "data": str(data),
        "normal": int(normal.size),
        "abnormal": int(abnormal.size),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "on_calibration_images": decision_rates(scores, labels, image),
        **(details or {}),
    }
    detector.thresholds = Thresholds(
        image, detector.thresholds.pixel, rule, detector.thresholds.pixel_rule, tuple(normal.tolist()), provenance
    )
    logger.info(
        "site threshold %.6g (%s, target %g) from %d normal and %d abnormal images of %s (it was %.6g, %s)",
        image, rule, target, normal.size, abnormal.size, data, stored.image, stored.image_rule,
    )
    return detector.thresholds


class SiteThresholdRun:
    """The bundle's ``thresholding`` (``configs/threshold.json``): choose a site threshold on the
    calibration images of ``dataset_dir`` (:func:`medad.io.data.calibration_items`: never an image
    the model was fitted on), record them as fitted (role ``calibration``), and write
    ``save_path`` atomically, keeping the model it replaces in ``versions/``.

    Args:
        network: the detector, loaded from ``save_path``.
        dataset_dir, target: the calibration data set in any layout medad reads.
        rule: :data:`medad.model.decision.SITE_RULES`.
        target_fpr, target_sensitivity: the target of the rule that is chosen.
        fraction, seed: the share of each class drawn for calibration where the data set's
            pool is also the evaluated one, and the draw's seed.
        save_path: the model file.
        window, slice_plane: preprocessing of volumes.
    """

    def __init__(
        self,
        network: Any,
        dataset_dir: str | os.PathLike,
        target: str,
        save_path: str | os.PathLike,
        rule: str = CONFORMAL_RULE,
        target_fpr: float = 0.05,
        target_sensitivity: float = 0.95,
        fraction: float = 0.5,
        seed: int = 0,
        window: str | list[float] | None = None,
        slice_plane: str = "axial",
    ) -> None:
        if rule not in SITE_RULES:
            raise ValueError(f"threshold_rule must be one of {SITE_RULES}, got {rule!r}")
        self.network, self.dataset_dir, self.target, self.save_path = network, dataset_dir, target, save_path
        self.rule, self.fraction, self.seed = rule, fraction, seed
        self.value = target_fpr if rule == CONFORMAL_RULE else target_sensitivity
        self.window, self.slice_plane = window, slice_plane

    def run(self) -> Thresholds:
        detector: MVFADetector = unwrap(self.network).eval()
        # A new site threshold replaces the last one's calibration: only the support images stay out, so
        # that running it again with the same seed takes the same images.
        support = [record for record in detector.fitted if record.get("role") != "calibration"]
        items = calibration_items(self.dataset_dir, self.target, support, self.fraction, self.seed)
        details = {"seed": self.seed, "fraction": self.fraction, "images": len(items)}
        thresholds = set_site_threshold(
            detector, items, self.rule, self.value, str(self.dataset_dir), details, self.window, self.slice_plane
        )
        detector.set_fitted(fitted_records(items, "calibration", self.dataset_dir), role="calibration")
        kept = save_model(detector, self.save_path, keep_previous=True)
        logger.info("saved %s with the site threshold; the model it replaced is kept as %s", self.save_path, kept)
        return thresholds
