"""MONAI engines for MVFA: a SupervisedTrainer and a SupervisedEvaluator with MVFA's iteration.

The trainer needs its own iteration because MVFA updates two adapter sets differently: data
sets with masks train the seg adapters (focal + Dice) and the det adapters (BCE) together,
data sets without masks update only the det adapters; and each sample is aligned with the
text features of its own data set. The evaluator returns MVFA's raw zero-/few-shot scores
beside the final map, so that metrics can fuse them over the whole set as the paper does.

The trainer also runs under ``torch.nn.parallel.DistributedDataParallel`` (see
``configs/multi_gpu_train.json``): its one backward pass routes each adapter set's gradient
by itself, so DDP's all-reduce averages exactly the gradients of the single-process rule.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import convert_to_dst_type, ensure_tuple
from monai.utils.enums import CommonKeys as Keys
from torch import nn

from medad.model.detector import unwrap
from medad.engine.inferers import final_scores
from medad.io.transforms import plain_tensor

__all__ = ["MVFAEvaluator", "MVFATrainer", "adapter_parameter_groups"]


def adapter_parameter_groups(network: nn.Module) -> list[dict]:
    """Optimiser parameter groups: the seg adapters, then the det adapters (CLIP stays out).

    MVFA gives each adapter set its own Adam with the same settings; one Adam with two groups
    is the same optimiser, because Adam keeps its state per parameter and skips parameters
    without gradients, which is how a set is left out of a step here. A baseline has no adapters:
    both groups are empty (the bundle builds its optimiser, but never trains a baseline).
    """
    detector = unwrap(network)
    encoder = detector.encoder
    if not detector.method.trained:
        return [{"params": [], "name": "seg_adapters"}, {"params": [], "name": "det_adapters"}]
    return [
        {"params": list(encoder.seg_adapters.parameters()), "name": "seg_adapters"},
        {"params": list(encoder.det_adapters.parameters()), "name": "det_adapters"},
    ]


class MVFATrainer(SupervisedTrainer):
    """``SupervisedTrainer`` running MVFA's training step.

    Batches are dictionaries with ``image`` (B, 3, S, S), ``mask`` (B, 1, S, S), ``label`` (B,),
    ``dataset`` (names) and ``has_mask`` (B,). The network is an :class:`medad.MVFADetector`, the
    loss an :class:`medad.AlignmentLoss` and the optimiser built on
    :func:`adapter_parameter_groups`.

    Per sample the loss is ``seg + det`` where the data set has masks and ``det`` otherwise,
    averaged over the batch. The seg adapters learn only from samples with masks (both their
    losses, as in MVFA), the det adapters from all; a batch without masks leaves the seg
    adapters out of the step. One backward pass does both (see :func:`_seg_adapters_learn_from`).

    The network may be the detector or the detector wrapped in ``DistributedDataParallel``
    (``find_unused_parameters=True``: the last level's fc2 is never used, and the seg adapters
    are unused on a rank whose batch has no mask). The adapted blocks then run inside DDP's
    forward, so every rank joins every all-reduce, and DDP's mean over ranks of the per-rank
    batch means is the mean over the global batch when the ranks' batches have equal sizes
    (``DistributedSampler(even_divisible=True)``). Parameters no rank used keep no gradient, so
    a global batch without masks skips the seg adapters' Adam step, as a single process does.

    ``amp=True`` (training's alone: :class:`MVFAEvaluator` refuses it) runs the forward pass
    under ``torch.autocast`` (fp16 on CUDA, bf16 on CPUs): the frozen blocks' matrix products
    take its dtype where the backbone's ``precision`` is float32, while the patch embedding, the
    adapters, their tokens and the losses stay float32 islands (:mod:`medad.model.network`,
    :func:`medad.model.scoring.float32_region`). On CUDA it scales the loss with MONAI's ``GradScaler``
    (``self.scaler``) as ``SupervisedTrainer`` does, so that the small gradients flowing back
    through the fp16 blocks do not underflow.

    Args:
        cache_trunk: keep the frozen blocks' output before the first adapter for every sample
            (by its ``index`` key) and reuse it in later epochs: exact for a fixed training set
            such as the few-shot one, where it saves those blocks' forward pass from epoch 2 on.
        fewshot_memory: a :class:`medad.engine.handlers.FewShotMemoryHandler`, attached before every
            handler of ``train_handlers``: the memory bank, calibration and thresholds are built
            before any handler saves the model when training completes.
        kwargs: ``SupervisedTrainer``'s arguments.
    """

    def __init__(
        self, *args: Any, cache_trunk: bool = False, fewshot_memory: Any = None, train_handlers: Any = None, **kwargs: Any
    ) -> None:
        self.fewshot_memory = fewshot_memory
        if fewshot_memory is not None:
            # first of the handlers MONAI attaches in list order (see fewshot_memory)
            train_handlers = [fewshot_memory, *(() if train_handlers is None else ensure_tuple(train_handlers))]
        super().__init__(*args, train_handlers=train_handlers, **kwargs)
        self.cache_trunk = cache_trunk
        self._trunk_cache: dict[int, torch.Tensor] = {}

    def _trunk(self, encoder: nn.Module, images: torch.Tensor, batchdata: Mapping[str, Any]) -> torch.Tensor:
        if not self.cache_trunk:
            return encoder.trunk(images)
        if "index" not in batchdata:
            raise KeyError("cache_trunk needs an 'index' key per sample (see medad.engine.fewshot.fewshot_training_data)")
        indices = [int(i) for i in batchdata["index"]]
        missing = [n for n, i in enumerate(indices) if i not in self._trunk_cache]
        if missing:
            for n, hidden in zip(missing, encoder.trunk(images[missing])):
                self._trunk_cache[indices[n]] = hidden
        return torch.stack([self._trunk_cache[i] for i in indices])

    # private by name only: MONAI's workflows hand _iteration to ignite as the step, and subclassing
    # it is how MONAI's own trainers and evaluators differ; the public iteration_update= argument
    # would move the step out of the class that bundle configs name
    def _iteration(self, engine: MVFATrainer, batchdata: Mapping[str, Any]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        device, non_blocking = engine.state.device, engine.non_blocking
        images = plain_tensor(batchdata[Keys.IMAGE], device, non_blocking)
        masks = plain_tensor(batchdata["mask"], device, non_blocking)
        labels = plain_tensor(batchdata[Keys.LABEL], device, non_blocking)
        supervised = plain_tensor(batchdata["has_mask"], device, non_blocking).bool().reshape(-1)
        detector = unwrap(engine.network)
        text = detector.text_features_for(list(batchdata["dataset"]))

        engine.state.output = {Keys.IMAGE: images, Keys.LABEL: labels}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, **engine.amp_kwargs) if engine.amp else nullcontext():
            hidden = engine._trunk(detector.encoder, images, batchdata)
            with _adapting(engine.network) as network, _seg_adapters_learn_from(detector.encoder, supervised):
                tokens = engine.inferer(hidden, network)
            engine.state.output[Keys.PRED] = tokens
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            losses = engine.loss_function(tokens.seg, tokens.det, text, masks, labels)
        weight = supervised.to(losses.seg.dtype)
        loss = (weight * losses.seg + losses.det).mean()
        engine.state.output.update({Keys.LOSS: loss.detach(), "seg_loss": losses.seg.detach(), "det_loss": losses.det.detach()})
        engine.fire_event(IterationEvents.LOSS_COMPLETED)

        scaler = engine.scaler if engine.amp and engine.scaler is not None and engine.scaler.is_enabled() else None
        (loss if scaler is None else scaler.scale(loss)).backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if scaler is None:
            engine.optimizer.step()
        else:
            scaler.step(engine.optimizer)
            scaler.update()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


@contextmanager
def _adapting(network: nn.Module) -> Iterator[nn.Module]:
    """``network`` (a detector, or its DDP wrapper) made to run the adapted blocks when called.

    Training runs :meth:`medad.model.network.AdaptedVisualTower.adapt` on the frozen trunk's
    (possibly cached) output, not the detector's forward (images to maps). DDP only reduces the
    gradients of outputs of its own forward, which calls the wrapped module; so the detector's
    ``forward`` is that step while the block runs (the detector's ``_forward_adapts`` switch, not
    an instance attribute over its ``forward`` method).
    """
    detector = unwrap(network)
    detector._forward_adapts = True
    try:
        yield network
    finally:
        detector._forward_adapts = False


@contextmanager
def _seg_adapters_learn_from(encoder: nn.Module, supervised: torch.Tensor) -> Iterator[None]:
    """Within the block, the seg adapters' weights learn only from the rows where ``supervised``.

    MVFA's rule: the seg adapters get the gradient of ``mean(w * (seg + det))`` (``w`` = has a
    mask, the mean over the whole batch), the det adapters that of the loss
    ``mean(w * seg + det)``. The two differ by the det loss of rows without masks, which must
    reach the det adapters also through the seg adapters' corrections in the residual stream,
    but not the seg adapters' weights. So those rows run the seg adapters' linear layers with
    detached weights: values and the gradient flowing on to the stream are unchanged, and one
    backward of the loss gives both sets their gradients (rows are independent in the network).
    A batch without masks leaves the seg weights out of the graph: no gradient, no Adam step.
    """
    if bool(supervised.all()):
        yield
        return
    live = supervised.reshape(-1, 1, 1) if bool(supervised.any()) else None

    def route(linear: nn.Linear, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        bias = None if linear.bias is None else linear.bias.detach()
        frozen = F.linear(args[0], linear.weight.detach(), bias)
        return frozen if live is None else torch.where(live, output, frozen)

    linears = [module for module in encoder.seg_adapters.modules() if isinstance(module, nn.Linear)]
    handles = [linear.register_forward_hook(route) for linear in linears]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class MVFAEvaluator(SupervisedEvaluator):
    """``SupervisedEvaluator`` whose output holds, per batch: ``pred`` (the final anomaly map,
    (B, 1, S, S)), ``score`` (B,), MVFA's raw ``zero_map``, ``zero_score`` and, with a memory
    bank, ``few_map`` and ``few_score``, and ``label``/``mask`` where the data has them.

    The inferer returns :class:`medad.RawScores` for images (see
    :class:`medad.engine.inferers.AnomalyInferer`); final maps use the detector's stored calibration,
    and a detector with a memory bank but no calibration yet leaves ``pred``/``score`` out
    (set-level metrics only need the raw scores). For volumes it returns final
    :class:`medad.engine.volumes.VolumeScores`: ``pred`` is then (B, 1, H, W, D), and ``score_p95``,
    ``slice_scores`` and ``empty_slices`` are added.

    Evaluation and inference run the detector at its own ``precision`` (float32 unless the
    model was loaded with ``bf16``/``fp16`` matrix products); ``amp`` is a training option.

    Args:
        skip_blank: apply the blank rule of :func:`medad.engine.volumes.predict_images` to 2D images
            (map and score 0; ``blank`` in the output), as volumes' empty slices get (inference).
        kwargs: ``SupervisedEvaluator``'s arguments.

    Raises:
        ValueError: ``amp=True``.
    """

    def __init__(self, *args: Any, skip_blank: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.amp:
            raise ValueError("amp is a training option: evaluation and inference run the model at its precision "
                             "(float32, or bf16/fp16 matrix products in the frozen blocks with precision='bf16'/'fp16')")
        self.skip_blank = skip_blank

    # private by name only: MONAI's step hook, as MVFATrainer._iteration
    def _iteration(self, engine: MVFAEvaluator, batchdata: Mapping[str, Any]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        device = engine.state.device
        images = batchdata[Keys.IMAGE]
        detector = unwrap(engine.network)
        engine.state.output = {Keys.IMAGE: images}
        for key in (Keys.LABEL, "mask", "has_mask"):
            if key in batchdata:
                engine.state.output[key] = plain_tensor(batchdata[key], device, engine.non_blocking)
        with engine.mode(engine.network):
            inputs = plain_tensor(images, device, engine.non_blocking)
            raw = engine.inferer(inputs, engine.network)
            engine.state.output.update({k: v for k, v in raw._asdict().items() if v is not None})
            final, blank = final_scores(detector, raw, inputs, engine.skip_blank)
            if blank is not None:
                engine.state.output["blank"] = blank
            if final is not None:
                # keep the image's meta data (file name, geometry, applied transforms) for saving
                pred = convert_to_dst_type(final.anomaly_map.unsqueeze(1), images)[0]
                if isinstance(pred, MetaTensor):
                    # one channel first, whatever the image's layout was (RGB files: channel last)
                    pred.meta["original_channel_dim"] = "no_channel"
                engine.state.output[Keys.PRED] = pred
                engine.state.output["score"] = final.score
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
