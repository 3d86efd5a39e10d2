"""Building and loading detectors: the factory and the CLIP-weights policy.

:func:`build_detector` makes a new :class:`medad.MVFADetector` for a method on any open_clip ViT
(:mod:`medad.model.backbone`); :func:`load_detector` makes the one a ``model.pt`` describes, with the
CLIP weights it records or the caller gives, and never opens a path a model file names unless
the caller allows it. The detector itself (:mod:`medad.model.detector`) knows nothing of weights files.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import open_clip
import torch

from medad.model.backbone import (
    MVFA_IMAGE_SIZE,
    MVFA_MODEL_NAME,
    PRECISIONS,
    BackboneSpec,
    MissingWeightsError,
    create_clip,
    default_image_size,
    resolve_precision,
)
from medad.model.checkpoint import WITH_MODEL_NAME, CheckpointError, ModelDescription, describe, read_checkpoint, weights_record
from medad.model.detector import MVFADetector
from medad.model.methods import Method, get_method
from medad.model.prompts import encode_text_features
from medad.model.towers import vision_tower

__all__ = ["build_detector", "load_detector"]

logger = logging.getLogger(__name__)


def build_detector(
    datasets: Sequence[str],
    target: str | None,
    model_name: str = MVFA_MODEL_NAME,
    image_size: int | None = None,
    pretrained: str | os.PathLike | None = None,
    quick_gelu: bool = False,
    random_init: bool = False,
    levels: Sequence[int] | None = None,
    image_score_from_map: bool = True,
    checkpoint: str | os.PathLike | None = None,
    precision: str = "fp32",
    method: str | Method = "mvfa",
    device: str | torch.device = "cpu",
) -> MVFADetector:
    """Build an :class:`MVFADetector`: load CLIP, encode the prompts of ``datasets`` and ``target``
    once (unless ``checkpoint`` already holds them), keep the visual tower with new adapters
    (or, for a baseline ``method``, without), and drop the text tower.

    ``model_name`` is any open_clip vision-transformer CLIP (:mod:`medad.model.backbone`);
    ``image_size`` ``None``: :func:`medad.model.backbone.default_image_size` (MVFA's 240 px for
    ``ViT-L-14-336``); ``levels`` ``None``: :func:`medad.model.network.default_levels` (MVFA's 6, 12,
    18, 24 for 24 blocks); ``method``: a registered method (:data:`medad.model.methods.METHODS`).

    ``checkpoint`` optionally loads a saved detector or a released MVFA adapter checkpoint;
    ``target`` is the data set scored afterwards, also when the checkpoint was made for another
    (``None``: the checkpoint's own target, or the target of a ``state_dict`` loaded later).
    ``precision`` (``"fp32"``, ``"bf16"``, ``"fp16"``) is that of the frozen blocks' matrix
    products (:data:`medad.model.backbone.PRECISIONS`); stream, adapters, tokens and scores stay in
    float32; ``"auto"``: bf16 where ``device`` has native bf16 products, else fp32
    (:func:`medad.model.backbone.resolve_precision`, which logs its choice).

    The detector comes back on ``device`` in eval mode, as :func:`load_detector`'s does (``monai.bundle.load``
    returns it as built); trainers switch it to train mode.
    """
    method = get_method(method)
    precision = resolve_precision(precision, device)
    backbone = BackboneSpec(model_name, int(image_size or default_image_size(model_name)), bool(quick_gelu))
    clip = create_clip(model_name, backbone.image_size, pretrained, quick_gelu, random_init)
    tower = vision_tower(clip.visual, model_name)
    saved = read_checkpoint(checkpoint) if checkpoint is not None else {}
    saved_description = describe(saved) if checkpoint is not None else None
    saved_target = saved_description.target if saved_description is not None else None
    target = target or saved_target
    known = saved_description.datasets if saved_description is not None else ()
    wanted = [*datasets, target] if target is not None else list(datasets)
    missing = [name for name in dict.fromkeys(wanted) if name not in known]
    text_features = encode_text_features(clip, open_clip.get_tokenizer(model_name), missing)
    dtype = PRECISIONS[precision]
    encoder = method.build_encoder(tower, levels, dtype)
    weights = weights_record(pretrained, random_init, model_name)
    detector = MVFADetector(encoder, text_features, target, backbone, image_score_from_map, weights, method)
    if checkpoint is not None:
        detector.load_state(saved, str(checkpoint))
        if detector.target != target and detector.has_memory:
            logger.warning(
                "%s holds a few-shot memory of %r but scores %r: its memory and calibration do not "
                "describe the new target", checkpoint, detector.target, target
            )
        detector.target = target
        # the backbone is the one built here, whatever weights the checkpoint recorded
        detector.clip_weights = weights
    return detector.to(device).eval()


def _names_a_path(recorded: str) -> bool:
    """Whether a value a model file records names something on this machine (a file or folder, a
    ``local-dir:`` backbone) rather than an open_clip tag or a hub name."""
    text = recorded.removeprefix("local-dir:")
    return recorded.startswith("local-dir:") or any(mark in text for mark in ("/", "\\")) or text.startswith(("~", "."))


def _weights_for(
    model: str, description: ModelDescription | None, clip_weights: str | os.PathLike | None, trust_paths: bool = False
) -> tuple[str | None, bool]:
    """``(pretrained, random_init)`` for loading a trained model: the given weights, else the ones it
    records (a tag, or the seeded random backbone of tests and the demo); a recorded local path
    only where ``trust_paths``."""
    recorded = description.clip_weights if description is not None else None
    if recorded == "random":
        if clip_weights not in (None, ""):
            raise CheckpointError(
                f"{model} was trained on the seeded randomly initialised backbone (a test or demo model): its "
                f"adapters mean nothing on the CLIP weights {str(clip_weights)!r}; leave clip_weights unset"
            )
        logger.warning("%s is a test/demo model: it runs on the seeded RANDOM backbone it was trained on", model)
        return None, True
    if recorded == WITH_MODEL_NAME and clip_weights in (None, ""):
        return None, False  # the hf-hub:/local-dir: model brings its own
    if clip_weights not in (None, ""):
        return str(clip_weights), False
    if recorded is not None and _names_a_path(recorded) and not trust_paths:
        raise CheckpointError(
            f"{model} records a local path as its CLIP weights ({recorded!r}); a model file cannot make medad open "
            "files of its choosing: give that path as clip_weights yourself if you trust it (or trust_model_paths)"
        )
    if recorded is None or recorded.startswith("file:"):
        name = "its CLIP weights" if recorded is None else f"the CLIP weights file {recorded[5:]!r}"
        raise MissingWeightsError(
            f"{model} was trained with {name}: give their path (or an open_clip tag such as 'openai') as clip_weights"
        )
    return recorded, False


def load_detector(
    model: str | os.PathLike,
    clip_weights: str | os.PathLike | None = None,
    target: str | None = None,
    precision: str = "fp32",
    device: str | torch.device = "cpu",
    expect: Mapping[str, Any] | None = None,
    trust_model_paths: bool = False,
) -> MVFADetector:
    """A trained detector from its ``model.pt`` (or released MVFA adapters) and the CLIP weights,
    in eval mode on ``device``: the architecture comes from the file.

    A model file is data: the paths it records (CLIP weights given as a local file path, a
    ``local-dir:`` backbone) are opened only where the caller allows it, by giving the same
    backbone name in ``expect`` (``model_name``) or the weights as ``clip_weights``, or with
    ``trust_model_paths``.

    Args:
        model: a medad ``model.pt``, or a released MVFA adapter checkpoint (MVFA's defaults:
            ``ViT-L-14-336`` at 240 px, blocks 6/12/18/24; give ``target``).
        clip_weights: an open_clip tag, a local OpenAI archive or open_clip checkpoint; ``None``:
            the weights the model records (an open_clip tag, or the seeded random backbone of a
            test or demo model).
        target: the data set to score (default: the model's own).
        precision: the frozen backbone's precision (``"fp32"``, ``"bf16"``, ``"fp16"``; ``"auto"``:
            bf16 where ``device`` has native bf16 products, else fp32).
        expect: architecture values a user gave (``model_name``, ``image_size``, ``levels``,
            ``quick_gelu``, ``method``; ``None`` values are ignored): any that contradicts the file
            is an error.
        trust_model_paths: open the local paths the file records without their being given.

    Raises:
        FileNotFoundError, CheckpointError: the file is missing, unreadable, foreign, or does not
            fit the expected architecture (the message names the file and both values).
        MissingWeightsError: no usable CLIP weights.
    """
    model = str(model)
    description = describe(model)
    architecture = (
        {"model_name": MVFA_MODEL_NAME, "image_size": MVFA_IMAGE_SIZE, "quick_gelu": False, "levels": (6, 12, 18, 24), "method": "mvfa"}
        if description is None
        else {**description.backbone.to_dict(), "levels": tuple(description.levels), "method": description.method}
    )
    for key, value in (expect or {}).items():
        if key not in architecture:
            raise ValueError(f"unknown architecture key {key!r}; expected one of {sorted(architecture)}")
        given = tuple(int(v) for v in value) if key == "levels" and value is not None else value
        if given is not None and given != architecture[key]:
            raise CheckpointError(
                f"{model} was made for {key}={architecture[key]!r}, but {key}={value!r} was given: leave {key} "
                "unset (the model file describes its architecture) or use a model made for that value"
            )
    named = (expect or {}).get("model_name")
    if _names_a_path(architecture["model_name"]) and not trust_model_paths and named != architecture["model_name"]:
        raise CheckpointError(
            f"{model} was made for the local backbone {architecture['model_name']!r}; a model file cannot make medad "
            "open folders of its choosing: give clip_model with that name yourself if you trust it (or trust_model_paths)"
        )
    pretrained, random_init = _weights_for(model, description, clip_weights, trust_model_paths)
    if description is None and target is None:
        raise ValueError(f"{model} holds released MVFA adapters, which name no data set: give target")
    detector = build_detector(
        datasets=[],
        target=target,
        pretrained=pretrained,
        random_init=random_init,
        checkpoint=model,
        precision=precision,
        device=device,
        image_score_from_map=True if description is None else description.image_score_from_map,
        **architecture,
    )
    return detector
