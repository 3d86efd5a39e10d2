"""Adapting a trained detector to the normal images of a target, without training: MVFA's
few-shot memory bank, the fusion calibration and the decision thresholds from normal images only.

The held-out rule: an image never scores against itself. The memory holds the adapter tokens of
every support image (augmented x11 as MVFA does, unless ``augment=False``); each support image is
scored against that memory **without the tokens of its own group** (its study: the slices of one
volume, or one image with its augmented copies). Those held-out raw scores give the calibration
ranges, and their final scores the thresholds: the image threshold is the highest held-out image
score, the pixel threshold the highest held-out map value (rule ``normal_heldout_max``,
:data:`medad.model.decision.HELD_OUT_RULE`). A new normal image of the same kind then exceeds them with
probability about 1 / (groups + 1): the false-positive rate on normal images that the thresholds
aim at. Used by the MONAI Label app.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from medad.model.augment import FEWSHOT_AUGMENTATIONS, augment_fewshot
from medad.model.decision import HELD_OUT_RULE, Thresholds
from medad.model.detector import MVFADetector
from medad.model.methods import RawScores

__all__ = ["adapt_to_normal_images"]


@torch.no_grad()
def adapt_to_normal_images(
    detector: MVFADetector,
    images: torch.Tensor,
    groups: Sequence[object] | None = None,
    augment: bool = True,
    batch_size: int = 8,
) -> Thresholds:
    """Build ``detector``'s memory, calibration and thresholds from normal images ``(N, 3, S, S)``
    in [0, 1] (see the module docstring); returns the thresholds it stored.

    Args:
        groups: the group (study) of each image; default: each image its own.
        augment: MVFA's x11 augmentation of the memory images.
        batch_size: images per forward pass while building the memory.
    """
    groups = list(range(len(images))) if groups is None else list(groups)
    if len(groups) != len(images):
        raise ValueError(f"{len(images)} images but {len(groups)} groups")
    if len(set(groups)) < 2:
        raise ValueError(f"the held-out rule needs normal images of at least 2 groups (studies), got {len(set(groups))}")
    device = detector.text_features.device
    memory_images = augment_fewshot(images)[0] if augment else images
    detector.build_memory(memory_images, batch_size)
    copies = FEWSHOT_AUGMENTATIONS if augment else 1
    index = {group: n for n, group in enumerate(dict.fromkeys(groups))}
    image_group = torch.tensor([index[group] for group in groups] * copies)  # augment_fewshot: grouped by transform
    row_group = image_group.repeat_interleave(detector.memory_seg.shape[1] // len(memory_images)).to(device)
    full_seg, full_det = detector.memory_seg, detector.memory_det
    parts = []
    try:
        for image, group in zip(images, groups):
            keep = row_group != index[group]
            detector.memory_seg, detector.memory_det = full_seg[:, keep], full_det[:, keep]
            parts.append(detector.raw_scores(image[None].to(device)))
    finally:
        detector.memory_seg, detector.memory_det = full_seg, full_det
    raw = RawScores.concat(parts)
    detector.set_calibration(raw)
    final = detector.finalize(raw)
    detector.thresholds = Thresholds(
        float(final.score.max()), float(final.anomaly_map.max()), HELD_OUT_RULE, HELD_OUT_RULE
    )
    return detector.thresholds
