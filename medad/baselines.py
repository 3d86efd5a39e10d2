"""The paper's baselines through MVFA's bundle: their "training" run, which trains nothing.

A baseline (``method: clip`` or ``memory``, see :mod:`medad.detector`) has no adapters. Where the
bundle would run the trainer, :class:`BaselineBuild` builds what the baseline has: with few-shot
support images (``configs/fewshot.json``) the memory bank (``memory``), the calibration and the
decision thresholds from them, exactly as :class:`medad.handlers.FewShotMemoryHandler` does after
MVFA's training; then it writes ``model.pt``. Evaluation and inference read it like any model.
"""

from __future__ import annotations

import logging
import os

import torch

from medad.checkpoint import save_model
from medad.detector import unwrap
from medad.handlers import FewShotMemoryHandler, is_saving_rank

__all__ = ["BaselineBuild"]

logger = logging.getLogger(__name__)


class BaselineBuild:
    """Build a baseline detector and save it; ``run()`` does it (the bundle runs it in place of
    the trainer for ``method`` other than ``mvfa``).

    Args:
        network: the baseline detector (``medad.build_detector(..., method=...)``).
        save_path: where ``model.pt`` is written (atomically; by the saving rank only).
        support: the few-shot items' memory/calibration builder (``train#fewshot_memory``);
            ``None`` without support images (zero-shot), where the ``memory`` baseline has
            nothing to remember and is refused.
    """

    def __init__(
        self, network: torch.nn.Module, save_path: str | os.PathLike, support: FewShotMemoryHandler | None = None
    ) -> None:
        self.network, self.save_path, self.support = network, save_path, support

    def run(self) -> None:
        detector = unwrap(self.network)
        if detector.method == "mvfa":
            raise ValueError("BaselineBuild builds the clip and memory baselines; MVFA models are trained")
        if self.support is not None:
            self.support.build(detector)
        elif detector.takes_memory:
            raise ValueError(
                "the memory baseline is a few-shot memory bank: it needs support images (merge "
                "configs/fewshot.json and give shot k)"
            )
        if is_saving_rank():
            save_model(detector, self.save_path)
        logger.info(
            "%s baseline built (nothing to train; %s): thresholds %s; saved %s", detector.method,
            "memory and calibration from the support images" if self.support is not None else "zero-shot",
            detector.effective_thresholds(), self.save_path,
        )
