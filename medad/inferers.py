"""The MONAI inferer that turns images into MVFA's raw anomaly scores."""

from __future__ import annotations

from typing import Any

import torch
from monai.inferers import Inferer
from torch import nn

from medad.detector import RawScores, unwrap

__all__ = ["AnomalyInferer"]


class AnomalyInferer(Inferer):
    """Run an :class:`medad.MVFADetector` on a batch of images ``(B, 3, S, S)`` in chunks of at
    most ``batch_size`` images (memory bounded by the chunk, not the batch), returning
    :class:`medad.RawScores` for the whole batch.
    """

    def __init__(self, batch_size: int | None = None) -> None:
        super().__init__()
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = batch_size

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> RawScores:
        detector = unwrap(network)
        chunks = inputs.split(self.batch_size) if self.batch_size else (inputs,)
        parts = [detector.raw_scores(chunk) for chunk in chunks]
        return RawScores(*(None if values[0] is None else torch.cat(values) for values in zip(*parts)))
