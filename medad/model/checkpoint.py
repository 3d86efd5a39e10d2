"""The one home of medad's model file format (``models/model.pt``): reading, describing, versions.

A trained model is an :class:`medad.MVFADetector` ``state_dict`` of tensors only: the adapters,
the prompt text features, the few-shot memory bank, the fusion calibration, and ``description``,
the UTF-8 JSON of a :class:`ModelDescription` as a ``uint8`` tensor: the backbone it was made
for, the method (MVFA or a baseline), the adapted blocks, the data sets and target, which CLIP weights it was trained with, and
the decision thresholds with the rule that chose each. Tensors only, so that MONAI's tools
(``monai.bundle.load``, ``ckpt_export``) copy and load it like any network's weights. Released
MVFA adapter files (``{'seg_adapters': ..., 'det_adapters': ...}``) are read here too.

Everything that opens a model file calls :func:`read_checkpoint` (``torch.load`` with
``weights_only=True``: no pickled code runs) and :func:`describe`; nothing else parses the
description.

Format versions: 1 (medad 0.1: an ``_extra_state`` dictionary with a single ``threshold``), 2
(``method`` was added to it, and files without it are MVFA models), 3 (this one: the images it
was fitted on, ``fitted``, and site thresholds with their reference scores and provenance). Older versions
load; a newer one is refused with both versions named.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from medad.model.backbone import BackboneSpec, weights_come_with_name
from medad.model.decision import NO_RULE, SUPPORT_F1_RULE, Thresholds
from medad.io.files import atomic_write

__all__ = [
    "FORMAT_VERSION",
    "WITH_MODEL_NAME",
    "CheckpointError",
    "ModelDescription",
    "DESCRIPTION_KEY",
    "checkpoint_kind",
    "describe",
    "description_tensor",
    "model_versions",
    "read_checkpoint",
    "restore_model_version",
    "save_model",
    "stored_description",
    "weights_record",
]

#: The version :class:`ModelDescription` writes.
FORMAT_VERSION = 3
#: The state-dict key of the description tensor (format 2; format 1 had ``_extra_state``).
DESCRIPTION_KEY = "description"
_LEGACY_KEY = "_extra_state"
_ADAPTER_KEYS = {"seg_adapters", "det_adapters"}


class CheckpointError(ValueError):
    """A model file that cannot be used; the message names the file and what it is not."""


@dataclass(frozen=True)
class ModelDescription:
    """What a ``model.pt`` says about itself (its ``_extra_state``).

    Attributes:
        backbone: the CLIP architecture, input size and activation the adapters were made for.
        levels: 1-based blocks after which adapters sit (whose tokens a baseline uses).
        datasets: the data sets whose prompt text features the model holds.
        target: the data set it scores by default (``None`` for a bare zero-shot model).
        image_score_from_map: few-shot image score = maximum of the fused map (data sets with
            masks) instead of the fused detection score.
        clip_weights: the CLIP weights it was trained with: an open_clip tag (``"openai"``),
            ``"file:<name>"`` for a local file (give the path when loading), ``"random"`` for
            the seeded random backbone of tests and the demo, ``"with-model-name"`` for the
            weights of an ``hf-hub:``/``local-dir:`` model, or ``None`` (unknown, format 1).
        thresholds: the decision thresholds stored with the model.
        method: the registered method (:data:`medad.model.methods.METHODS`): ``"mvfa"`` or a baseline.
        fitted: the images the model was fitted on, which evaluation leaves out: one record per
            image (:func:`medad.io.data.fitted_records`: ``name``, ``sha256`` of its bytes, ``label``,
            ``role`` ``"support"`` or ``"calibration"``).
        format_version: the format the file was written in.
    """

    backbone: BackboneSpec
    levels: tuple[int, ...]
    datasets: tuple[str, ...] = ()
    target: str | None = None
    image_score_from_map: bool = True
    clip_weights: str | None = None
    thresholds: Thresholds = field(default_factory=Thresholds)
    method: str = "mvfa"
    fitted: tuple[Mapping[str, Any], ...] = ()
    format_version: int = FORMAT_VERSION

    def to_extra_state(self) -> dict[str, Any]:
        """The plain dictionary stored as ``_extra_state`` (always in the current format)."""
        state = asdict(self)
        state.update(
            format_version=FORMAT_VERSION, levels=list(self.levels), datasets=list(self.datasets),
            fitted=[dict(record) for record in self.fitted],
        )
        state["thresholds"]["reference_scores"] = list(self.thresholds.reference_scores)
        return state

    @classmethod
    def from_extra_state(cls, state: Mapping[str, Any], source: str = "checkpoint") -> ModelDescription:
        """Parse an ``_extra_state`` of any known format version (``source`` names the file)."""
        version = int(state.get("format_version", 1))
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"{source}: written in model format version {version}, but this medad reads versions up to "
                f"{FORMAT_VERSION}: upgrade medad to use it"
            )
        try:
            thresholds = state.get("thresholds")
            if version == 1:  # one image threshold, chosen as the F1-best on the support set
                image = state.get("threshold")
                thresholds = Thresholds(image, None, SUPPORT_F1_RULE if image is not None else NO_RULE, NO_RULE)
            else:
                thresholds = Thresholds(**thresholds)
            return cls(
                backbone=BackboneSpec(**state["backbone"]),
                levels=tuple(int(level) for level in state["levels"]),
                datasets=tuple(state["datasets"]),
                target=state["target"],
                image_score_from_map=bool(state["image_score_from_map"]),
                clip_weights=state.get("clip_weights"),
                thresholds=thresholds,
                method=state.get("method", "mvfa"),
                fitted=tuple(dict(record) for record in state.get("fitted", ())),
                format_version=version,
            )
        except (KeyError, TypeError) as error:
            raise CheckpointError(f"{source}: its model description is incomplete or malformed ({error!r})") from error

    def replace(self, **changes: Any) -> ModelDescription:
        return replace(self, **changes)


#: :attr:`ModelDescription.clip_weights` of a model whose weights come with its name (``hf-hub:``, ``local-dir:``).
WITH_MODEL_NAME = "with-model-name"


def weights_record(pretrained: str | os.PathLike | None, random_init: bool, model_name: str = "") -> str | None:
    """What :attr:`ModelDescription.clip_weights` records for the weights a backbone was built with."""
    if pretrained in (None, ""):
        if random_init:
            return "random"
        return WITH_MODEL_NAME if weights_come_with_name(model_name) else None
    text = str(pretrained)
    return f"file:{Path(text).name}" if os.path.exists(text) else text


def _refusal(path: str | os.PathLike, error: BaseException) -> CheckpointError:
    text = str(error)
    if isinstance(error, pickle.UnpicklingError) and "weights_only" in text.lower().replace(" ", "_"):
        return CheckpointError(
            f"{path}: refused: it holds pickled Python objects other than tensors, which could run code when "
            "loaded; medad model files hold tensors and plain values only"
        )
    if not zipfile.is_zipfile(path):  # torch.save writes zip archives: a cut one has no directory
        return CheckpointError(f"{path}: not a complete PyTorch checkpoint (truncated, or another kind of file)")
    return CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: {text.strip()[:300]})")


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint dictionary with ``torch.load(weights_only=True)``: no pickled code runs.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: an empty, truncated or corrupt file, one with pickled code, or one that
            does not hold a dictionary; the message names the file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: model file not found")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a model: was it copied or downloaded completely?")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for unsafe or corrupt files
        raise _refusal(path, error) from error
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: not a checkpoint dictionary (it holds a {type(state).__name__})")
    return dict(state)


def description_tensor(description: ModelDescription) -> torch.Tensor:
    """The description as stored in a state dict: its JSON text as a ``uint8`` tensor."""
    return torch.tensor(list(json.dumps(description.to_extra_state()).encode("utf-8")), dtype=torch.uint8)


def _stored_description(state: Mapping[str, Any], prefix: str = "") -> Mapping[str, Any] | None:
    """The raw description dictionary of a detector state dict (either format), or ``None``."""
    stored = state.get(prefix + DESCRIPTION_KEY)
    if isinstance(stored, torch.Tensor) and stored.dtype == torch.uint8:
        return json.loads(bytes(stored.tolist()).decode("utf-8"))
    legacy = state.get(prefix + _LEGACY_KEY)
    return legacy if isinstance(legacy, Mapping) else None


def stored_description(state: Mapping[str, Any], prefix: str = "", source: str = "checkpoint") -> ModelDescription | None:
    """The :class:`ModelDescription` stored under ``prefix`` in a state dict, or ``None``."""
    raw = _stored_description(state, prefix)
    return None if raw is None else ModelDescription.from_extra_state(raw, source)


def checkpoint_kind(state: Mapping[str, Any], source: str = "checkpoint") -> str:
    """``"detector"`` (a medad ``model.pt``) or ``"adapters"`` (released MVFA adapters); anything
    else (a resume checkpoint, another model's state dict) is refused with what it holds."""
    if _stored_description(state) is not None:
        return "detector"
    if _ADAPTER_KEYS <= set(state):
        return "adapters"
    keys = sorted(map(str, state))
    hint = " (a resume checkpoint: use models/model.pt)" if {"model", "optimizer"} <= set(keys) else ""
    shown = ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "")
    raise CheckpointError(
        f"{source}: neither a medad model (models/model.pt) nor released MVFA adapters "
        f"('seg_adapters'/'det_adapters'){hint}; its keys are: {shown}"
    )


