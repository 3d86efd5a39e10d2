"""The baselines through the bundle: the "training" run of a method that trains nothing.

A baseline (a method that trains nothing: ``clip``, ``memory``, ``winclip``; see
:mod:`medad.model.methods`) has no adapters. Where the
bundle would run the trainer, :class:`BaselineBuild` builds what the baseline has: with few-shot
support images (``configs/fewshot.json``) its memory bank (where it takes one), the calibration and the
decision thresholds from them, exactly as :class:`medad.engine.handlers.FewShotMemoryHandler` does after
MVFA's training; then it writes ``model.pt``. Evaluation and inference read it like any model.
"""

from __future__ import annotations

import logging
import os

import torch

from medad.model.checkpoint import save_model
from medad.model.detector import unwrap
from medad.engine.handlers import FewShotMemoryHandler, is_saving_rank

__all__ = ["BaselineBuild"]

logger = logging.getLogger(__name__)


class BaselineBuild:
    """Build a baseline detector and save it; ``run()`` does it (the bundle runs it in place of
    the trainer for a method that trains nothing: :meth:`medad.model.methods.Method.fitting`).

    Args:
        network: the baseline detector (``medad.build_detector(..., method=...)``).
        save_path: where ``model.pt`` is written (atomically; by the saving rank only).
        support: the few-shot items' memory/calibration builder (``train#fewshot_memory``);
            ``None`` without support images (zero-shot), where a method that needs them (the
            ``memory`` baseline) has nothing to remember and is refused.
    """

    def __init__(
        self, network: torch.nn.Module, save_path: str | os.PathLike, support: FewShotMemoryHandler | None = None
    ) -> None:
        self.network, self.save_path, self.support = network, save_path, support

    def run(self) -> None:
        detector = unwrap(self.network)
        method = detector.method
        if method.trained:
            raise ValueError(f"BaselineBuild builds methods that train nothing; {method.name} models are trained")
        if self.support is not None:
            self.support.build(detector)
        elif method.needs_support:
            raise ValueError(
                f"the {method.name} baseline is a few-shot memory bank: it needs support images (merge "
                "configs/fewshot.json and give shot k)"
            )
        if is_saving_rank():
            save_model(detector, self.save_path)
        logger.info(
            "%s baseline built (nothing to train; %s): thresholds %s; saved %s", method.name,
            "memory and calibration from the support images" if self.support is not None else "zero-shot",
            detector.effective_thresholds(), self.save_path,
        )
