"""WinCLIP (Jeong et al., CVPR 2023): zero- and few-shot anomaly classification and segmentation
with a frozen CLIP, as a registered :class:`medad.model.methods.Method` (``method="winclip"``).

Nothing trains. The frozen tower encodes, at its last block and in CLIP's joint space:

- the image: the class token, projected, ``(B, D)``;
- the patches: every patch token, projected, ``(B, L, D)``;
- windows of ``k x k`` patches (stride 1, scales ``k`` = 2 and 3 by default): for each window
  the transformer runs again on the class token plus that window's tokens only, as embedded
  (their positions included), and the window's embedding is its projected class token,
  ``(B, n_windows, D)`` per scale (:class:`WindowEncoder`).

Zero-shot, each embedding is a two-class problem against the prompt text features: its
anomalous probability is the softmax over (normal, anomalous) of the cosine similarities over a
temperature (0.07, :func:`anomaly_probability`). The image score is the image's probability; the
map is, per scale, the windows' probabilities on the patch grid, each patch the harmonic mean of
the windows covering it (:func:`harmonic_aggregation`), and the scales and the image score (as a
scale covering the whole image) combined by their harmonic mean.

Few-shot (WinCLIP+), the memory keeps the normal support images' patch embeddings and window
embeddings per scale. Each query embedding's visual association score is half its cosine
distance to the nearest reference embedding of the same scale (:func:`visual_association`); the
few-shot map is the mean of the patch scale and the harmonic-aggregated window scales, and the
final map and image score the means of the zero-shot ones and the few-shot map and its maximum.
Every map is within [0, 1] (:meth:`WinCLIP.map_scale`).

Maps are computed on the patch grid, then upsampled bilinearly to the input size (patch values
at patch centres, ``align_corners=False``, as anomalib; MVFA's maps use ``align_corners=True``).
Scores are float32 islands, as in :mod:`medad.model.scoring` (:func:`medad.model.scoring.float32_region`).

Where this differs from anomalib's WinCLIP (``anomalib.models.image.winclip``): the text features
are medad's prompt ensemble for the data set (:mod:`medad.model.prompts`, the detector's
``text_features_for``), not WinCLIP's compositional ensemble of the object's name; the patch
embeddings are projected into the joint space like the window and image embeddings (anomalib
keeps them after the final norm, unprojected); windows keep every prefix token of a tower with
registers; the memory can be reduced to a coreset (``memory_size``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from medad.model.methods import AnomalyScores, Method, RawScores, register_method
from medad.model.network import FrozenTower
from medad.model.scoring import FusionRange, coreset_indices, float32_region
from medad.model.towers import VisionTower, vision_tower

if TYPE_CHECKING:  # the detector holds the method; the method only reads it
    from medad.model.detector import MVFADetector

__all__ = [
    "SCALES",
    "TEMPERATURE",
    "WinCLIP",
    "WindowEncoder",
    "WindowTokens",
    "anomaly_probability",
    "harmonic_aggregation",
    "harmonic_mean",
    "visual_association",
    "window_indices",
]

#: The softmax temperature of the class scores (CLIP's, as WinCLIP and anomalib take it).
TEMPERATURE = 0.07
#: The window sizes in patches (WinCLIP's small and middle scales; stride 1).
SCALES = (2, 3)


# ---------------------------------------------------------------------------- pure functions


def window_indices(grid: tuple[int, int], size: int, device: torch.device | None = None) -> torch.Tensor:
    """The patches of every ``size x size`` window of a ``(rows, cols)`` patch grid, stride 1:
    ``(n_windows, size * size)`` int64 row-major patch indices, windows in row-major order of
    their top-left patch; ``n_windows = (rows - size + 1) * (cols - size + 1)``.

    Example (a 3 x 4 grid, windows of 2 x 2 patches):
        >>> window_indices((3, 4), 2)
        tensor([[ 0,  1,  4,  5],
                [ 1,  2,  5,  6],
                [ 2,  3,  6,  7],
                [ 4,  5,  8,  9],
                [ 5,  6,  9, 10],
                [ 6,  7, 10, 11]])

    Raises:
        ValueError: ``size`` is not within 1 .. the grid's smaller side.
    """
    rows, cols = grid
    if not 1 <= size <= min(rows, cols):
        raise ValueError(f"a window of {size} x {size} patches does not fit a {rows} x {cols} patch grid")
    patches = torch.arange(rows * cols, device=device).view(rows, cols)
    # (rows - size + 1, cols - size + 1, size, size): each window's patch indices
    windows = patches.unfold(0, size, 1).unfold(1, size, 1)
    return windows.reshape(-1, size * size)


def harmonic_aggregation(window_scores: torch.Tensor, grid: tuple[int, int], size: int) -> torch.Tensor:
    """Per-window scores ``(B, n_windows)`` of the ``size x size`` windows of :func:`window_indices`
    to the patch grid ``(B, rows, cols)``: each patch the harmonic mean of the scores of the
    windows covering it (WinCLIP's harmonic aggregation). A zero score makes the patches it
    covers 0; scores must be non-negative.

    Example (a 3 x 3 grid, its four 2 x 2 windows; the centre patch is in all four):
        >>> harmonic_aggregation(torch.tensor([[1.0, 0.5, 0.5, 0.25]]), (3, 3), 2)
        tensor([[[1.0000, 0.6667, 0.5000],
                 [0.6667, 0.4444, 0.3333],
                 [0.5000, 0.3333, 0.2500]]])
        >>> harmonic_aggregation(torch.tensor([[1.0, 0.0, 1.0, 1.0]]), (3, 3), 2)[0, 0]
        tensor([1., 0., 0.])
    """
    rows, cols = grid
    batch = window_scores.shape[0]
    # fold (the adjoint of unfold) sums each window's value onto the patches it covers
    columns = (rows - size + 1) * (cols - size + 1)
    if window_scores.shape[1] != columns:
        raise ValueError(f"{window_scores.shape[1]} window scores for {columns} windows of {size} x {size} on {grid}")
    reciprocal = window_scores.reciprocal().unsqueeze(1).expand(batch, size * size, columns)
    sums = F.fold(reciprocal, output_size=grid, kernel_size=size)[:, 0]
    counts = F.fold(torch.ones_like(reciprocal[:1]), output_size=grid, kernel_size=size)[:, 0]
    return counts / sums


def harmonic_mean(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """The element-wise harmonic mean of same-shape non-negative tensors (0 where any is 0).

    Example:
        >>> harmonic_mean([torch.tensor([1.0, 0.5, 0.2]), torch.tensor([1.0, 0.25, 0.0])])
        tensor([1.0000, 0.3333, 0.0000])
    """
    return len(maps) / sum(values.reciprocal() for values in maps)


def anomaly_probability(
    embeddings: torch.Tensor, text_features: torch.Tensor, temperature: float = TEMPERATURE
) -> torch.Tensor:
    """The anomalous class probability of embeddings ``(..., D)``: softmax over (normal, anomalous)
    of their cosine similarities to ``text_features`` ``(D, 2)`` (column 0 normal, 1 anomalous, as
    :func:`medad.model.prompts.encode_text_features`) divided by ``temperature``; ``(...)``, float32
    whatever the autocast.

    Example (an embedding along the anomalous text, one between both):
        >>> text_features = torch.eye(2)
        >>> anomaly_probability(torch.tensor([[0.0, 3.0], [1.0, 1.0]]), text_features, temperature=0.5)
        tensor([0.8808, 0.5000])
    """
    with float32_region(embeddings.device):
        similarity = F.normalize(embeddings.float(), dim=-1) @ F.normalize(text_features.float(), dim=0)
        return torch.softmax(similarity / temperature, dim=-1)[..., 1]


def visual_association(embeddings: torch.Tensor, memory: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """WinCLIP's visual association score of embeddings ``(B, N, D)`` to a reference memory
    ``(M, D)`` (L2-normalised): half the cosine distance to the nearest reference, ``(B, N)`` in
    [0, 1] (the cosine clamped to [-1, 1] against rounding). The memory is scanned ``chunk``
    references at a time; float32 whatever the autocast.

    Example (references along the first axis and its opposite):
        >>> memory = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
        >>> visual_association(torch.tensor([[[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]]), memory)
        tensor([[0.0000, 0.5000, 0.1464]])
    """
    with float32_region(embeddings.device):
        queries = F.normalize(embeddings.float(), dim=-1)
        memory = memory.float()
        closest = torch.stack([(queries @ part.T).amax(dim=-1) for part in memory.split(chunk)]).amax(dim=0)
        return (1 - closest.clamp(-1.0, 1.0)) / 2


def _upsample(grid_map: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, rows, cols)`` to ``(B, size, size)`` bilinearly, patch values at patch centres (a
    convex combination of neighbouring patches: the range is kept)."""
    return F.interpolate(grid_map.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)[:, 0]


# ---------------------------------------------------------------------------- the encoder


class WindowTokens(NamedTuple):
    """What :class:`WindowEncoder` gives for images ``(B, 3, S, S)``, in CLIP's joint space (float32)."""

    image: torch.Tensor  # (B, D) the class token
    patches: torch.Tensor  # (B, L, D) every patch token, row-major on the patch grid
    windows: tuple[torch.Tensor, ...]  # per scale (B, n_windows, D), windows as window_indices


class WindowEncoder(FrozenTower):
    """The frozen CLIP tower encoding the image, its patches and its sliding windows (WinCLIP).

    Args:
        visual, matmul_dtype: as :class:`medad.model.network.FrozenTower`.
        levels: ``None`` or the last block only, ``(depth,)`` (WinCLIP reads the tower's output).
        scales: window sizes in patches (stride 1).
        window_batch: at most this many window sequences run through the blocks at once.

    :meth:`trunk` embeds the images (patchify, prefix tokens, positions, pre-norm; float32):
    ``(B, P + L, width)``. :meth:`adapt` runs all blocks on it for the image and patch
    embeddings, and for each window the blocks again on the prefix tokens (class, registers)
    plus that window's embedded tokens; the first token of the output is the window's class
    token. ``forward(images) == adapt(trunk(images))``; nothing needs gradients (all under
    ``torch.no_grad``). ``state_dict`` is empty.

    Raises:
        ValueError: other ``levels``, or a scale that does not fit the patch grid.
    """

    def __init__(
        self,
        visual: nn.Module | VisionTower,
        levels: Sequence[int] | None = None,
        scales: Sequence[int] = SCALES,
        matmul_dtype: torch.dtype = torch.float32,
        window_batch: int = 4096,
    ) -> None:
        depth = len(vision_tower(visual).blocks)
        if levels is not None and tuple(int(level) for level in levels) != (depth,):
            raise ValueError(
                f"WinCLIP reads the tower's last block only: levels must be None or [{depth}] for this "
                f"{depth}-block tower, got {list(levels)}"
            )
        super().__init__(visual, (depth,), matmul_dtype)
        self.scales = tuple(int(scale) for scale in scales)
        for scale in self.scales:
            window_indices(self.grid_size, scale)  # refuses a window larger than the grid
        self.window_batch = int(window_batch)

    @property
    def token_dim(self) -> int:
        """The size of the embeddings: CLIP's joint embedding size."""
        return self.tower.output_dim

    @torch.no_grad()
    def _trunk_eager(self, images: torch.Tensor) -> torch.Tensor:
        """The embedded stream before the first block, ``(B, P + L, width)``, float32."""
        with float32_region(images.device):
            return self.tower.embed(images.float()).float()

    @torch.no_grad()
    def _adapt_eager(self, x: torch.Tensor) -> WindowTokens:
        """Image, patch and window embeddings from a :meth:`trunk` output."""
        depth = self.levels[-1]
        tokens = self._project(self.tower.scored_tokens(self._blocks(x, 0, depth).float()))
        windows = tuple(self._window_embeddings(x, scale) for scale in self.scales)
        return WindowTokens(tokens[:, 0], tokens[:, 1:], windows)

    def _project(self, stream: torch.Tensor) -> torch.Tensor:
        with float32_region(stream.device):
            return self.tower.project(stream.float()).float()

    def _window_embeddings(self, x: torch.Tensor, scale: int) -> torch.Tensor:
        """``(B, n_windows, D)``: each window's projected class token after all blocks on the
        prefix tokens plus the window's tokens of the embedded stream ``x``."""
        batch, _, width = x.shape
        prefix = self.tower.prefix_tokens
        indices = window_indices(self.grid_size, scale, device=x.device)  # (n_windows, scale^2)
        count = indices.shape[0]
        # (B, n_windows, P + scale^2, width) -> one sequence per (image, window)
        sequences = torch.cat(
            [x[:, None, :prefix].expand(batch, count, prefix, width), x[:, prefix:][:, indices]], dim=2
        ).flatten(0, 1)
        classes = torch.cat(
            [self._blocks(part, 0, self.levels[-1])[:, :1] for part in sequences.split(self.window_batch)]
        )
        return self._project(classes)[:, 0].view(batch, count, -1)


# ---------------------------------------------------------------------------- the method


def _memory_names(scales: Sequence[int]) -> tuple[str, ...]:
    """The memory buffers' names: ``patch``, then ``window<k>`` per scale."""
    return ("patch", *(f"window{scale}" for scale in scales))


@register_method
class WinCLIP(Method):
    """WinCLIP (Jeong et al., CVPR 2023) on the frozen tower: window, patch and image embeddings
    against the prompt text (zero-shot) and against a memory of normal ones (few-shot, WinCLIP+).

    Its memory buffers (``memory_<name>`` of the detector), each ``(N, D)`` L2-normalised:
    ``patch`` (the support images' patch embeddings) and ``window<k>`` per scale ``k`` (their
    window embeddings). :meth:`finalize` averages the zero- and few-shot parts without min-max
    fusion: the calibration ranges are not used.
    """

    name = "winclip"
    label = "WinCLIP"
    summary = (
        "scores the class token and each 2 x 2 and 3 x 3 window of patches, run through the tower alone, "
        "against the same prompts, harmonic means back to the patches, and with support images the mean "
        "with their patch and window embeddings' distance"
    )
    trained = False
    scores_text = True
    takes_memory = True
    #: softmax temperature of the class scores and window sizes in patches
    temperature = TEMPERATURE
    scales = SCALES

    def build_encoder(self, tower: VisionTower, levels: Sequence[int] | None, matmul_dtype: torch.dtype) -> WindowEncoder:
        return WindowEncoder(tower, levels, self.scales, matmul_dtype=matmul_dtype)

    def empty_memory(self, encoder: WindowEncoder) -> dict[str, torch.Tensor]:
        return {name: torch.zeros(0, encoder.token_dim) for name in _memory_names(self.scales)}

    def memory_from(self, outputs: Sequence[WindowTokens], memory_size: int | None = None) -> dict[str, torch.Tensor]:
        """Every patch and window embedding of the support images per buffer, L2-normalised;
        ``memory_size``: at most that many per buffer, a k-center coreset
        (:func:`medad.model.scoring.coreset_indices`)."""
        sets = [torch.cat([output.patches for output in outputs])]
        sets += [torch.cat(scale) for scale in zip(*(output.windows for output in outputs), strict=True)]
        memory = {}
        for name, embeddings in zip(_memory_names(self.scales), sets, strict=True):
            references = F.normalize(embeddings.flatten(0, 1).float(), dim=-1)
            if memory_size is not None:
                references = references[coreset_indices(references, memory_size)]
            memory[name] = references
        return memory

    def score_tokens(self, detector: MVFADetector, tokens: WindowTokens, size: int) -> RawScores:
        """Zero-shot map and score, and with a memory the few-shot map and its maximum (over the
        patch grid, before upsampling), at ``size x size`` pixels."""
        encoder: WindowEncoder = detector.encoder
        grid, scales = encoder.grid_size, self.scales
        text = detector.text_features_for()
        image_score = anomaly_probability(tokens.image, text, self.temperature)  # (B,)
        per_scale = [image_score[:, None, None].expand(-1, *grid)]  # the image as a whole-image scale
        for scale, windows in zip(scales, tokens.windows, strict=True):
            per_scale.append(harmonic_aggregation(anomaly_probability(windows, text, self.temperature), grid, scale))
        zero_map = _upsample(harmonic_mean(per_scale), size)
        if not detector.has_memory:
            return RawScores(zero_map, image_score, None, None)
        batch = tokens.image.shape[0]
        few_scales = [visual_association(tokens.patches, detector.memory_patch).view(batch, *grid)]
        for scale, windows in zip(scales, tokens.windows, strict=True):
            association = visual_association(windows, getattr(detector, f"memory_window{scale}"))
            few_scales.append(harmonic_aggregation(association, grid, scale))
        few_grid = torch.stack(few_scales).mean(dim=0)
        return RawScores(zero_map, image_score, _upsample(few_grid, size), few_grid.flatten(1).amax(dim=1))

    def finalize(self, detector: MVFADetector, raw: RawScores, ranges: Mapping[str, FusionRange] | None) -> AnomalyScores:
        """Zero-shot outputs without memory; with it, the means of the zero- and few-shot maps and
        of the image score and the few-shot maximum (``ranges`` ignored: no min-max fusion)."""
        if raw.few_map is None:
            return AnomalyScores(raw.zero_map, raw.zero_score)
        return AnomalyScores((raw.zero_map + raw.few_map) / 2, (raw.zero_score + raw.few_score) / 2)

    def map_scale(self, levels: int, has_memory: bool) -> tuple[float, float]:
        """Probabilities and visual association scores, and their means: within [0, 1]."""
        return (0.0, 1.0)

