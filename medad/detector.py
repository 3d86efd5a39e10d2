"""The MVFA anomaly detector: network, text features, few-shot memory and calibration together.

:class:`MVFADetector` is what the bundle trains, saves (``models/model.pt``), evaluates and runs:
its ``state_dict`` holds the adapters, the prompt text features of every data set it knows,
the few-shot memory bank, the fusion calibration and a description of the backbone, but not
the frozen backbone weights, which always come from their own file or tag.

The same detector runs the paper's baselines on the same backbone (:data:`METHODS`), with the
encoder :class:`medad.network.BackboneTokens` in place of the adapters:

- ``clip``: CLIP without adapters, each level's tokens through the tower's final norm and
  projection against the same prompt ensemble, scored with MVFA's zero-shot formulas.
- ``memory``: the few-shot memory bank of the tower's own (unprojected) tokens at the same
  levels, scored with MVFA's few-shot memory distance. It has no text part: its zero-shot raw
  scores are 0, so that MVFA's fusion, calibration and thresholds apply unchanged and its final
  map is half the min-max normalised memory distance.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from medad.backbone import MVFA_IMAGE_SIZE, MVFA_MODEL_NAME, PRECISIONS, BackboneSpec, MissingWeightsError, create_clip, default_image_size
from medad.checkpoint import (
    DESCRIPTION_KEY,
    WITH_MODEL_NAME,
    CheckpointError,
    ModelDescription,
    checkpoint_kind,
    describe,
    description_tensor,
    read_checkpoint,
    stored_description,
    weights_record,
)
from medad.decision import Thresholds, effective_thresholds, map_scale, support_thresholds
from medad.network import AdaptedVisualTower, AdapterTokens, BackboneTokens, FrozenTower
from medad.prompts import encode_text_features
from medad.scoring import FusionRange, coreset_indices, few_shot_maps, fuse, zero_shot_maps, zero_shot_scores
from medad.towers import vision_tower

__all__ = ["METHODS", "AnomalyScores", "MVFADetector", "RawScores", "build_detector", "load_detector", "unwrap"]

#: What a detector scores with: MVFA's adapters, or a baseline without them (module docstring).
METHODS = ("mvfa", "clip", "memory")

logger = logging.getLogger(__name__)

# Rows of the calibration buffer: the (low, high) range of each raw score.
_CALIBRATION_ROWS = ("zero_map", "few_map", "zero_score", "few_score")


class RawScores(NamedTuple):
    """Unfused scores for a batch; the few-shot ones are ``None`` without a memory bank."""

    zero_map: torch.Tensor  # (B, S, S) text alignment, seg adapters
    zero_score: torch.Tensor  # (B,) text alignment, det adapters
    few_map: torch.Tensor | None  # (B, S, S) memory distance, seg adapters
    few_score: torch.Tensor | None  # (B,) memory distance averaged over pixels, det adapters

    @classmethod
    def concat(cls, parts: Sequence[RawScores]) -> RawScores:
        """The raw scores of consecutive batches as one batch (``None`` fields stay ``None``)."""
        return cls(*(None if values[0] is None else torch.cat(values) for values in zip(*parts)))


class AnomalyScores(NamedTuple):
    """Final anomaly map ``(B, S, S)`` and image score ``(B,)``."""

    anomaly_map: torch.Tensor
    score: torch.Tensor


class MVFADetector(nn.Module):
    """MVFA adapters plus everything inference needs.

    Args:
        encoder: the adapted CLIP visual tower, or :class:`medad.network.BackboneTokens` for a
            baseline (:attr:`method`).
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
        encoder: FrozenTower,
        text_features: Mapping[str, torch.Tensor],
        target: str | None,
        backbone: BackboneSpec,
        image_score_from_map: bool = True,
        clip_weights: str | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        #: The CLIP weights the backbone was built with (:attr:`ModelDescription.clip_weights`).
        self.clip_weights = clip_weights
        self.backbone = backbone
        self.target = target
        self.image_score_from_map = image_score_from_map
        levels, embed = len(encoder.levels), encoder.token_dim
        self.datasets = list(text_features)
        self.register_buffer("text_features", torch.zeros(0, encoder.tower.output_dim, 2))
        self._set_text_features(text_features)
        self.register_buffer("memory_seg", torch.zeros(levels, 0, embed))
        self.register_buffer("memory_det", torch.zeros(levels, 0, embed))
        self.register_buffer("calibration", torch.full((len(_CALIBRATION_ROWS), 2), float("nan")))
        #: Decision thresholds chosen on the support set by :meth:`calibrate` (see :mod:`medad.decision`).
        self.thresholds = Thresholds()
        #: Records of the images the model was fitted on (:meth:`set_fitted`), left out of evaluations.
        self.fitted: list[dict[str, Any]] = []
        # torch.compile'd _score_tokens_eager once compile_paths ran (an explicit attribute that
        # score_tokens calls, so that no instance attribute shadows a method)
        self._compiled_scoring: Callable[[AdapterTokens, int], RawScores] | None = None
        # True while the trainer's step runs the adapted blocks through forward (medad.engines._adapting)
        self._forward_adapts = False
        self.register_state_dict_post_hook(_add_description)
        self.register_load_state_dict_pre_hook(MVFADetector._prepare_load)

    # ----------------------------------------------------------------- state

    @property
    def image_size(self) -> int:
        return self.backbone.image_size

    @property
    def method(self) -> str:
        """``"mvfa"``, or the baseline ``"clip"`` or ``"memory"`` (module docstring)."""
        if isinstance(self.encoder, AdaptedVisualTower):
            return "mvfa"
        return "clip" if self.encoder.projected else "memory"

    @property
    def takes_memory(self) -> bool:
        """Whether a few-shot memory bank belongs to the method (all but the ``clip`` baseline)."""
        return self.method != "clip"

    @property
    def has_memory(self) -> bool:
        return self.memory_seg.shape[1] > 0

    @property
    def is_calibrated(self) -> bool:
        rows = [0, 2] + ([1, 3] if self.has_memory else [])
        return bool(torch.isfinite(self.calibration[rows]).all())

    @property
    def description(self) -> ModelDescription:
        """What ``model.pt`` records about this detector (see :mod:`medad.checkpoint`)."""
        return ModelDescription(
            backbone=self.backbone,
            levels=tuple(self.encoder.levels),
            datasets=tuple(self.datasets),
            target=self.target,
            image_score_from_map=self.image_score_from_map,
            clip_weights=self.clip_weights,
            thresholds=self.thresholds,
            method=self.method,
            fitted=tuple(self.fitted),
        )

    def effective_thresholds(self) -> Thresholds:
        """The thresholds every surface applies unless the user gives its own (:mod:`medad.decision`)."""
        return effective_thresholds(self.thresholds, len(self.encoder.levels), self.has_memory)

    def map_scale(self) -> tuple[float, float]:
        """The range of this detector's final maps, one colour scale for all its images
        (:func:`medad.decision.map_scale`)."""
        return map_scale(len(self.encoder.levels), self.has_memory)

    def _set_text_features(self, text_features: Mapping[str, torch.Tensor]) -> None:
        self.datasets = list(text_features)
        if self.datasets:
            self.text_features = torch.stack([text_features[name] for name in self.datasets]).to(self.text_features)

    def _apply_description(self, saved: ModelDescription, source: str) -> None:
        if saved.method != self.method:
            raise CheckpointError(f"{source} is a method={saved.method!r} model, but this detector is method={self.method!r}")
        if saved.backbone != self.backbone or list(saved.levels) != list(self.encoder.levels):
            raise CheckpointError(
                f"{source} was made for backbone {saved.backbone} with adapters after blocks {list(saved.levels)}, "
                f"but this network is {self.backbone} with adapters after blocks {list(self.encoder.levels)}"
            )
        self.target = saved.target
        self.image_score_from_map = saved.image_score_from_map
        self.thresholds = saved.thresholds
        self.fitted = [dict(record) for record in saved.fitted]
        self.clip_weights = saved.clip_weights if saved.clip_weights is not None else self.clip_weights

    def _prepare_load(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        """``load_state_dict``'s pre-hook (registered in ``__init__``): runs before torch copies
        this module's parameters and buffers from ``state_dict``."""
        # The description (and format 1's _extra_state) is no parameter or buffer: read it here.
        saved = stored_description(state_dict, prefix)
        state_dict.pop(prefix + DESCRIPTION_KEY, None)
        state_dict.pop(prefix + "_extra_state", None)
        if saved is None:
            if strict:
                missing_keys.append(prefix + DESCRIPTION_KEY)
        else:
            self._apply_description(saved, "checkpoint")
        # Memory varies in size with the shots: take the saved shapes.
        for name in ("memory_seg", "memory_det"):
            stored = state_dict.get(prefix + name)
            if stored is not None:
                setattr(self, name, getattr(self, name).new_empty(stored.shape))
        # Text features: keep the data sets the checkpoint does not know (torch copied state_dict).
        stored = state_dict.get(prefix + "text_features")
        if saved is not None and stored is not None:
            merged = dict(zip(self.datasets, self.text_features))
            merged.update(zip(saved.datasets, stored))
            self._set_text_features(merged)
            state_dict[prefix + "text_features"] = self.text_features.clone()

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Load a saved detector (``model.pt``) or a released MVFA adapter checkpoint.

        Files are read with ``torch.load(weights_only=True)``: no pickled code is executed.
        """
        self.load_state(read_checkpoint(path), str(path))

    def load_state(self, state: Mapping[str, Any], source: str = "checkpoint") -> None:
        """Load a detector ``state_dict`` or released MVFA adapters (``seg_adapters``/``det_adapters``);
        errors name ``source``."""
        try:
            if checkpoint_kind(state, source) == "adapters":
                if self.method != "mvfa":
                    raise CheckpointError(f"{source} holds MVFA adapters, but this detector is the {self.method!r} baseline")
                self.encoder.load_adapter_state(state)
            else:
                self.load_state_dict(state, strict=True)
        except CheckpointError:
            raise
        except (KeyError, RuntimeError, ValueError) as error:
            raise CheckpointError(f"{source}: does not fit this detector: {error}") from error

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

    def set_fitted(self, records: Sequence[Mapping[str, Any]], role: str | None = None) -> None:
        """Record the images the model is fitted on (:func:`medad.data.fitted_records`); those of
        ``role`` replace the earlier ones of that role (all of them when ``role`` is ``None``)."""
        kept = [] if role is None else [record for record in self.fitted if record.get("role") != role]
        self.fitted = kept + [dict(record) for record in records]

    # ----------------------------------------------------------------- few-shot memory and calibration

    @torch.no_grad()
    def build_memory(self, normal_images: torch.Tensor, batch_size: int = 8, memory_size: int | None = None) -> None:
        """Use all adapter tokens (class token included, as MVFA) of normal support images
        ``(K, 3, S, S)`` as the few-shot memory bank.

        ``memory_size``: keep at most that many tokens per level, a k-center coreset
        (:func:`medad.scoring.coreset_indices`), so that few-shot scoring costs the same for any
        k; ``None`` (default) keeps MVFA's exact memory.

        Raises:
            ValueError: the ``clip`` baseline, which has no memory bank."""
        if not self.takes_memory:
            raise ValueError("the clip baseline scores with text alone: it has no few-shot memory bank")
        device = self.text_features.device
        parts = [self.encoder(batch.to(device)) for batch in normal_images.split(batch_size)]
        for name, field in (("memory_seg", "seg"), ("memory_det", "det")):
            levels = [F.normalize(torch.cat(level).flatten(0, 1).float(), dim=-1) for level in zip(*(getattr(t, field) for t in parts))]
            if memory_size is not None:
                levels = [level[coreset_indices(level, memory_size)] for level in levels]
            setattr(self, name, torch.stack(levels))

    @torch.no_grad()
    def calibrate(
        self,
        images: torch.Tensor,
        batch_size: int = 8,
        labels: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        annotated: torch.Tensor | None = None,
    ) -> None:
        """Store the min-max ranges of the raw scores of ``images`` (the support set), so that
        single images are fused without the rest of a test set, and the decision thresholds
        the support set decides against the current memory (:func:`medad.decision.support_thresholds`):
        with ``labels`` (1 abnormal) of both classes the image threshold of highest F1 over the
        support set's final scores, and with ``masks`` ``(N, 1, S, S)`` (zeros for normal images)
        the pixel threshold of highest pixel F1 over the ``annotated`` ones (bool ``(N,)``, default
        all; abnormal images without a mask are not); without them, thresholds the rule leaves to
        its defaults."""
        device = self.text_features.device
        parts = [self.raw_scores(batch.to(device)) for batch in images.split(batch_size)]
        raw = RawScores.concat(parts)
        self.set_calibration(raw)
        final = self.finalize(raw)
        self.thresholds = support_thresholds(
            final.score, final.anomaly_map, labels, masks, annotated, image_score_from_map=self.image_score_from_map
        )

    def set_calibration(self, raw: RawScores) -> None:
        """Store the min-max ranges of the raw scores of a reference set (the support set)."""
        values = [getattr(raw, name) for name in _CALIBRATION_ROWS]
        rows = [[float("nan")] * 2 if v is None else [float(v.min()), float(v.max())] for v in values]
        self.calibration = torch.tensor(rows, device=self.calibration.device)

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
        return self.score_tokens(tokens, images.shape[-1])

    def score_tokens(self, tokens: AdapterTokens, size: int) -> RawScores:
        """Raw scores of adapter tokens (each ``(B, 1 + L, E)``) at ``size x size`` pixels."""
        if self._compiled_scoring is not None:
            return self._compiled_scoring(tokens, size)
        return self._score_tokens_eager(tokens, size)

    def _score_tokens_eager(self, tokens: AdapterTokens, size: int) -> RawScores:
        if self.method == "memory":  # no text part (module docstring)
            first = tokens.seg[0]
            zero_map, zero_score = first.new_zeros(len(first), size, size), first.new_zeros(len(first))
        else:
            text = self.text_features_for()
            zero_map = zero_shot_maps(tokens.seg, text, size)
            zero_score = zero_shot_scores(tokens.det, text)
        if not self.has_memory:
            return RawScores(zero_map, zero_score, None, None)
        # Memory similarities in float32 whatever the backbone's precision: 1 - cosine near 0
        # has almost no bits left in bf16.
        few_map = few_shot_maps(tokens.seg, self.memory_seg, size)
        # the memory baseline's det tokens and memory are its seg ones: its map serves both
        det_map = few_map if self.method == "memory" else few_shot_maps(tokens.det, self.memory_det, size)
        return RawScores(zero_map, zero_score, few_map, det_map.mean(dim=(-2, -1)))

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
        if self._forward_adapts:  # the trainer's step: a trunk output to adapter tokens
            return self.encoder.adapt(images)
        return self.predict(images).anomaly_map.unsqueeze(1)

    def predict(self, images: torch.Tensor) -> AnomalyScores:
        """Final anomaly maps and image scores with the stored calibration."""
        return self.finalize(self.raw_scores(images))

    def compile_paths(self, enabled: bool = True, **options: Any) -> MVFADetector:
        """Run the frozen trunk, the adapted blocks and the scoring through ``torch.compile``
        (``options`` go to it), in place; returns the detector (for configs: ``compile: true``).

        Compilation is a property of the run, not of the model: ``state_dict`` and ``model.pt``
        are unchanged. The first batch of each new shape compiles (seconds to minutes); the
        results match eager execution to float32 rounding (tested on the CPU).
        """
        if not enabled:
            return self
        # the public trunk, adapt and score_tokens call the compiled functions from now on, so
        # every caller (forward, the trainer's cached trunk, DDP's step through ``adapt``) takes them
        self.encoder.compile_paths(**options)
        self._compiled_scoring = torch.compile(self._score_tokens_eager, **options)
        return self

    def __prepare_scriptable__(self) -> nn.Module:
        """What ``torch.jit.script(detector)`` compiles (MONAI's ``ckpt_export`` scripts): open_clip's
        vision tower cannot be scripted, so :meth:`forward` is traced at the model's input size
        ``(1, 3, S, S)`` (any batch size runs) and wrapped in a scriptable module."""
        parameter = self.text_features
        example = torch.rand(1, 3, self.image_size, self.image_size, device=parameter.device)
        was_training = self.training
        with torch.no_grad():
            traced = torch.jit.trace(self.eval(), example)
        self.train(was_training)
        return _TracedForward(traced)


class _TracedForward(nn.Module):
    """A traced :meth:`MVFADetector.forward` as a scriptable module (see ``__prepare_scriptable__``)."""

    def __init__(self, traced: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.traced = traced

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.traced(images)


def _add_description(module: MVFADetector, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    state_dict[prefix + DESCRIPTION_KEY] = description_tensor(module.description)


def unwrap(network: nn.Module) -> MVFADetector:
    """The detector inside a DistributedDataParallel/DataParallel wrapper (or itself)."""
    return getattr(network, "module", network)


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
    method: str = "mvfa",
) -> MVFADetector:
    """Build an :class:`MVFADetector`: load CLIP, encode the prompts of ``datasets`` and ``target``
    once (unless ``checkpoint`` already holds them), keep the visual tower with new adapters
    (or, for a baseline ``method``, without), and drop the text tower.

    ``model_name`` is any open_clip vision-transformer CLIP (:mod:`medad.backbone`);
    ``image_size`` ``None``: :func:`medad.backbone.default_image_size` (MVFA's 240 px for
    ``ViT-L-14-336``); ``levels`` ``None``: :func:`medad.network.default_levels` (MVFA's 6, 12,
    18, 24 for 24 blocks); ``method``: one of :data:`METHODS`.

    ``checkpoint`` optionally loads a saved detector or a released MVFA adapter checkpoint;
    ``target`` is the data set scored afterwards, also when the checkpoint was made for another
    (``None``: the checkpoint's own target, or the target of a ``state_dict`` loaded later).
    ``precision`` (``"fp32"``, ``"bf16"``, ``"fp16"``) is that of the frozen blocks' matrix
    products (:data:`medad.backbone.PRECISIONS`); weights, stream, adapters, tokens and scores
    stay in float32.

    The detector comes back in eval mode, as :func:`load_detector`'s does (``monai.bundle.load``
    returns it as built); trainers switch it to train mode.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
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
    if method == "mvfa":
        encoder = AdaptedVisualTower(tower, levels, matmul_dtype=dtype)
    else:
        encoder = BackboneTokens(tower, levels, projected=method == "clip", matmul_dtype=dtype)
    weights = weights_record(pretrained, random_init, model_name)
    detector = MVFADetector(encoder, text_features, target, backbone, image_score_from_map, weights)
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
    return detector.eval()


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
        precision: the frozen backbone's precision (``"fp32"``, ``"bf16"``, ``"fp16"``).
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
        image_score_from_map=True if description is None else description.image_score_from_map,
        **architecture,
    )
    return detector.to(device).eval()
