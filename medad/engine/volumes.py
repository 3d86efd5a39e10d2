"""Scoring 3D volumes slice by slice, and the blank rule of 2D images (finding the cases in a
folder is :mod:`medad.io.discovery`).

A volume (NIfTI, a DICOM file or a DICOM series folder) is prepared by
``medad.io.transforms.mvfa_preprocessing(volume=True)``: kept at its voxel grid, windowed per volume
to [0, 1], and reoriented so that its slices lie along the last axis. :func:`score_volumes` then
streams the slices through the detector in batches of ``batch_size`` (memory bounded by the
batch, not the volume), resizes each to the model's size as the 2D pipeline does, and puts the
maps, resized back, into a map with the volume's voxel grid.

Rules:

- Empty slices (:func:`empty_slices`, on the windowed intensities): a slice that is constant,
  or in which fewer than ``min_foreground`` (1 %) of the voxels are brighter than
  ``foreground_level`` (5 % of the intensity window), is background only: it is not run
  through the network, and its map and score are 0, so that air above a head or padding
  cannot dominate a volume. (With a CT window whose lower end lies below air, such as
  ``lung``, air is not background: only constant slices are skipped.)
- Blank 2D images follow the same rule (:func:`predict_images`): map and score 0, reported as
  blank, so that a constant image is not flagged.
- Volume scores: ``score`` is the maximum of the non-empty slices' scores (as an image's score
  is the maximum of its map); ``score_p95`` is the 95th percentile (linear interpolation) of the
  scores of the non-empty slices, which one odd slice cannot raise. Both are 0 for a volume
  without any non-empty slice.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from monai.transforms import Resize

from medad.model.detector import MVFADetector
from medad.model.methods import AnomalyScores
from medad.io.transforms import plain_tensor, shrink_for_resize, to_rgb

__all__ = [
    "DEFAULT_SLICE_BATCH",
    "ROBUST_PERCENTILE",
    "VolumeScores",
    "empty_slices",
    "iter_slice_batches",
    "predict_images",
    "prepare_slices",
    "score_volumes",
]

#: Slices per forward pass when an inferer is given no batch size.
DEFAULT_SLICE_BATCH = 8
#: The percentile of slice scores reported as a volume's robust score (``score_p95``).
ROBUST_PERCENTILE = 95.0


class VolumeScores(NamedTuple):
    """Final anomaly scores of a batch of volumes ``(B, C, H, W, D)`` (slices along ``D``):
    already fused slice by slice with the detector's stored calibration."""

    anomaly_map: torch.Tensor  # (B, H, W, D), 0 on empty slices
    score: torch.Tensor  # (B,) maximum of the non-empty slices' scores
    score_p95: torch.Tensor  # (B,) 95th percentile of the non-empty slices' scores
    slice_scores: torch.Tensor  # (B, D), 0 on empty slices
    empty_slices: torch.Tensor  # (B, D) bool


def empty_slices(slices: torch.Tensor, foreground_level: float = 0.05, min_foreground: float = 0.01) -> torch.Tensor:
    """Which slices ``(n, ...)`` (intensities windowed to [0, 1]) are background only: constant,
    or with fewer than ``min_foreground`` of their voxels above ``foreground_level``.
    Returns ``(n,)`` bool."""
    flat = slices.reshape(slices.shape[0], -1)
    constant = (flat.amax(dim=1) - flat.amin(dim=1)) <= 1e-6
    background = (flat > foreground_level).sum(dim=1) < min_foreground * flat.shape[1]
    return constant | background


