"""MVFA anomaly scores from adapter tokens: zero-shot (text), few-shot (memory) and their fusion.

All functions take adapter tokens with the class token first, ``(B, 1 + L, E)`` per level, and
work on whole batches on the tokens' device. Maps are ``(B, S, S)`` at the input size ``S``.

Scores are float32 islands: text logits, probabilities and memory similarities are computed in
float32 from float32 copies of their inputs, with ``torch.autocast`` switched off for them
(:func:`float32_region`), whatever autocast encloses the call. In plain float32 that changes
nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "LOGIT_SCALE",
    "FusionRange",
    "coreset_indices",
    "detection_probability",
    "few_shot_maps",
    "float32_region",
    "fuse",
    "segmentation_probabilities",
    "text_logits",
    "zero_shot_maps",
    "zero_shot_scores",
]

#: CLIP's logit scale, fixed at 100 in MVFA.
LOGIT_SCALE = 100.0


def float32_region(device: torch.device) -> AbstractContextManager:
    """A region where ``torch.autocast`` is off for ``device``'s type, so that what runs in it on
    float32 tensors stays float32 whatever autocast encloses it (training's ``amp``, a caller's
    own): the adapters, their tokens and the scores. Nothing is entered where no autocast is
    on (plain float32 runs, tracing and export see no autocast region) or the device type has
    none.

    Example:
        >>> with torch.autocast("cpu", dtype=torch.bfloat16), float32_region(torch.device("cpu")):
        ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.float32
    """
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return nullcontext()


def _patches(tokens: torch.Tensor) -> torch.Tensor:
    """Patch tokens without the class token."""
    return tokens[:, 1:, :]


def _to_grid(values: torch.Tensor) -> torch.Tensor:
    """``(B, L, C)`` per-patch values to ``(B, C, g, g)``."""
    batch, length, channels = values.shape
    side = math.isqrt(length)
    if side * side != length:
        raise ValueError(f"expected a square patch grid, got {length} patches")
    return values.permute(0, 2, 1).reshape(batch, channels, side, side)


def _upsample(grid: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=True)


def text_logits(tokens: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Per-patch (normal, abnormal) logits ``(B, L, 2)``.

    ``text_features`` is ``(E, 2)`` for the whole batch or ``(B, E, 2)`` per sample. Float32,
    whatever the autocast (:func:`float32_region`).

    Example:
        >>> tokens = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0], [0.0, 1.0]]])  # class, 2x2 patches
        >>> text_features = torch.eye(2)  # (E, 2): normal along the first axis, abnormal the second
        >>> text_logits(tokens, text_features).round(decimals=4)
        tensor([[[100.0000,   0.0000],
                 [ 70.7107,  70.7107],
                 [ 70.7107,  70.7107],
                 [  0.0000, 100.0000]]])
    """
    with float32_region(tokens.device):
        patches = F.normalize(_patches(tokens).float(), dim=-1)
        text_features = text_features.float()
        if text_features.dim() == 2:
            return LOGIT_SCALE * patches @ text_features
        return LOGIT_SCALE * torch.bmm(patches, text_features)


def segmentation_probabilities(tokens: torch.Tensor, text_features: torch.Tensor, size: int) -> torch.Tensor:
    """One level's 2-channel map ``(B, 2, S, S)``: logits upsampled, then softmax over channels
    (float32, whatever the autocast).

    Example (the abnormal channel):
        >>> tokens = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0], [0.0, 1.0]]])  # class, 2x2 patches
        >>> text_features = torch.eye(2)  # (E, 2): normal along the first axis, abnormal the second
        >>> segmentation_probabilities(tokens, text_features, 2)[:, 1].round(decimals=4)
        tensor([[[0.0000, 0.5000],
                 [0.5000, 1.0000]]])
    """
    with float32_region(tokens.device):
        return torch.softmax(_upsample(_to_grid(text_logits(tokens, text_features)), size), dim=1)