def describe(path_or_state: str | os.PathLike | Mapping[str, Any]) -> ModelDescription | None:
    """The :class:`ModelDescription` of a model file or state dict; ``None`` for released MVFA
    adapters, which describe nothing (they fit MVFA's defaults)."""
    if isinstance(path_or_state, Mapping):
        state, source = path_or_state, "checkpoint"
    else:
        state, source = read_checkpoint(path_or_state), str(path_or_state)
    if checkpoint_kind(state, source) == "adapters":
        return None
    return stored_description(state, source=source)


#: Where :func:`save_model` keeps earlier versions of a model file: ``<models>/versions/``.
VERSIONS_FOLDER = "versions"


def _version_name(path: Path) -> str:
    """``<stem>-<UTC time to the microsecond>.pt``: sortable by age."""
    return f"{path.stem}-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S%fZ')}{path.suffix}"


def _keep_version(path: Path) -> Path:
    """Link the model file ``path`` into ``versions/`` under a new name (it stays in place too)."""
    versions = path.parent / VERSIONS_FOLDER
    versions.mkdir(parents=True, exist_ok=True)
    while True:
        kept = versions / _version_name(path)
        try:
            os.link(path, kept)
            return kept
        except FileExistsError:
            continue  # two saves within one microsecond: take the next name
        except OSError:  # a filesystem without hard links
            if not kept.exists():
                shutil.copy2(path, kept)
                return kept


