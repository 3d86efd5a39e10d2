"""The MVFA anomaly detector: network, text features, few-shot memory and calibration together.

:class:`MVFADetector` is what the bundle trains, saves (``models/model.pt``), evaluates and runs:
its ``state_dict`` holds the adapters, the prompt text features of every data set it knows,
the few-shot memory bank, the fusion calibration and a description of the backbone, but not
the frozen backbone weights, which always come from their own file or tag.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from medad.backbone import BackboneSpec, create_clip, set_precision
from medad.network import MVFA, AdapterTokens
from medad.prompts import encode_text_features
from medad.scoring import FusionRange, few_shot_maps, fuse, zero_shot_maps, zero_shot_scores

__all__ = ["AnomalyScores", "MVFADetector", "RawScores", "build_detector", "read_checkpoint", "unwrap"]

logger = logging.getLogger(__name__)

_FORMAT_VERSION = 1
# Rows of the calibration buffer: the (low, high) range of each raw score.
_CALIBRATION_ROWS = ("zero_map", "few_map", "zero_score", "few_score")


class RawScores(NamedTuple):
    """Unfused scores for a batch; the few-shot ones are ``None`` without a memory bank."""

    zero_map: torch.Tensor  # (B, S, S) text alignment, seg adapters
    zero_score: torch.Tensor  # (B,) text alignment, det adapters
    few_map: torch.Tensor | None  # (B, S, S) memory distance, seg adapters
    few_score: torch.Tensor | None  # (B,) memory distance averaged over pixels, det adapters


class AnomalyScores(NamedTuple):
    """Final anomaly map ``(B, S, S)`` and image score ``(B,)``."""

    anomaly_map: torch.Tensor
    score: torch.Tensor


class MVFADetector(nn.Module):
    """MVFA adapters plus everything inference needs.

    Args:
        encoder: the adapted CLIP visual tower.
        text_features: prompt-ensemble text features ``(E, 2)`` per data set name.
        target: the data set (modality) this detector scores by default.
        backbone: description of the backbone, checked when a checkpoint is loaded.
        image_score_from_map: for few-shot scoring, take the image score as the maximum of the
            fused map (MVFA's rule for data sets with masks) instead of the fused detection score.

    Loading a checkpoint merges its text features with those already held (the checkpoint's
    win for the data sets it knows) and takes its target, memory bank and calibration.
    """

    def __init__(
        self,
        encoder: MVFA,
        text_features: Mapping[str, torch.Tensor],
        target: str | None,
        backbone: BackboneSpec,
        image_score_from_map: bool = True,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.backbone = backbone
        self.target = target
        self.image_score_from_map = image_score_from_map
        levels, embed = len(encoder.levels), encoder.seg_adapters[0].fc1[0].out_features
        self.datasets = list(text_features)
        self.register_buffer("text_features", torch.zeros(0, embed, 2))
        self._set_text_features(text_features)
        self.register_buffer("memory_seg", torch.zeros(levels, 0, embed))
        self.register_buffer("memory_det", torch.zeros(levels, 0, embed))
        self.register_buffer("calibration", torch.full((len(_CALIBRATION_ROWS), 2), float("nan")))
        #: Decision threshold on final scores, chosen on the support set by :meth:`calibrate`.
        self.threshold: float | None = None

    # ----------------------------------------------------------------- state

    @property
    def image_size(self) -> int:
        return self.backbone.image_size

    @property
    def has_memory(self) -> bool:
        return self.memory_seg.shape[1] > 0

    @property
    def is_calibrated(self) -> bool:
        rows = [0, 2] + ([1, 3] if self.has_memory else [])
        return bool(torch.isfinite(self.calibration[rows]).all())

    def get_extra_state(self) -> dict:
        return {
            "format_version": _FORMAT_VERSION,
            "backbone": self.backbone.to_dict(),
            "levels": list(self.encoder.levels),
            "datasets": list(self.datasets),
            "target": self.target,
            "image_score_from_map": self.image_score_from_map,
            "threshold": self.threshold,
        }

    def set_extra_state(self, state: dict) -> None:
        backbone = BackboneSpec(**state["backbone"])
        if backbone != self.backbone or list(state["levels"]) != list(self.encoder.levels):
            raise ValueError(
                f"checkpoint was made for backbone {backbone} with adapters after blocks {state['levels']}, "
                f"but this network is {self.backbone} with adapters after blocks {list(self.encoder.levels)}"
            )
        self.datasets = list(state["datasets"])
        self.target = state["target"]
        self.image_score_from_map = bool(state["image_score_from_map"])
        self.threshold = state.get("threshold")  # None in checkpoints made before thresholds

    def _set_text_features(self, text_features: Mapping[str, torch.Tensor]) -> None:
        self.datasets = list(text_features)
        if self.datasets:
            self.text_features = torch.stack([text_features[name] for name in self.datasets]).to(self.text_features)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # Memory varies in size with the shots: take the saved shapes.
        for name in ("memory_seg", "memory_det"):
            saved = state_dict.get(prefix + name)
            if saved is not None:
                setattr(self, name, getattr(self, name).new_empty(saved.shape))
        # Text features: keep the data sets the checkpoint does not know (torch copied state_dict).
        extra, saved = state_dict.get(prefix + "_extra_state"), state_dict.get(prefix + "text_features")
        if isinstance(extra, Mapping) and saved is not None:
            merged = dict(zip(self.datasets, self.text_features))
            merged.update(zip(extra["datasets"], saved))
            self._set_text_features(merged)
            state_dict[prefix + "text_features"] = self.text_features.clone()
            state_dict[prefix + "_extra_state"] = {**extra, "datasets": list(self.datasets)}
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Load a saved detector (``model.pt``) or a released MVFA adapter checkpoint.

        Files are read with ``torch.load(weights_only=True)``: no pickled code is executed.
        """
        self.load_state(read_checkpoint(path))

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Load a detector ``state_dict`` or released MVFA adapters (``seg_adapters``/``det_adapters``)."""
        if {"seg_adapters", "det_adapters"} <= set(state):
            self.encoder.load_adapter_state(state)
        else:
            self.load_state_dict(state, strict=True)

    def text_features_for(self, datasets: Sequence[str] | None = None) -> torch.Tensor:
        """Text features ``(E, 2)`` of the target, or ``(B, E, 2)`` for per-sample data set names."""
        if datasets is None:
            if self.target is None:
                raise RuntimeError("this detector has no target yet: give one or load a trained model")
            datasets = [self.target]
        unknown = sorted(set(datasets) - set(self.datasets))
        if unknown:
            raise KeyError(f"no text features for data sets {unknown}; the detector knows {self.datasets}")
        if len(datasets) == 1:
            return self.text_features[self.datasets.index(datasets[0])]
        return self.text_features[[self.datasets.index(name) for name in datasets]]

    # ----------------------------------------------------------------- few-shot memory and calibration

    @torch.no_grad()
    def build_memory(self, normal_images: torch.Tensor, batch_size: int = 8) -> None:
        """Use all adapter tokens (class token included, as MVFA) of normal support images
        ``(K, 3, S, S)`` as the few-shot memory bank."""
        device = self.text_features.device
        parts = [self.encoder(batch.to(device)) for batch in normal_images.split(batch_size)]
        for name, field in (("memory_seg", "seg"), ("memory_det", "det")):
            levels = zip(*(getattr(tokens, field) for tokens in parts))
            memory = torch.stack([torch.cat(level).flatten(0, 1) for level in levels]).float()
            setattr(self, name, F.normalize(memory, dim=-1))

    @torch.no_grad()
    def calibrate(self, images: torch.Tensor, batch_size: int = 8, labels: torch.Tensor | None = None) -> None:
        """Store the min-max ranges of the raw scores of ``images`` (the support set), so that
        single images are fused without the rest of a test set; with ``labels`` (1 abnormal)
        of both classes, also the decision ``threshold``: the one of highest F1 over the
        support set's final scores (else ``None``)."""
        device = self.text_features.device
        parts = [self.raw_scores(batch.to(device)) for batch in images.split(batch_size)]
        raw = RawScores(*(None if values[0] is None else torch.cat(values) for values in zip(*parts)))
        values = [getattr(raw, name) for name in _CALIBRATION_ROWS]
        rows = [[float("nan")] * 2 if v is None else [float(v.min()), float(v.max())] for v in values]
        self.calibration = torch.tensor(rows, device=self.calibration.device)
        self.threshold = None
        if labels is not None and 0 < int(labels.sum()) < len(labels):
            from sklearn.metrics import precision_recall_curve

            scores = self.finalize(raw).score.float().cpu().numpy()
            precision, recall, thresholds = precision_recall_curve(labels.cpu().numpy(), scores)
            f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
            self.threshold = float(thresholds[int(np.argmax(f1[:-1]))])

    def calibrated_ranges(self) -> dict[str, FusionRange]:
        """The stored ranges, as tensors so that tracing and ONNX export record them."""
        exporting = torch.jit.is_tracing() or torch.compiler.is_exporting()
        if not exporting and not self.is_calibrated:
            raise RuntimeError("this detector has no calibration: build it with the few-shot workflow first")
        return {name: FusionRange(row[0], row[1]) for name, row in zip(_CALIBRATION_ROWS, self.calibration)}

    # ----------------------------------------------------------------- scoring

    def raw_scores(self, images: torch.Tensor, tokens: AdapterTokens | None = None) -> RawScores:
        """Zero-shot and (with a memory bank) few-shot scores for images ``(B, 3, S, S)``."""
        tokens = self.encoder(images) if tokens is None else tokens
        text = self.text_features_for()
        size = images.shape[-1]
        zero_map = zero_shot_maps(tokens.seg, text, size)
        zero_score = zero_shot_scores(tokens.det, text)
        if not self.has_memory:
            return RawScores(zero_map, zero_score, None, None)
        # Memory similarities in the backbone's precision: the bulk of few-shot scoring's work.
        dtype = self.encoder.visual.conv1.weight.dtype
        few_map = few_shot_maps(tokens.seg, self.memory_seg, size, dtype=dtype)
        few_score = few_shot_maps(tokens.det, self.memory_det, size, dtype=dtype).mean(dim=(-2, -1))
        return RawScores(zero_map, zero_score, few_map, few_score)

    def finalize(self, raw: RawScores, ranges: Mapping[str, FusionRange] | None = None) -> AnomalyScores:
        """Fuse raw scores into the final map and image score.

        ``ranges`` are the min-max ranges of the raw scores; the paper takes them over the
        whole evaluated set, single-image use takes the stored calibration (the default).
        Without a memory bank, MVFA's zero-shot outputs are used unchanged.
        """
        if raw.few_map is None:
            return AnomalyScores(raw.zero_map, raw.zero_score)
        ranges = self.calibrated_ranges() if ranges is None else ranges
        anomaly_map = fuse(raw.zero_map, raw.few_map, ranges["zero_map"], ranges["few_map"])
        if self.image_score_from_map:
            score = anomaly_map.flatten(1).amax(dim=1)
        else:
            score = fuse(raw.zero_score, raw.few_score, ranges["zero_score"], ranges["few_score"])
        return AnomalyScores(anomaly_map, score)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Anomaly map ``(B, 1, S, S)`` for images ``(B, 3, S, S)`` in [0, 1]; the image score is
        its maximum (few-shot with masks) or :meth:`predict`'s ``score``."""
        return self.predict(images).anomaly_map.unsqueeze(1)

    def predict(self, images: torch.Tensor) -> AnomalyScores:
        """Final anomaly maps and image scores with the stored calibration."""
        return self.finalize(self.raw_scores(images))


def unwrap(network: nn.Module) -> MVFADetector:
    """The detector inside a DistributedDataParallel/DataParallel wrapper (or itself)."""
    return getattr(network, "module", network)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint dictionary with ``torch.load(weights_only=True)``: no pickled code runs."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for unsafe or corrupt files
        raise ValueError(f"{path}: not a loadable checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: not a checkpoint dictionary (got {type(state).__name__})")
    return dict(state)


def build_detector(
    datasets: Sequence[str],
    target: str | None,
    model_name: str = "ViT-L-14-336",
    image_size: int = 240,
    pretrained: str | os.PathLike | None = None,
    quick_gelu: bool = False,
    random_init: bool = False,
    levels: Sequence[int] = (6, 12, 18, 24),
    image_score_from_map: bool = True,
    checkpoint: str | os.PathLike | None = None,
    precision: str = "fp32",
) -> MVFADetector:
    """Build an :class:`MVFADetector`: load CLIP, encode the prompts of ``datasets`` and ``target``
    once (unless ``checkpoint`` already holds them), keep the visual tower with new adapters,
    and drop the text tower.

    ``checkpoint`` optionally loads a saved detector or a released MVFA adapter checkpoint;
    ``target`` is the data set scored afterwards, also when the checkpoint was made for another
    (``None``: the checkpoint's own target, or the target of a ``state_dict`` loaded later).
    ``precision`` (``"fp32"``, ``"bf16"``, ``"fp16"``) is the frozen backbone's (see
    :func:`medad.create_clip`); adapters, tokens and scores stay in float32.
    """
    backbone = BackboneSpec(model_name, int(image_size), bool(quick_gelu))
    clip = create_clip(model_name, image_size, pretrained, quick_gelu, random_init)
    saved = read_checkpoint(checkpoint) if checkpoint is not None else {}
    saved_target = saved.get("_extra_state", {}).get("target")
    target = target or saved_target
    known = saved.get("_extra_state", {}).get("datasets", [])
    wanted = [*datasets, target] if target is not None else list(datasets)
    missing = [name for name in dict.fromkeys(wanted) if name not in known]
    text_features = encode_text_features(clip, open_clip.get_tokenizer(model_name), missing)
    visual = set_precision(clip.visual, precision)
    detector = MVFADetector(MVFA(visual, levels), text_features, target, backbone, image_score_from_map)
    if checkpoint is not None:
        detector.load_state(saved)
        if detector.target != target and detector.has_memory:
            logger.warning(
                "%s holds a few-shot memory of %r but scores %r: its memory and calibration do not "
                "describe the new target", checkpoint, detector.target, target
            )
        detector.target = target
    return detector
