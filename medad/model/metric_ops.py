"""Streaming accumulators for anomaly-detection metrics.

Exact pixel-level metrics would keep and sort every pixel score of the test set (57.6M values
for 1,000 maps of 240x240). Instead, scores are quantised into a fixed number of bins over a
known range and only integer counts per bin are kept: memory depends on the number of bins,
never on the number of images, and two accumulators merge by adding their counts (which is
what a distributed all-reduce needs). Every curve is then exact at the bin edges, and scores
that share a bin count as ties.

Image-level metrics need no such trick: there is one score per image, so they are exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score
from torch import Tensor

__all__ = ["BinnedScores", "PROCurve", "image_metrics"]

# Labels every (H, W) slice of a (B, H, W) stack on its own, 8-connected, in one scipy call.
_SLICE_8_CONNECTED = np.zeros((3, 3, 3), dtype=bool)
_SLICE_8_CONNECTED[1] = True


def _chunk_size(device: torch.device) -> int:
    """Elements quantised at a time.

    On the CPU, chunks well below PyTorch's parallel grain size (32768) stay in cache and run
    single-threaded: whole-batch temporaries cost a page fault per fresh page, and thread
    hand-offs stall when the cores are shared, each more than the arithmetic itself (5-10x
    slower, measured). On accelerators, a chunk only bounds the temporaries.
    """
    return 2**14 if device.type == "cpu" else 2**22


def _tail(values: Tensor) -> Tensor:
    """Reverse cumulative sum: ``out[k] = values[k:].sum()``, i.e. the count at or above bin ``k``."""
    return values.flip(0).cumsum(0).flip(0)


def _binary(targets: Tensor) -> Tensor:
    """``targets`` as bool, after checking they are bool or 0/1."""
    if targets.dtype == torch.bool:
        return targets
    if ((targets != 0) & (targets != 1)).any():
        raise ValueError("targets must be binary: bool or 0/1")
    return targets != 0


class BinnedScores:
    """Binary-classification curves (AUROC, AP, F1-max) from per-bin counts over ``[low, high]``.

    Bin ``k`` holds scores in ``[edges[k], edges[k + 1])``, ``edges[k] = low + k (high - low) / bins``;
    scores below ``low`` or above ``high`` are clamped into the first or last bin. Thresholds
    are the bin edges, so scores in one bin are ties: the metrics equal scikit-learn's on the bin
    indices, hence on the scores whenever all the scores in any one bin are equal. Otherwise
    AUROC differs by at most half the share of (positive, negative) pairs sharing a bin; with
    the default 2**20 bins (16 MiB), continuous maps in [0, 1] land within about 1e-6.

    State, for a distributed all-reduce (SUM): ``counts``, int64 ``(2, bins)``, negatives in
    row 0 and positives in row 1.

    Args:
        low: lower end of the score range.
        high: upper end of the score range.
        bins: number of bins.
        device: where the counts live; ``None`` adopts the device of the first update.
    """

    def __init__(self, low: float, high: float, bins: int = 2**20, device: torch.device | str | None = None) -> None:
        if not (np.isfinite(low) and np.isfinite(high) and low < high):
            raise ValueError(f"need finite low < high, got low={low}, high={high}")
        if bins < 1:
            raise ValueError(f"need at least one bin, got {bins}")
        self.low, self.high, self.bins = float(low), float(high), int(bins)
        self._scale = self.bins / (self.high - self.low)
        self._device_fixed = device is not None
        self.counts = torch.zeros(2, self.bins, dtype=torch.int64, device=device)

    @property
    def negatives(self) -> Tensor:
        """Negative targets per bin, int64 ``(bins,)`` (a view of ``counts``)."""
        return self.counts[0]

    @property
    def positives(self) -> Tensor:
        """Positive targets per bin, int64 ``(bins,)`` (a view of ``counts``)."""
        return self.counts[1]

    @property
    def edges(self) -> Tensor:
        """Lower bin edges, float64 ``(bins,)``: the thresholds every curve is evaluated at."""
        return self.low + torch.arange(self.bins, dtype=torch.float64, device=self.counts.device) / self._scale

    def bin_index(self, scores: Tensor) -> Tensor:
        """Bin of each score, int64 of the same shape (float64 arithmetic, clamped into the end bins)."""
        index = (scores.detach().to(torch.float64) - self.low).mul_(self._scale).clamp_(0, self.bins - 1)
        if torch.isnan(index).any():
            raise ValueError("scores contain NaN")
        # Truncation is the floor of these non-negative values; floor_() would go multi-threaded.
        return index.long()

    def reset(self) -> None:
        """Forget every update."""
        self.counts.zero_()

    def update(self, scores: Tensor, targets: Tensor) -> None:
        """Count ``scores`` (any shape) with their binary ``targets`` (bool or 0/1, same number of elements)."""
        if scores.numel() != targets.numel():
            raise ValueError(f"scores {tuple(scores.shape)} and targets {tuple(targets.shape)} differ in size")
        if not self._device_fixed:
            self.counts, self._device_fixed = self.counts.to(scores.device), True
        device = self.counts.device
        scores = scores.detach().reshape(-1).to(device)
        targets = _binary(targets.detach().reshape(-1).to(device))
        flat = self.counts.view(-1)
        step = _chunk_size(device)
        ones = torch.ones(1, dtype=torch.int64, device=device).expand(step)
        for chunk, chunk_targets in zip(scores.split(step), targets.split(step)):
            index = self.bin_index(chunk).add_(chunk_targets, alpha=self.bins)  # positives: second row
            flat.index_add_(0, index, ones[: index.numel()])

    def merge(self, other: BinnedScores) -> None:
        """Add ``other``'s counts, as if its updates had been made here."""
        if (other.low, other.high, other.bins) != (self.low, self.high, self.bins):
            raise ValueError(
                f"cannot merge bins over [{other.low}, {other.high}] x {other.bins} "
                f"into [{self.low}, {self.high}] x {self.bins}"
            )
        self.counts += other.counts.to(self.counts.device)

    def _totals(self, metric: str, *, positives: bool = True, negatives: bool = True) -> tuple[int, int]:
        """Numbers of positive and negative targets, after checking ``metric`` has those it needs."""
        n_neg, n_pos = self.counts.sum(dim=1).tolist()
        if (positives and n_pos == 0) or (negatives and n_neg == 0):
            needs = " and ".join(name for name, needed in (("positive", positives), ("negative", negatives)) if needed)
            raise ValueError(f"{metric} needs {needs} targets, got {n_pos} positives and {n_neg} negatives")
        return n_pos, n_neg

    def _rates(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-bin positives and negatives, and true and false positives of ``score >= edges[k]``, in float64."""
        negatives, positives = self.counts.double()
        return positives, negatives, _tail(positives), _tail(negatives)

    def auroc(self) -> float:
        """Area under the ROC curve; a positive and a negative in one bin count as a tie (1/2)."""
        n_pos, n_neg = self._totals("AUROC")
        positives, negatives, true_pos, _ = self._rates()
        # Mann-Whitney: each negative ranks below the positives of higher bins and ties its own bin's.
        return ((negatives * (true_pos - 0.5 * positives)).sum() / (n_pos * n_neg)).item()

    def average_precision(self) -> float:
        """Step-wise average precision, sum over thresholds of ``(R_n - R_{n-1}) P_n``, as scikit-learn."""
        n_pos, _ = self._totals("average precision")
        positives, _, true_pos, false_pos = self._rates()
        # Recall grows only in bins holding positives, where true_pos > 0; the clamp only spares 0/0.
        precision = true_pos / (true_pos + false_pos).clamp_min(1)
        return ((positives * precision).sum() / n_pos).item()

    def f1_max(self) -> float:
        """Best F1 score over the thresholds, ``2PR / (P + R) = 2 TP / (TP + FP + positives)``."""
        # Hand-written: sklearn's precision_recall_curve needs every score kept and sorted; these are bin counts.
        n_pos, _ = self._totals("F1-max", negatives=False)
        _, _, true_pos, false_pos = self._rates()
        return (2 * true_pos / (true_pos + false_pos + n_pos)).max().item()

    def f1_best_threshold(self) -> float:
        """The bin edge ``t`` whose rule ``score >= t`` has the highest F1 (the lowest such edge on ties)."""
        # Hand-written for the same reason as f1_max: bin counts, not sorted scores.
        n_pos, _ = self._totals("the F1-best threshold", negatives=False)
        _, _, true_pos, false_pos = self._rates()
        return self.edges[int(torch.argmax(2 * true_pos / (true_pos + false_pos + n_pos)))].item()

    def curve(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(thresholds, true_pos, false_pos)``, float64 ``(K,)`` each: the lower edges of the
        ``K`` non-empty bins, highest first, and the counts of positives and negatives with
        ``score >= threshold``. ROC (``false_pos / negatives``, ``true_pos / positives``) and
        precision-recall curves follow; they equal scikit-learn's ``roc_curve(...,
        drop_intermediate=False)`` and ``precision_recall_curve`` on the bin indices, without
        their extra end point."""
        positives, negatives, true_pos, false_pos = self._rates()
        filled = torch.nonzero((positives + negatives) > 0).reshape(-1).flip(0)
        return self.edges[filled], true_pos[filled], false_pos[filled]

    def fpr_at_thresholds(self, thresholds: Tensor) -> Tensor:
        """False positive rate of ``score >= t`` for each threshold, float64 of the same shape.

        Exact when ``t`` is a bin edge (see ``edges``); otherwise every score in ``t``'s bin
        counts as ``>= t``. Thresholds outside the range are clamped like scores.
        """
        _, n_neg = self._totals("the false positive rate", positives=False)
        edges = self.edges
        index = torch.searchsorted(edges, thresholds.to(edges), right=True).sub_(1).clamp_(min=0)
        return _tail(self.counts[0].double())[index] / n_neg


def _maps(values: Tensor, name: str) -> Tensor:
    """``(B, H, W)`` from ``(B, H, W)`` or ``(B, 1, H, W)``."""
    if values.dim() == 4 and values.shape[1] == 1:
        values = values[:, 0]
    if values.dim() != 3:
        raise ValueError(f"{name} must be (B, H, W) or (B, 1, H, W), got {tuple(values.shape)}")
    return values


class PROCurve:
    """Per-region overlap (PRO) curve and its normalised area AUPRO, as MVTec AD defines them.

    The regions are the 8-connected components of every ground-truth mask. At threshold ``t``, a
    region's overlap is the fraction of its pixels with ``score >= t``; PRO(t) averages it over
    all regions of all images, each region weighing the same whatever its size. PRO is plotted
    against the false positive rate over all normal pixels, and AUPRO is the area under that
    curve for FPR in ``[0, fpr_limit]``, divided by ``fpr_limit``.

    Thresholds are the ``thresholds`` bin edges over ``[low, high]`` (scores outside are clamped):
    PRO and FPR are exact there and the curve is linear in between, so a tight ``[low, high]``
    around the scores of normal pixels keeps it fine where FPR <= fpr_limit.

    Memory is O(thresholds), whatever the number of images or regions. The running sum over
    regions of their overlap curves is kept as its per-bin increments: a region pixel in bin
    ``b`` adds ``1 / region size`` to ``region_weights[b]``, so the sum of the overlaps at
    threshold ``k`` is ``region_weights[k:].sum()``.

    State, for a distributed all-reduce (SUM): ``pixels.counts`` (int64), ``region_weights``
    (float64) and ``regions`` (int64 scalar).

    Args:
        low: lower end of the score range.
        high: upper end of the score range.
        thresholds: number of thresholds (bins).
        device: where the state lives; ``None`` adopts the device of the first update.
    """

    def __init__(
        self, low: float, high: float, thresholds: int = 4096, device: torch.device | str | None = None
    ) -> None:
        self.pixels = BinnedScores(low, high, thresholds, device)
        self.region_weights = torch.zeros(thresholds, dtype=torch.float64, device=device)
        self.regions = torch.zeros((), dtype=torch.int64, device=device)

    def reset(self) -> None:
        """Forget every update."""
        self.pixels.reset()
        self.region_weights.zero_()
        self.regions.zero_()

    def update(self, scores: Tensor, masks: Tensor) -> None:
        """Add anomaly maps ``scores`` ``(B, H, W)`` with binary ``masks`` ``(B, H, W)`` or ``(B, 1, H, W)``."""
        scores, masks = _maps(scores, "scores"), _maps(masks, "masks")
        if scores.shape != masks.shape:
            raise ValueError(f"scores {tuple(scores.shape)} and masks {tuple(masks.shape)} differ in shape")
        self.pixels.update(scores, masks)  # checks the masks are binary; its negatives give the FPR
        device = self.pixels.counts.device
        self.region_weights, self.regions = self.region_weights.to(device), self.regions.to(device)

        labels, count = ndimage.label(masks.detach().cpu().numpy() != 0, structure=_SLICE_8_CONNECTED)
        if count == 0:
            return
        labels = labels.ravel()
        where = np.flatnonzero(labels)
        region = labels[where]
        weights = 1.0 / np.bincount(region)[region]  # every region's pixels add up to 1
        region_scores = scores.detach().reshape(-1)[torch.from_numpy(where).to(scores.device)]
        bins = self.pixels.bin_index(region_scores).to(device)
        self.region_weights.index_add_(0, bins, torch.from_numpy(weights).to(device))
        self.regions += count

    def merge(self, other: PROCurve) -> None:
        """Add ``other``'s state, as if its updates had been made here."""
        self.pixels.merge(other.pixels)
        self.region_weights += other.region_weights.to(self.region_weights.device)
        self.regions += other.regions.to(self.regions.device)

    def curve(self) -> tuple[Tensor, Tensor]:
        """``(fpr, pro)``, float64 ``(thresholds + 1,)`` each, by ascending FPR.

        The first point, ``(0, 0)``, is the threshold above every score; the last, ``(1, 1)``, is
        the lowest edge, at or below every (clamped) score.
        """
        regions = int(self.regions)
        if regions == 0:
            raise ValueError("PRO needs at least one anomalous region, got none")
        fpr = self.pixels.fpr_at_thresholds(self.pixels.edges)
        pro = _tail(self.region_weights) / regions
        zero = fpr.new_zeros(1)
        return torch.cat([zero, fpr.flip(0)]), torch.cat([zero, pro.flip(0)])

    def aupro(self, fpr_limit: float = 0.3) -> float:
        """Area under PRO(FPR) for FPR in ``[0, fpr_limit]``, divided by ``fpr_limit``.

        As in the MVTec AD reference: trapezoids over the points with FPR <= fpr_limit, closed by
        the curve linearly interpolated at fpr_limit. A perfect detector gets 1. A detector no
        better than chance gets ``fpr_limit / 2`` (0.15 by default), and so does a constant score:
        its curve is the straight line from (0, 0) to (1, 1).
        """
        if not 0 < fpr_limit <= 1:
            raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
        fpr, pro = (values.cpu() for values in self.curve())
        n = int(torch.searchsorted(fpr, fpr_limit, right=True))  # points with FPR <= limit; fpr[0] = 0
        if n == len(fpr):
            end = pro[-1]
        else:  # fpr[n - 1] <= fpr_limit < fpr[n]
            end = pro[n - 1] + (pro[n] - pro[n - 1]) * (fpr_limit - fpr[n - 1]) / (fpr[n] - fpr[n - 1])
        x = torch.cat([fpr[:n], fpr.new_tensor([fpr_limit])])
        y = torch.cat([pro[:n], end.reshape(1)])
        return (torch.trapezoid(y, x) / fpr_limit).item()


def image_metrics(
    scores: Tensor | np.ndarray | Sequence[float], labels: Tensor | np.ndarray | Sequence[int]
) -> dict[str, float]:
    """Exact image-level ``{'auroc', 'ap', 'f1_max'}`` with scikit-learn (one score per image).

    ``f1_max`` is the best ``2PR / (P + R)`` along ``precision_recall_curve``, skipping its 0/0 points.
    """
    scores = scores.detach().cpu().double().numpy() if isinstance(scores, Tensor) else np.asarray(scores, np.float64)
    labels = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    scores, labels = scores.ravel(), labels.ravel()
    if scores.size != labels.size:
        raise ValueError(f"{scores.size} scores but {labels.size} labels")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be binary: bool or 0/1")
    labels = labels.astype(bool)
    if labels.all() or not labels.any():
        raise ValueError(
            f"image metrics need normal and anomalous images, got {int(labels.sum())} anomalous of {labels.size}"
        )
    precision, recall, _ = precision_recall_curve(labels, scores)
    total = precision + recall
    f1 = 2 * precision * recall / np.where(total > 0, total, 1)
    return {
        "auroc": float(roc_auc_score(labels, scores)),
        "ap": float(average_precision_score(labels, scores)),
        "f1_max": float(f1.max()),
    }
