"""The MVFA anomaly detector: network, text features, few-shot memory and calibration together.

:class:`MVFADetector` is what the bundle trains, saves (``models/model.pt``), evaluates and runs:
its ``state_dict`` holds the adapters, the prompt text features of every data set it knows,
the few-shot memory bank, the fusion calibration and a description of the backbone, but not
the frozen backbone weights, which always come from their own file or tag.

The same detector runs the paper's baselines on the same backbone: it holds a
:class:`medad.model.methods.Method` (:data:`medad.model.methods.METHODS`) and asks it for its encoder, its
memory, its scores and their fusion.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from medad.model.backbone import BackboneSpec
from medad.model.checkpoint import (
    DESCRIPTION_KEY,
    CheckpointError,
    ModelDescription,
    checkpoint_kind,
    description_tensor,
    read_checkpoint,
    stored_description,
)
from medad.model.decision import Thresholds, effective_thresholds, support_thresholds
from medad.model.methods import AnomalyScores, Method, RawScores, get_method
from medad.model.network import AdapterTokens, FrozenTower
from medad.model.scoring import FusionRange

__all__ = ["MVFADetector", "unwrap"]


# Rows of the calibration buffer: the (low, high) range of each raw score.
_CALIBRATION_ROWS = ("zero_map", "few_map", "zero_score", "few_score")


class MVFADetector(nn.Module):
    """MVFA adapters plus everything inference needs.

    Args:
        encoder: the method's encoder on the frozen CLIP tower (MVFA's adapted visual tower).
        text_features: prompt-ensemble text features ``(E, 2)`` per data set name.
        target: the data set (modality) this detector scores by default.
        backbone: description of the backbone, checked when a checkpoint is loaded.
        image_score_from_map: for few-shot scoring, take the image score as the maximum of the
            fused map (MVFA's rule for data sets with masks) instead of the fused detection score.
        clip_weights: the CLIP weights the backbone was built with.
        method: the method, or its registered name (:func:`medad.model.methods.get_method`), that
            built ``encoder``.

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
        method: str | Method = "mvfa",
    ) -> None:
        super().__init__()
        #: What this detector is: its encoder, memory, scoring and fusion (:mod:`medad.model.methods`).
        self.method = get_method(method)
        self.encoder = encoder
        #: The CLIP weights the backbone was built with (:attr:`ModelDescription.clip_weights`).
        self.clip_weights = clip_weights
        self.backbone = backbone
        self.target = target
        self.image_score_from_map = image_score_from_map
        self.datasets = list(text_features)
        self.register_buffer("text_features", torch.zeros(0, encoder.tower.output_dim, 2))
        self._set_text_features(text_features)
        #: The names of the method's memory buffers (``memory_<name>``).
        memory = self.method.empty_memory(encoder)
        self.memory_names = tuple(memory)
        for name, empty in memory.items():
            self.register_buffer(f"memory_{name}", empty)
        self.register_buffer("calibration", torch.full((len(_CALIBRATION_ROWS), 2), float("nan")))
        #: Decision thresholds chosen on the support set by :meth:`calibrate` (see :mod:`medad.model.decision`).
        self.thresholds = Thresholds()
        #: Records of the images the model was fitted on (:meth:`set_fitted`), left out of evaluations.
        self.fitted: list[dict[str, Any]] = []
        # torch.compile'd _score_tokens_eager once compile_paths ran (an explicit attribute that
        # score_tokens calls, so that no instance attribute shadows a method)
        self._compiled_scoring: Callable[[AdapterTokens, int], RawScores] | None = None
        # True while the trainer's step runs the adapted blocks through forward (medad.engine.engines._adapting)
        self._forward_adapts = False
        self.register_state_dict_post_hook(_add_description)
        self.register_load_state_dict_pre_hook(MVFADetector._prepare_load)

    # ----------------------------------------------------------------- state

    @property
    def image_size(self) -> int:
        return self.backbone.image_size

    @property
    def takes_memory(self) -> bool:
        """Whether a few-shot memory bank belongs to the method (all but the ``clip`` baseline)."""
        return self.method.takes_memory

    @property
    def has_memory(self) -> bool:
        """Whether a few-shot memory bank was built (:meth:`build_memory`)."""
        return any(getattr(self, f"memory_{name}").numel() > 0 for name in self.memory_names)

    @property
    def is_calibrated(self) -> bool:
        rows = [0, 2] + ([1, 3] if self.has_memory else [])
        return bool(torch.isfinite(self.calibration[rows]).all())

    @property
    def description(self) -> ModelDescription:
        """What ``model.pt`` records about this detector (see :mod:`medad.model.checkpoint`)."""
        return ModelDescription(
            backbone=self.backbone,
            levels=tuple(self.encoder.levels),
            datasets=tuple(self.datasets),
            target=self.target,
            image_score_from_map=self.image_score_from_map,
            clip_weights=self.clip_weights,
            thresholds=self.thresholds,
            method=self.method.name,
            fitted=tuple(self.fitted),
        )

    def effective_thresholds(self) -> Thresholds:
        """The thresholds every surface applies unless the user gives its own (:mod:`medad.model.decision`)."""
        return effective_thresholds(self.thresholds, self.map_scale(), self.has_memory)

    def map_scale(self) -> tuple[float, float]:
        """The range of this detector's final maps, one colour scale for all its images
        (:meth:`medad.model.methods.Method.map_scale`)."""
        return self.method.map_scale(len(self.encoder.levels), self.has_memory)

    def _set_text_features(self, text_features: Mapping[str, torch.Tensor]) -> None:
        self.datasets = list(text_features)
        if self.datasets:
            self.text_features = torch.stack([text_features[name] for name in self.datasets]).to(self.text_features)

    def _apply_description(self, saved: ModelDescription, source: str) -> None:
        if saved.method != self.method.name:
            raise CheckpointError(
                f"{source} is a method={saved.method!r} model, but this detector is method={self.method.name!r}"
            )
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
        for name in (f"memory_{name}" for name in self.memory_names):
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
                if not self.method.trained:
                    raise CheckpointError(f"{source} holds MVFA adapters, but this detector is the {self.method.name!r} baseline")
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
        """Record the images the model is fitted on (:func:`medad.io.data.fitted_records`); those of
        ``role`` replace the earlier ones of that role (all of them when ``role`` is ``None``)."""
        kept = [] if role is None else [record for record in self.fitted if record.get("role") != role]
        self.fitted = kept + [dict(record) for record in records]

    # ----------------------------------------------------------------- few-shot memory and calibration

    @torch.no_grad()
    def build_memory(self, normal_images: torch.Tensor, batch_size: int = 8, memory_size: int | None = None) -> None:
        """The few-shot memory bank of normal support images ``(K, 3, S, S)``: what the method
        keeps of their tokens (:meth:`medad.model.methods.Method.memory_from`; MVFA: all adapter tokens,
        class token included).

        ``memory_size``: keep at most that many tokens per level, a k-center coreset
        (:func:`medad.model.scoring.coreset_indices`), so that few-shot scoring costs the same for any
        k; ``None`` (default) keeps MVFA's exact memory.

        Raises:
            ValueError: a method without memory (the ``clip`` baseline)."""
        if not self.takes_memory:
            raise ValueError(f"the {self.method.name} method scores with text alone: it has no few-shot memory bank")
        device = self.text_features.device
        outputs = [self.encoder(batch.to(device)) for batch in normal_images.split(batch_size)]
        for name, memory in self.method.memory_from(outputs, memory_size).items():
            setattr(self, f"memory_{name}", memory)

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
        the support set decides against the current memory (:func:`medad.model.decision.support_thresholds`):
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
        return self.method.score_tokens(self, tokens, size)

    def finalize(self, raw: RawScores, ranges: Mapping[str, FusionRange] | None = None) -> AnomalyScores:
        """Fuse raw scores into the final map and image score (:meth:`medad.model.methods.Method.finalize`).

        ``ranges`` are the min-max ranges of the raw scores; the paper takes them over the
        whole evaluated set, single-image use takes the stored calibration (the default).
        Without a memory bank, the zero-shot outputs are used unchanged.
        """
        return self.method.finalize(self, raw, ranges)

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
