"""Detection methods as small registered objects: what a detector encodes, how it scores, fuses
and fits, and what its model file stores.

An :class:`medad.MVFADetector` holds one :class:`Method` and asks it instead of comparing names:
the encoder it builds on the frozen CLIP tower, the few-shot memory it keeps (buffers
``memory_<name>`` of the detector), its raw scores, how they are fused into the final map and
image score, the range of its maps, and what the bundle's ``training`` runs to fit it (MVFA's
trainer, or a build that trains nothing). :data:`METHODS` is the registry; a new method is a
subclass plus :func:`register_method` (see :mod:`medad.model.winclip`).

The methods here share MVFA's scoring of per-level tokens (:mod:`medad.model.scoring`):

- ``mvfa``: MVFA's adapters (:class:`medad.model.network.AdaptedVisualTower`), trained.
- ``clip``: CLIP without adapters, each level's tokens through the tower's final norm and
  projection against the same prompt ensemble, scored with MVFA's zero-shot formulas; no memory.
- ``memory``: the few-shot memory bank of the tower's own (unprojected) tokens at the same
  levels, scored with MVFA's few-shot memory distance. It has no text part: its zero-shot raw
  scores are 0, so that MVFA's fusion, calibration and thresholds apply unchanged and its final
  map is half the min-max normalised memory distance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from medad.model.decision import map_scale
from medad.model.network import AdaptedVisualTower, AdapterTokens, BackboneTokens, FrozenTower
from medad.model.scoring import FusionRange, coreset_indices, few_shot_maps, fuse, zero_shot_maps, zero_shot_scores
from medad.model.towers import VisionTower

if TYPE_CHECKING:  # the detector holds a method; methods only read it
    from medad.model.detector import MVFADetector

__all__ = [
    "METHODS",
    "AnomalyScores",
    "ClipBaseline",
    "MVFA",
    "MemoryBaseline",
    "Method",
    "RawScores",
    "fitting_step",
    "get_method",
    "register_method",
]


class RawScores(NamedTuple):
    """Unfused scores for a batch; the few-shot ones are ``None`` without a memory bank."""

    zero_map: torch.Tensor  # (B, S, S) text alignment (seg tokens)
    zero_score: torch.Tensor  # (B,) text alignment (det tokens)
    few_map: torch.Tensor | None  # (B, S, S) memory distance (seg tokens)
    few_score: torch.Tensor | None  # (B,) memory distance averaged over pixels (det tokens)

    @classmethod
    def concat(cls, parts: Sequence[RawScores]) -> RawScores:
        """The raw scores of consecutive batches as one batch (``None`` fields stay ``None``)."""
        return cls(*(None if values[0] is None else torch.cat(values) for values in zip(*parts)))


class AnomalyScores(NamedTuple):
    """Final anomaly map ``(B, S, S)`` and image score ``(B,)``."""

    anomaly_map: torch.Tensor
    score: torch.Tensor


class Method:
    """A detection method on a frozen CLIP vision tower; this base class is MVFA's scoring of
    per-level tokens (:class:`medad.model.network.AdapterTokens`), which subclasses set up or replace.

    Class attributes say what the method is:

    - ``name``: its key (``method`` in configs and ``model.pt``); ``label``: how reports name it;
      ``summary``: what it scores, in one clause (the reproduction report's note).
    - ``trained``: it has adapters that MVFA's trainer fits; otherwise the bundle's ``training``
      builds it without training (:class:`medad.engine.baselines.BaselineBuild`).
    - ``scores_text``: it has a zero-shot part (prompts against image tokens).
    - ``takes_memory``: a few-shot memory bank of normal support images belongs to it.
    """

    name: ClassVar[str]
    label: ClassVar[str]
    summary: ClassVar[str] = ""
    trained: ClassVar[bool] = False
    scores_text: ClassVar[bool] = True
    takes_memory: ClassVar[bool] = True

    @property
    def needs_support(self) -> bool:
        """Whether it cannot score without support images (a memory and no text part)."""
        return self.takes_memory and not self.scores_text

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

    # ------------------------------------------------------------------ what it encodes and stores

    def build_encoder(self, tower: VisionTower, levels: Sequence[int] | None, matmul_dtype: torch.dtype) -> FrozenTower:
        """The encoder on the frozen ``tower``: ``detector.encoder(images)`` gives its tokens."""
        raise NotImplementedError

    def empty_memory(self, encoder: FrozenTower) -> dict[str, torch.Tensor]:
        """The detector's memory buffers before any support image, ``memory_<name>``: here
        ``seg`` and ``det``, ``(levels, 0, token_dim)`` (none for a method without memory)."""
        if not self.takes_memory:
            return {}
        empty = torch.zeros(len(encoder.levels), 0, encoder.token_dim)
        return {"seg": empty, "det": empty.clone()}

    def memory_from(self, outputs: Sequence[AdapterTokens], memory_size: int | None = None) -> dict[str, torch.Tensor]:
        """The memory buffers for the encoder's outputs on normal support images (batch by batch):
        every token (class token included, as MVFA) of each level, normalised, ``(levels, N, E)``;
        ``memory_size``: at most that many per level, a k-center coreset
        (:func:`medad.model.scoring.coreset_indices`)."""
        memory = {}
        for name in ("seg", "det"):
            tokens = zip(*(getattr(output, name) for output in outputs))
            levels = [F.normalize(torch.cat(level).flatten(0, 1).float(), dim=-1) for level in tokens]
            if memory_size is not None:
                levels = [level[coreset_indices(level, memory_size)] for level in levels]
            memory[name] = torch.stack(levels)
        return memory

    # ------------------------------------------------------------------ how it scores and fuses

    def score_tokens(self, detector: MVFADetector, tokens: AdapterTokens, size: int) -> RawScores:
        """Raw scores at ``size x size`` pixels of the encoder's ``tokens`` (each ``(B, 1 + L, E)``)."""
        if self.scores_text:
            text = detector.text_features_for()
            zero_map, zero_score = zero_shot_maps(tokens.seg, text, size), zero_shot_scores(tokens.det, text)
        else:
            first = tokens.seg[0]
            zero_map, zero_score = first.new_zeros(len(first), size, size), first.new_zeros(len(first))
        if not detector.has_memory:
            return RawScores(zero_map, zero_score, None, None)
        # Memory similarities in float32 whatever the backbone's precision: 1 - cosine near 0
        # has almost no bits left in bf16.
        few_map = few_shot_maps(tokens.seg, detector.memory_seg, size)
        det_map = self._detection_memory_map(detector, tokens, few_map, size)
        return RawScores(zero_map, zero_score, few_map, det_map.mean(dim=(-2, -1)))

    def _detection_memory_map(self, detector: MVFADetector, tokens: AdapterTokens, seg_map: torch.Tensor, size: int) -> torch.Tensor:
        """The memory distance map of the det tokens, whose pixel mean is the few-shot score."""
        return few_shot_maps(tokens.det, detector.memory_det, size)

    def finalize(self, detector: MVFADetector, raw: RawScores, ranges: Mapping[str, FusionRange] | None) -> AnomalyScores:
        """The final map and image score: MVFA's min-max fusion of the zero- and few-shot parts
        with ``ranges`` (``None``: the detector's stored calibration); without memory the
        zero-shot outputs unchanged."""
        if raw.few_map is None:
            return AnomalyScores(raw.zero_map, raw.zero_score)
        ranges = detector.calibrated_ranges() if ranges is None else ranges
        anomaly_map = fuse(raw.zero_map, raw.few_map, ranges["zero_map"], ranges["few_map"])
        if detector.image_score_from_map:
            score = anomaly_map.flatten(1).amax(dim=1)
        else:
            score = fuse(raw.zero_score, raw.few_score, ranges["zero_score"], ranges["few_score"])
        return AnomalyScores(anomaly_map, score)

    def map_scale(self, levels: int, has_memory: bool) -> tuple[float, float]:
        """The range of the final maps by construction (:func:`medad.model.decision.map_scale`)."""
        return map_scale(levels, has_memory)

    # ------------------------------------------------------------------ how the bundle fits it

    def fitting(self, trainer: Any, build: Any, normal_only: Any = None, abnormal_shots: int | None = None) -> Any:
        """What the bundle's ``training`` runs: a method without training, ``build``
        (:class:`medad.engine.baselines.BaselineBuild`)."""
        return build


class MVFA(Method):
    """MVFA (Huang et al., CVPR 2024): seg and det residual adapters after each level, trained
    with multi-level visual-language alignment; zero-shot text alignment fused with the
    few-shot memory distance."""

    name = "mvfa"
    label = "MVFA"
    summary = "adapters trained with multi-level visual-language alignment"
    trained = True

    def build_encoder(self, tower: VisionTower, levels: Sequence[int] | None, matmul_dtype: torch.dtype) -> FrozenTower:
        return AdaptedVisualTower(tower, levels, matmul_dtype=matmul_dtype)

    def fitting(self, trainer: Any, build: Any, normal_only: Any = None, abnormal_shots: int | None = None) -> Any:
        """MVFA's trainer, or with no abnormal support image (``abnormal_shots`` 0) the normal-only
        adaptation of a trained model (:class:`medad.engine.fewshot.NormalOnlyAdaptation`)."""
        if abnormal_shots == 0:
            if normal_only is None:
                raise ValueError("abnormal_shots 0 adapts a trained model to normal images: merge configs/fewshot.json")
            return normal_only
        return trainer


class ClipBaseline(Method):
    """CLIP without adapters: the tower's projected tokens against the prompt ensemble, MVFA's
    zero-shot formulas; no memory."""

    name = "clip"
    label = "CLIP (no adapters)"
    summary = (
        "scores each level's tokens, through the tower's final norm and projection, against the same prompts "
        "(MVFA's zero-shot formulas)"
    )
    takes_memory = False

    def build_encoder(self, tower: VisionTower, levels: Sequence[int] | None, matmul_dtype: torch.dtype) -> FrozenTower:
        return BackboneTokens(tower, levels, projected=True, matmul_dtype=matmul_dtype)


class MemoryBaseline(Method):
    """The few-shot memory bank of the tower's own tokens, MVFA's memory distance; no text."""

    name = "memory"
    label = "memory bank (no adapters)"
    summary = (
        "scores the backbone's own tokens at the same levels against the augmented normal support images "
        "(MVFA's few-shot distance)"
    )
    scores_text = False

    def build_encoder(self, tower: VisionTower, levels: Sequence[int] | None, matmul_dtype: torch.dtype) -> FrozenTower:
        return BackboneTokens(tower, levels, projected=False, matmul_dtype=matmul_dtype)

    def _detection_memory_map(self, detector: MVFADetector, tokens: AdapterTokens, seg_map: torch.Tensor, size: int) -> torch.Tensor:
        return seg_map  # its det tokens and memory are its seg ones: one map serves both


#: The registered methods by name (:func:`register_method`); MVFA first.
METHODS: dict[str, Method] = {}


def register_method(method: type[Method]) -> type[Method]:
    """Register a :class:`Method` subclass under its ``name`` (usable as a class decorator).

    Raises:
        ValueError: another method already has that name.
    """
    if method.name in METHODS and type(METHODS[method.name]) is not method:
        raise ValueError(f"method {method.name!r} is already registered ({type(METHODS[method.name]).__name__})")
    METHODS[method.name] = method()
    return method


def get_method(method: str | Method) -> Method:
    """The registered method of that name (a :class:`Method` is returned as given).

    Raises:
        ValueError: no such method; the message lists the registered ones.
    """
    if isinstance(method, Method):
        return method
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    return METHODS[method]


def fitting_step(method: str | Method, trainer: Any, build: Any, normal_only: Any = None, abnormal_shots: int | None = None) -> Any:
    """What the bundle's ``training`` runs for ``method`` (:meth:`Method.fitting`), so that the
    configs wire the candidates and the method chooses."""
    return get_method(method).fitting(trainer, build, normal_only, abnormal_shots)


for _method in (MVFA, ClipBaseline, MemoryBaseline):
    register_method(_method)
