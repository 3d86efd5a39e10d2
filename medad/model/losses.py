"""MVFA's multi-level pixel-wise visual-language alignment losses."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

from medad.model.scoring import detection_probability, segmentation_probabilities

__all__ = ["AlignmentLoss", "MVFALosses", "focal_loss"]


def focal_loss(probabilities: torch.Tensor, mask: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """MVFA's focal loss per sample ``(B,)`` on a 2-channel probability map ``(B, 2, H, W)``.

    Written here rather than taken from MONAI: MVFA applies it to probabilities (not logits)
    with a clamped one-hot target and ``smooth`` added to ``pt``, which MONAI's FocalLoss
    does not reproduce: ``q = clamp(one_hot(m), smooth, 1 - smooth)``,
    ``pt = sum_c q_c p_c + smooth``, loss = mean over pixels of ``-(1 - pt)^gamma * log(pt)``.

    Example (two one-pixel maps, both anomalous):
        >>> probabilities = torch.tensor([[[[0.5]], [[0.5]]], [[[0.1]], [[0.9]]]])  # (2, 2, 1, 1)
        >>> focal_loss(probabilities, torch.ones(2, 1, 1, 1))
        tensor([0.1733, 0.0011])
    """
    target = torch.cat([1 - mask, mask], dim=1).clamp(smooth, 1 - smooth)
    pt = (target * probabilities).sum(dim=1) + smooth
    return (-((1 - pt) ** gamma) * pt.log()).flatten(1).mean(dim=1)


class MVFALosses(NamedTuple):
    """Per-sample losses ``(B,)``, each summed over levels."""

    seg: torch.Tensor
    det: torch.Tensor


class AlignmentLoss(nn.Module):
    """Per level: focal + Dice on the upsampled 2-class map (seg adapters) and BCE-with-logits on
    the mean abnormal probability (det adapters), summed over levels.

    As in MVFA, the mean probability itself is passed to BCE as the logit.

    Example (one level, one abnormal image of 2x2 patches whose mask is its bottom row):
        >>> tokens = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0], [0.0, 1.0]]])  # class, patches
        >>> masks = torch.tensor([[[[0.0, 0.0], [1.0, 1.0]]]])
        >>> AlignmentLoss()([tokens], [tokens], torch.eye(2), masks, torch.tensor([1]))
        MVFALosses(seg=tensor([0.2866]), det=tensor([0.4741]))
    """

    def __init__(self) -> None:
        super().__init__()
        # MVFA's binary Dice: 1 - (2 * sum(p m) + 1) / (sum(p) + sum(m) + 1), per sample.
        self.dice = DiceLoss(include_background=True, smooth_nr=1.0, smooth_dr=1.0, reduction="none")

    def forward(
        self,
        seg_tokens: Sequence[torch.Tensor],
        det_tokens: Sequence[torch.Tensor],
        text_features: torch.Tensor,
        masks: torch.Tensor,
        labels: torch.Tensor,
    ) -> MVFALosses:
        """Losses for a batch.

        Args:
            seg_tokens, det_tokens: adapter tokens per level, ``(B, 1 + L, E)``.
            text_features: ``(E, 2)`` or per sample ``(B, E, 2)``.
            masks: ``(B, 1, S, S)``, binarised at 0.5 here.
            labels: image labels ``(B,)``, 1 for abnormal.
        """
        masks = (masks > 0.5).to(seg_tokens[0].dtype)
        labels = labels.to(det_tokens[0].dtype).reshape(-1)
        size = masks.shape[-1]
        seg = 0
        for tokens in seg_tokens:
            probabilities = segmentation_probabilities(tokens, text_features, size)
            seg = seg + focal_loss(probabilities, masks) + self.dice(probabilities[:, 1:], masks).flatten(1).mean(1)
        det = 0
        for tokens in det_tokens:
            det = det + F.binary_cross_entropy_with_logits(
                detection_probability(tokens, text_features), labels, reduction="none"
            )
        return MVFALosses(seg, det)