def detection_probability(tokens: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """One level's image score ``(B,)``: abnormal probability averaged over patches (float32,
    whatever the autocast).

    Example:
        >>> tokens = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0], [0.0, 1.0]]])  # class, 2x2 patches
        >>> text_features = torch.eye(2)  # (E, 2): normal along the first axis, abnormal the second
        >>> detection_probability(tokens, text_features)
        tensor([0.5000])
    """
    with float32_region(tokens.device):
        return torch.softmax(text_logits(tokens, text_features), dim=-1)[..., 1].mean(dim=-1)


def zero_shot_maps(seg_tokens: Sequence[torch.Tensor], text_features: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-shot anomaly maps ``(B, S, S)``: abnormal probability summed over levels.

    Example (two levels with the same tokens):
        >>> tokens = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0], [0.0, 1.0]]])  # class, 2x2 patches
        >>> text_features = torch.eye(2)  # (E, 2): normal along the first axis, abnormal the second
        >>> zero_shot_maps([tokens, tokens], text_features, 2).round(decimals=4)
        tensor([[[0., 1.],
                 [1., 2.]]])
    """
    return sum(segmentation_probabilities(tokens, text_features, size)[:, 1] for tokens in seg_tokens)


def zero_shot_scores(det_tokens: Sequence[torch.Tensor], text_features: torch.Tensor) -> torch.Tensor:
    """Zero-shot image scores ``(B,)``: mean abnormal probability summed over levels.

    Example (two levels with the same tokens):
        >>> tokens = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0], [0.0, 1.0]]])  # class, 2x2 patches
        >>> text_features = torch.eye(2)  # (E, 2): normal along the first axis, abnormal the second
        >>> zero_shot_scores([tokens, tokens], text_features)
        tensor([1.])
    """
    return sum(detection_probability(tokens, text_features) for tokens in det_tokens)


def few_shot_maps(
    tokens: Sequence[torch.Tensor],
    memory: Sequence[torch.Tensor],
    size: int,
    chunk: int = 4096,
) -> torch.Tensor:
    """Few-shot maps ``(B, S, S)``: per level, the cosine distance of each patch to its nearest
    memory token (memory ``(M, E)``, L2-normalised), upsampled and summed over levels.

    The memory is scanned in chunks of ``chunk`` tokens so that the similarity matrix never
    exceeds ``B x L x chunk`` values. Similarities are computed in float32 whatever the autocast
    (:func:`float32_region`): ``1 - cosine`` near 0 has almost no bits left in bf16 or fp16.

    Example (one level, a memory of one token):
        >>> tokens = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0], [0.0, 1.0]]])  # class, 2x2 patches
        >>> few_shot_maps([tokens], [torch.tensor([[1.0, 0.0]])], 2)
        tensor([[[0.0000, 0.2929],
                 [0.2929, 1.0000]]])
    """
    total = 0
    for level_tokens, level_memory in zip(tokens, memory, strict=True):
        with float32_region(level_tokens.device):
            patches = F.normalize(_patches(level_tokens).float(), dim=-1)
            level_memory = level_memory.float()
            # 1 - max(cosine) rather than min(1 - cosine): the same value bit for bit (rounding of
            # 1 - s is monotone in s) without a subtraction over the B x L x M similarity matrix
            closest = torch.cat(
                [(patches @ part.T).amax(dim=-1, keepdim=True) for part in level_memory.split(chunk)], dim=-1
            ).amax(dim=-1)
            total = total + _upsample(_to_grid((1 - closest).unsqueeze(-1)), size)[:, 0]
    return total


def coreset_indices(tokens: torch.Tensor, size: int, projection_dim: int = 128, seed: int = 0) -> torch.Tensor:
    """``size`` indices of ``tokens`` ``(N, E)`` chosen greedily so that every token lies near a
    chosen one (k-center greedy, as PatchCore subsamples its memory bank), starting from token 0.
    Distances are Euclidean, on a seeded random Gaussian projection to ``projection_dim`` where
    ``E`` is larger (distances kept up to a small factor, Johnson-Lindenstrauss). Returns
    ``(size,)`` int64, or all indices when ``size >= N``.

    Example:
        >>> coreset_indices(torch.eye(4), 2).tolist()
        [0, 1]
    """
    count = tokens.shape[0]
    if size >= count:
        return torch.arange(count, device=tokens.device)
    points = tokens.float()
    if points.shape[1] > projection_dim:
        generator = torch.Generator().manual_seed(seed)
        projection = torch.randn(points.shape[1], projection_dim, generator=generator).to(points.device)
        points = points @ projection / projection_dim**0.5
    chosen = torch.empty(size, dtype=torch.long, device=tokens.device)
    chosen[0] = 0
    nearest = (points - points[0]).norm(dim=1)
    for n in range(1, size):
        index = torch.argmax(nearest)
        chosen[n] = index
        nearest = torch.minimum(nearest, (points - points[index]).norm(dim=1))
    return chosen


@dataclass
class FusionRange:
    """Min and max of a score over a reference set, for min-max normalisation.

    Floats, or 0-d tensors (a stored calibration), which keeps the fusion traceable for export.

    Example:
        >>> FusionRange.of(torch.tensor([1.0, 3.0]))
        FusionRange(low=1.0, high=3.0)
        >>> FusionRange(1.0, 3.0).normalise(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        tensor([0.0000, 0.5000, 1.0000, 1.5000])
    """

    low: float | torch.Tensor
    high: float | torch.Tensor

    @classmethod
    def of(cls, values: torch.Tensor) -> FusionRange:
        """The range of ``values`` (for the paper's set-level fusion, the whole evaluated set)."""
        return cls(float(values.min()), float(values.max()))

    def normalise(self, values: torch.Tensor) -> torch.Tensor:
        """``(values - low) / (high - low)``, any shape; a span that is not positive counts as 1."""
        span = self.high - self.low
        if isinstance(span, torch.Tensor):
            span = torch.where(span > 0, span, torch.ones_like(span))
        elif span <= 0:
            span = 1.0
        return (values - self.low) / span


def fuse(zero: torch.Tensor, few: torch.Tensor, zero_range: FusionRange, few_range: FusionRange) -> torch.Tensor:
    """MVFA's fusion ``0.5 * minmax(zero) + 0.5 * minmax(few)`` with given normalisation ranges.

    Example:
        >>> fuse(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.5]), FusionRange(1.0, 3.0), FusionRange(0.0, 1.0))
        tensor([0.0000, 0.7500])
    """
    return 0.5 * zero_range.normalise(zero) + 0.5 * few_range.normalise(few)
