"""The inference pipeline's scoring, shared by the bundle and :func:`medad.predict_input`: the
MONAI inferer that turns images into raw anomaly scores and volumes into final scores slice by
slice, and :func:`final_scores`, the one step from its output to the final map, score and
blank flag."""

from __future__ import annotations

from typing import Any

import torch
from monai.inferers import Inferer
from torch import nn

from medad.model.detector import MVFADetector, unwrap
from medad.model.methods import AnomalyScores, RawScores
from medad.engine.volumes import DEFAULT_SLICE_BATCH, VolumeScores, predict_images, score_volumes

__all__ = ["AnomalyInferer", "final_scores"]


class AnomalyInferer(Inferer):
    """Run an :class:`medad.MVFADetector` in chunks of at most ``batch_size`` images or slices
    (memory bounded by the chunk, not the batch or the volume).

    - Images ``(B, 3, S, S)`` at the model's size: :class:`medad.RawScores` for the whole batch
      (fused by the evaluator, over the set or with the stored calibration).
    - Volumes ``(B, C, H, W, D)`` from ``mvfa_preprocessing(volume=True)``: final
      :class:`medad.engine.volumes.VolumeScores`, scored slice by slice along the last axis by
      :func:`medad.engine.volumes.score_volumes` (``batch_size`` slices per forward pass, default
      :data:`medad.engine.volumes.DEFAULT_SLICE_BATCH`; ``foreground_level`` and ``min_foreground`` set
      the empty-slice rule).
    """

    def __init__(
        self, batch_size: int | None = None, foreground_level: float = 0.05, min_foreground: float = 0.01
    ) -> None:
        super().__init__()
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = batch_size
        self.foreground_level, self.min_foreground = foreground_level, min_foreground

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> RawScores | VolumeScores:
        detector = unwrap(network)
        if inputs.dim() == 5:
            return score_volumes(
                detector, inputs, self.batch_size or DEFAULT_SLICE_BATCH, self.foreground_level, self.min_foreground
            )
        chunks = inputs.split(self.batch_size) if self.batch_size else (inputs,)
        parts = [detector.raw_scores(chunk) for chunk in chunks]
        return RawScores.concat(parts)


def final_scores(
    detector: MVFADetector, scored: RawScores | VolumeScores, images: torch.Tensor, skip_blank: bool = True
) -> tuple[AnomalyScores | None, torch.Tensor | None]:
    """The final scores of :class:`AnomalyInferer`'s output for ``images`` and which inputs were
    blank ``(B,)``, as every surface applies them.

    Volumes are final already (blank: no non-empty slice). Images are fused with the stored
    calibration and, with ``skip_blank``, background-only images set to map and score 0
    (:func:`medad.engine.volumes.predict_images`; blank ``None`` without it); a detector with a memory
    bank but no calibration yet gives ``(None, None)`` (set-level fusion only: evaluation).
    """
    if isinstance(scored, VolumeScores):
        return AnomalyScores(scored.anomaly_map, scored.score), scored.empty_slices.all(dim=1)
    if scored.few_map is not None and not detector.is_calibrated:
        return None, None
    final = detector.finalize(scored)
    return predict_images(detector, images, final) if skip_blank else (final, None)