def iter_slice_batches(
    volume: torch.Tensor, batch_size: int, foreground_level: float = 0.05, min_foreground: float = 0.01
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Stream the non-empty slices of a volume ``(C, H, W, D)`` in batches of at most
    ``batch_size``: ``(slice indices, slices (n, C, H, W))``. At most two blocks of
    ``batch_size`` slices are copied at a time."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    depth = volume.shape[-1]
    indices: list[int] = []
    pending: list[torch.Tensor] = []
    for start in range(0, depth, batch_size):
        # one contiguous copy per block: the slices are strided in the volume's memory
        block = volume[..., start : start + batch_size].movedim(-1, 0).contiguous()
        keep = torch.nonzero(~empty_slices(block, foreground_level, min_foreground)).flatten()
        indices += (start + keep).tolist()
        pending.append(block[keep])
        last = start + batch_size >= depth
        while len(indices) >= batch_size or (last and indices):
            slices = torch.cat(pending)
            yield indices[:batch_size], slices[:batch_size]
            indices, pending = indices[batch_size:], [slices[batch_size:]]


def prepare_slices(slices: torch.Tensor, image_size: int) -> torch.Tensor:
    """Slices ``(n, C, H, W)`` in [0, 1] to model inputs ``(n, 3, S, S)``: resized as the 2D
    pipeline resizes images (MONAI ``Resize``, bicubic with anti-aliasing, after block averaging
    slices more than 8 times ``S``: :func:`medad.io.transforms.shrink_for_resize`), clipped to
    [0, 1], gray repeated to RGB."""
    n, channels, height, width = slices.shape
    resize = Resize((image_size, image_size), mode="bicubic", anti_aliasing=True)
    flat, sigma = shrink_for_resize(slices.reshape(n * channels, height, width), (image_size, image_size))
    resized = plain_tensor(resize(flat, anti_aliasing_sigma=sigma))
    return to_rgb(resized.reshape(n, channels, image_size, image_size).clamp(0, 1), channel_dim=1)


def predict_images(detector: MVFADetector, images: torch.Tensor, scores: AnomalyScores | None = None) -> tuple[AnomalyScores, torch.Tensor]:
    """Final scores of 2D model inputs ``(B, 3, S, S)`` with blank images (:func:`empty_slices`)
    set to map 0 and score 0, and which were blank ``(B,)``; ``scores``: the final scores
    already computed for ``images``."""
    blank = empty_slices(images)
    scores = detector.predict(images) if scores is None else scores
    keep = (~blank).to(scores.score.dtype)
    return AnomalyScores(scores.anomaly_map * keep[:, None, None], scores.score * keep), blank


@torch.no_grad()
def score_volumes(
    detector: MVFADetector,
    volumes: torch.Tensor,
    batch_size: int = DEFAULT_SLICE_BATCH,
    foreground_level: float = 0.05,
    min_foreground: float = 0.01,
) -> VolumeScores:
    """Score volumes ``(B, C, H, W, D)`` (intensities in [0, 1], slices along the last axis) slice
    by slice with the detector's final scores (:meth:`medad.MVFADetector.predict`: zero-shot, or
    few-shot fused with the stored calibration).

    Each batch of ``batch_size`` non-empty slices is resized to the model's size, scored, and
    its maps resized back to the slice size (bilinear, anti-aliased when shrinking) into the
    output map; empty slices (:func:`empty_slices`) score 0. See the module docstring for the
    volume scores.
    """
    if volumes.dim() != 5:
        raise ValueError(f"expected volumes (B, C, H, W, D), got shape {tuple(volumes.shape)}")
    batch, _, height, width, depth = volumes.shape
    device = volumes.device
    anomaly_map = torch.zeros((batch, height, width, depth), device=device)
    slice_scores = torch.zeros((batch, depth), device=device)
    empty = torch.ones((batch, depth), dtype=torch.bool, device=device)
    restore = Resize((height, width), mode="bilinear", anti_aliasing=True)
    for b, volume in enumerate(volumes):
        for indices, slices in iter_slice_batches(volume, batch_size, foreground_level, min_foreground):
            final = detector.predict(prepare_slices(slices, detector.image_size))
            anomaly_map[b, :, :, indices] = plain_tensor(restore(final.anomaly_map.float())).movedim(0, -1)
            slice_scores[b, indices] = final.score.float()
            empty[b, indices] = False
    scores = [slice_scores[b][~empty[b]] for b in range(batch)]
    maximum = torch.stack([s.max() if s.numel() else s.new_zeros(()) for s in scores])
    robust = torch.stack([torch.quantile(s, ROBUST_PERCENTILE / 100) if s.numel() else s.new_zeros(()) for s in scores])
    return VolumeScores(anomaly_map, maximum, robust, slice_scores, empty)
