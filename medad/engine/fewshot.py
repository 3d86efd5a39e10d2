"""The few-shot support set of a target: MVFA's training set (each image augmented x11), and
normal-only adaptation of a trained model without training."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch

from medad.engine.adaptation import adapt_to_normal_images
from medad.model.augment import FEWSHOT_AUGMENTATIONS, augment_fewshot
from medad.io.checks import check_items
from medad.io.data import fewshot_selection
from medad.model.detector import MVFADetector, unwrap
from medad.model.methods import get_method
from medad.model.checkpoint import CheckpointError, describe, save_model
from medad.io.transforms import mvfa_preprocessing, plain_tensor

__all__ = ["NormalOnlyAdaptation", "checked_init_checkpoint", "fewshot_training_data", "support_items"]

logger = logging.getLogger(__name__)


def support_items(
    dataset_dir: str | os.PathLike,
    target: str,
    shot: int,
    seed_file: str | os.PathLike | None = None,
    seed_index: int = 0,
    seed: int = 0,
    abnormal_shots: int | None = None,
) -> list[dict]:
    """The checked support items of ``target`` (file paths; :func:`medad.io.data.fewshot_selection`).

    Every support image matters: a bad one stops the run instead of being left out."""
    return check_items(
        fewshot_selection(dataset_dir, target, shot, seed_file, seed_index, seed, abnormal_shots),
        remedy="every support image is needed: fix it, or pick other shots (another seed_index, seed_dir or seed)",
    )


def _load(items: Sequence[dict], image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 3, S, S)`` and masks ``(N, 1, S, S)`` (zeros where an item has none)."""
    preprocess = mvfa_preprocessing(image_size)
    loaded = [preprocess(dict(item)) for item in items]
    images = torch.stack([plain_tensor(item["image"]) for item in loaded])
    masks = torch.stack([plain_tensor(item["mask"]) for item in loaded])
    return images, masks


def fewshot_training_data(items: Sequence[dict], image_size: int = 240) -> list[dict]:
    """Preprocessed, augmented few-shot training items (abnormal first, then normal).

    Items carry ``image`` (3, S, S), ``mask`` (1, S, S), ``label``, ``dataset``, ``has_mask`` and
    ``index`` (for caching per item). An abnormal image without a mask has ``has_mask`` False: it
    trains the detection adapters only, as MVFA trains on data sets without masks. The normal
    items also form the memory bank, all of them the calibration set.
    """
    out: list[dict] = []
    for label in (1, 0):
        group = [item for item in items if int(item["label"]) == label]
        if not group:
            continue
        images, masks = augment_fewshot(*_load(group, image_size))
        flags = [bool(item.get("has_mask")) for item in group] * FEWSHOT_AUGMENTATIONS  # grouped by transform
        names = [item["dataset"] for item in group] * FEWSHOT_AUGMENTATIONS
        out += [
            {"image": image, "mask": mask, "label": label, "dataset": name, "has_mask": flag, "index": len(out) + i}
            for i, (image, mask, flag, name) in enumerate(zip(images, masks, flags, names))
        ]
    return out


#: Why normal-only adaptation needs a trained model to start from.
_NEEDS_A_MODEL = (
    "normal-only adaptation (abnormal_shots 0) adapts a trained model without training it: give "
    "init_checkpoint, a zero-shot models/model.pt or a released MVFA adapter file"
)


