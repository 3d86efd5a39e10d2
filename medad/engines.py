"""MONAI engines for MVFA: a SupervisedTrainer and a SupervisedEvaluator with MVFA's iteration.

The trainer needs its own iteration because MVFA updates two adapter sets differently: data
sets with masks train the seg adapters (focal + Dice) and the det adapters (BCE) together,
data sets without masks update only the det adapters; and each sample is aligned with the
text features of its own data set. The evaluator returns MVFA's raw zero-/few-shot scores
beside the final map, so that metrics can fuse them over the whole set as the paper does.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import torch
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import convert_to_dst_type
from monai.utils.enums import CommonKeys as Keys
from torch import nn

from medad.detector import unwrap

__all__ = ["MVFAEvaluator", "MVFATrainer", "adapter_parameter_groups"]


def adapter_parameter_groups(network: nn.Module) -> list[dict]:
    """Optimiser parameter groups: the seg adapters, then the det adapters (CLIP stays out).

    MVFA gives each adapter set its own Adam with the same settings; one Adam with two groups
    is the same optimiser, because Adam keeps its state per parameter and skips parameters
    without gradients, which is how a set is left out of a step here.
    """
    encoder = unwrap(network).encoder
    return [
        {"params": list(encoder.seg_adapters.parameters()), "name": "seg_adapters"},
        {"params": list(encoder.det_adapters.parameters()), "name": "det_adapters"},
    ]


def _plain(tensor: torch.Tensor, device: torch.device, non_blocking: bool = False) -> torch.Tensor:
    """A plain tensor on ``device`` (MONAI MetaTensors only slow the network down)."""
    tensor = tensor.as_tensor() if hasattr(tensor, "as_tensor") else torch.as_tensor(tensor)
    return tensor.to(device, non_blocking=non_blocking)


class MVFATrainer(SupervisedTrainer):
    """``SupervisedTrainer`` running MVFA's training step.

    Batches are dictionaries with ``image`` (B, 3, S, S), ``mask`` (B, 1, S, S), ``label`` (B,),
    ``dataset`` (names) and ``has_mask`` (B,). The network is an :class:`MVFADetector`, the
    loss an :class:`medad.AlignmentLoss` and the optimiser built on
    :func:`adapter_parameter_groups`.

    Per sample the loss is ``seg + det`` where the data set has masks and ``det`` otherwise,
    averaged over the batch. The seg adapters learn only from samples with masks (both their
    losses, as in MVFA), the det adapters from all; a batch mixing both kinds therefore takes
    two backward passes through the adapted blocks, a uniform batch one.

    Args:
        cache_trunk: keep the frozen blocks' output before the first adapter for every sample
            (by its ``index`` key) and reuse it in later epochs: exact for a fixed training set
            such as the few-shot one, where it saves those blocks' forward pass from epoch 2 on.
        kwargs: ``SupervisedTrainer``'s arguments.
    """

    def __init__(self, *args: Any, cache_trunk: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cache_trunk = cache_trunk
        self._trunk_cache: dict[int, torch.Tensor] = {}

    def _trunk(self, encoder: nn.Module, images: torch.Tensor, batchdata: Mapping[str, Any]) -> torch.Tensor:
        if not self.cache_trunk:
            return encoder.trunk(images)
        if "index" not in batchdata:
            raise KeyError("cache_trunk needs an 'index' key per sample (see medad.fewshot.fewshot_training_data)")
        indices = [int(i) for i in batchdata["index"]]
        missing = [n for n, i in enumerate(indices) if i not in self._trunk_cache]
        if missing:
            for n, hidden in zip(missing, encoder.trunk(images[missing])):
                self._trunk_cache[indices[n]] = hidden
        return torch.stack([self._trunk_cache[i] for i in indices])

    def _iteration(self, engine: MVFATrainer, batchdata: Mapping[str, Any]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        device, non_blocking = engine.state.device, engine.non_blocking
        images = _plain(batchdata[Keys.IMAGE], device, non_blocking)
        masks = _plain(batchdata["mask"], device, non_blocking)
        labels = _plain(batchdata[Keys.LABEL], device, non_blocking)
        supervised = _plain(batchdata["has_mask"], device, non_blocking).bool().reshape(-1)
        detector = unwrap(engine.network)
        text = detector.text_features_for(list(batchdata["dataset"]))

        engine.state.output = {Keys.IMAGE: images, Keys.LABEL: labels}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, **engine.amp_kwargs) if engine.amp else nullcontext():
            hidden = engine._trunk(detector.encoder, images, batchdata)
            tokens = engine.inferer(hidden, detector.encoder.adapt)
            engine.state.output[Keys.PRED] = tokens
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            losses = engine.loss_function(tokens.seg, tokens.det, text, masks, labels)
        weight = supervised.to(losses.seg.dtype)
        loss = (weight * losses.seg + losses.det).mean()
        engine.state.output.update({Keys.LOSS: loss.detach(), "seg_loss": losses.seg.detach(), "det_loss": losses.det.detach()})
        engine.fire_event(IterationEvents.LOSS_COMPLETED)

        seg_params = [p for p in detector.encoder.seg_adapters.parameters() if p.requires_grad]
        det_params = [p for p in detector.encoder.det_adapters.parameters() if p.requires_grad]
        if bool(supervised.all()):
            loss.backward()
        else:
            if bool(supervised.any()):
                seg_objective = (weight * (losses.seg + losses.det)).mean()
                torch.autograd.backward(seg_objective, inputs=seg_params, retain_graph=True)
            torch.autograd.backward(loss, inputs=det_params)
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class MVFAEvaluator(SupervisedEvaluator):
    """``SupervisedEvaluator`` whose output holds, per batch: ``pred`` (the final anomaly map,
    (B, 1, S, S)), ``score`` (B,), MVFA's raw ``zero_map``, ``zero_score`` and, with a memory
    bank, ``few_map`` and ``few_score``, and ``label``/``mask`` where the data has them.

    The inferer must return :class:`medad.RawScores` (see :class:`medad.inferers.AnomalyInferer`).
    Final maps use the detector's stored calibration; a detector with a memory bank but no
    calibration yet leaves ``pred``/``score`` out (set-level metrics only need the raw scores).
    """

    def _iteration(self, engine: MVFAEvaluator, batchdata: Mapping[str, Any]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        device = engine.state.device
        images = batchdata[Keys.IMAGE]
        detector = unwrap(engine.network)
        engine.state.output = {Keys.IMAGE: images}
        for key in (Keys.LABEL, "mask"):
            if key in batchdata:
                engine.state.output[key] = _plain(batchdata[key], device, engine.non_blocking)
        with engine.mode(engine.network):
            with torch.autocast(device.type, **engine.amp_kwargs) if engine.amp else nullcontext():
                raw = engine.inferer(_plain(images, device, engine.non_blocking), engine.network)
            engine.state.output.update({k: v for k, v in raw._asdict().items() if v is not None})
            if raw.few_map is None or detector.is_calibrated:
                final = detector.finalize(raw)
                # keep the image's meta data (file name, geometry, applied transforms) for saving
                pred = convert_to_dst_type(final.anomaly_map.unsqueeze(1), images)[0]
                engine.state.output[Keys.PRED] = pred
                engine.state.output["score"] = final.score
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