def save_model(model: torch.nn.Module | Mapping[str, Any], path: str | os.PathLike, keep_previous: bool = False) -> Path | None:
    """Write a detector's ``model.pt``: the one way every run (training, the baselines,
    normal-only adaptation, MONAI Label) saves a model, always as a whole, never a half file.

    The state dict is written to a temporary name beside ``path`` and renamed onto it, so readers
    see the old or the new model. Call it only when the run that made the model has completed.

    Args:
        model: the detector (its ``state_dict()`` is saved) or a state dict.
        path: the model file.
        keep_previous: keep the model ``path`` held before in ``versions/`` beside it
            (:func:`model_versions`, :func:`restore_model_version`) instead of dropping it.

    Returns:
        The version file that now holds the replaced model (``None`` without one).
    """
    path = Path(path)
    state = model.state_dict() if isinstance(model, torch.nn.Module) else dict(model)
    kept = None
    with atomic_write(path, "wb") as handle:
        torch.save(state, handle)
        if keep_previous and path.is_file():  # once the new model is written: a failed save keeps no copy
            kept = _keep_version(path)
    return kept


def model_versions(path: str | os.PathLike) -> list[Path]:
    """The earlier versions :func:`save_model` kept of the model file ``path``, oldest first."""
    path = Path(path)
    return sorted((path.parent / VERSIONS_FOLDER).glob(f"{path.stem}-*{path.suffix}"))


def restore_model_version(path: str | os.PathLike, version: str | os.PathLike | None = None) -> tuple[Path, Path | None]:
    """Put an earlier version back as the model file ``path`` (the newest one kept, or
    ``version``: a file name from :func:`model_versions`), byte for byte; the current model is
    kept as a version in turn, so going back can be undone. The version is read first: a
    broken one is refused.

    Returns:
        The version that was restored (now gone from ``versions/``) and the version file that
        now holds the model it replaced.
    """
    path = Path(path)
    kept = model_versions(path)
    if version is None:
        if not kept:
            raise FileNotFoundError(f"{path}: no earlier version is kept in {path.parent / VERSIONS_FOLDER}")
        chosen = kept[-1]
    else:
        chosen = path.parent / VERSIONS_FOLDER / Path(version).name
        if chosen not in kept:
            names = ", ".join(p.name for p in kept) or "none"
            raise FileNotFoundError(f"{path}: no kept version {Path(version).name} (kept: {names})")
    checkpoint_kind(read_checkpoint(chosen), str(chosen))
    replaced = _keep_version(path) if path.is_file() else None
    os.replace(chosen, path)
    return chosen, replaced
