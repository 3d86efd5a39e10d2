"""MVFA's few-shot augmentation: each support image becomes 11 (itself plus 10 variants)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["FEWSHOT_AUGMENTATIONS", "augment_fewshot"]

#: Rotations (radians) and translations (normalised coordinates) applied after the original;
#: then a horizontal and a vertical flip.
_ROTATIONS = (-math.pi / 8, -math.pi / 16, math.pi / 16, math.pi / 8)
_TRANSLATIONS = ((0.1, 0.1), (-0.1, 0.1), (-0.1, -0.1), (0.1, -0.1))
FEWSHOT_AUGMENTATIONS = 1 + len(_ROTATIONS) + len(_TRANSLATIONS) + 2


def _warp(x: torch.Tensor, theta: list[list[float]]) -> torch.Tensor:
    # Written with torch rather than MONAI's Affine: MVFA's numbers come from affine_grid +
    # grid_sample in normalised coordinates (align_corners=False, reflection padding).
    matrix = torch.tensor(theta, dtype=x.dtype, device=x.device).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(matrix, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="reflection", align_corners=False)


def _variants(x: torch.Tensor) -> list[torch.Tensor]:
    out = [x]
    for angle in _ROTATIONS:
        c, s = math.cos(angle), math.sin(angle)
        out.append(_warp(x, [[c, -s, 0.0], [s, c, 0.0]]))
    for a, b in _TRANSLATIONS:
        out.append(_warp(x, [[1.0, 0.0, a], [0.0, 1.0, b]]))
    out.append(x.flip(-1))
    out.append(x.flip(-2))
    return out


def augment_fewshot(images: torch.Tensor, masks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment ``(K, C, H, W)`` images (and ``(K, 1, H, W)`` masks) to ``11 K`` of each.

    The output is grouped by transform (all originals, then each rotation, ...), as MVFA orders
    it. Without masks, all-zero masks are returned (normal images).
    """
    augmented = torch.cat(_variants(images))
    if masks is None:
        return augmented, images.new_zeros((augmented.shape[0], 1, *images.shape[-2:]))
    return augmented, torch.cat(_variants(masks.to(images.dtype)))