def checked_init_checkpoint(
    init_checkpoint: str | os.PathLike | None, abnormal_shots: int, method: str = "mvfa", clip_model: str | None = None
) -> str | None:
    """``init_checkpoint`` (as a string) once it is known to fit a few-shot run; the bundle checks
    it before it builds anything (the backbone, the support images), so a wrong one is refused in
    seconds.

    Normal-only adaptation (``abnormal_shots`` 0, MVFA) needs one. One given must be a readable
    MVFA model file: a medad ``model.pt`` made with MVFA's adapters for ``clip_model`` (when
    given), or released MVFA adapters (``seg_adapters``/``det_adapters``; their shapes are checked
    when they are loaded into the backbone).

    Raises:
        ValueError: normal-only adaptation without one, or one for a baseline ``method``.
        FileNotFoundError: no such file.
        CheckpointError: an unreadable, unsafe or foreign file, a baseline's model, or a model of
            another backbone; the message names the file.
    """
    trained = get_method(method).trained
    if init_checkpoint is None:
        if trained and abnormal_shots == 0:
            raise ValueError(_NEEDS_A_MODEL)
        return None
    if not trained:
        raise ValueError(
            f"init_checkpoint {init_checkpoint}: starts MVFA's adapters, but method {method!r} has none: leave it unset"
        )
    description = describe(init_checkpoint)  # None for released adapters
    if description is not None and not get_method(description.method).trained:
        raise CheckpointError(
            f"{init_checkpoint}: the {description.method!r} baseline, which has no adapters to start from: give a "
            "zero-shot MVFA models/model.pt or a released MVFA adapter file"
        )
    if description is not None and clip_model is not None and description.backbone.model_name != clip_model:
        raise CheckpointError(
            f"{init_checkpoint}: made for clip_model={description.backbone.model_name!r}, but this run builds "
            f"{clip_model!r}: give --clip_model {description.backbone.model_name} (and the CLIP weights it was made with)"
        )
    return str(init_checkpoint)


class NormalOnlyAdaptation:
    """Normal-only few-shot adaptation of a trained detector (``abnormal_shots: 0``): no adapter
    training; MVFA's memory bank of the normal support images (augmented x11), and calibration
    and thresholds from normal images only by the held-out rule of
    :func:`medad.engine.adaptation.adapt_to_normal_images`; then ``save_path`` (``model.pt``) is written
    atomically. ``run()`` does it, so that the bundle runs it where it would run the trainer.

    Args:
        network: the detector (built from ``init_checkpoint``: a zero-shot ``model.pt`` or
            released MVFA adapters).
        items: support items (:func:`support_items` with ``abnormal_shots=0``): normal images only.
        image_size: the model's input size.
        save_path: where the adapted model is written.
        batch_size: images per forward pass.
        init_checkpoint: what ``network`` was built from (required: the adapters are not trained).
        fitted: records of the support images (:func:`medad.io.data.fitted_records`), stored with
            the model so that evaluation leaves them out.

    The bundle builds it for every few-shot run and runs it where MVFA's
    :meth:`medad.model.methods.Method.fitting` chooses it (``abnormal_shots`` 0), having checked
    ``init_checkpoint`` before anything else (:func:`checked_init_checkpoint`).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        items: Sequence[dict],
        image_size: int,
        save_path: str | os.PathLike,
        batch_size: int = 8,
        init_checkpoint: str | os.PathLike | None = None,
        fitted: Sequence[dict] = (),
    ) -> None:
        self.network, self.items, self.image_size = network, list(items), image_size
        self.save_path, self.batch_size, self.init_checkpoint = save_path, batch_size, init_checkpoint
        self.fitted = list(fitted)

    def run(self) -> None:
        """Build the memory bank and calibration from the normal support images and save the model.

        Raises:
            ValueError: without ``init_checkpoint``, or with abnormal items."""
        if self.init_checkpoint is None:
            raise ValueError(_NEEDS_A_MODEL)
        abnormal = [item["image"] for item in self.items if int(item["label"]) == 1]
        if abnormal:
            raise ValueError(
                f"normal-only adaptation takes normal images only, got {len(abnormal)} abnormal ones: {abnormal[:3]}"
            )
        detector: MVFADetector = unwrap(self.network).eval()
        images, _ = _load(self.items, self.image_size)
        thresholds = adapt_to_normal_images(detector, images, augment=True, batch_size=self.batch_size)
        detector.set_fitted(self.fitted)  # a new memory: earlier support and calibration no longer apply
        save_model(detector, self.save_path)
        logger.info(
            "normal-only adaptation to %d normal images: thresholds %s; saved %s", len(images), thresholds, self.save_path
        )
