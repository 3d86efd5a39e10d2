"""The detector behind the app: its settings, its loading and reloading.

The bundle's ``models/model.pt`` describes itself (:mod:`medad.model.checkpoint`): the MVFA adapters,
prompt features, few-shot memory, calibration, the backbone they were made for and the decision
thresholds with their rules; the frozen CLIP weights come from ``clip_weights`` (or, for a test
or demo model, the seeded random backbone it records). The detector is loaded with
:func:`medad.load_detector`, as the bundle's evaluation and inference load it, on first use and
again whenever ``model.pt`` changes, which is how the server picks up a few-shot adaptation run
in MONAI Label's training subprocess. Its thresholds are the ones every surface uses
(:meth:`medad.MVFADetector.effective_thresholds`).

Versions: the app writes ``model.pt`` only through :func:`medad.model.checkpoint.save_model` with
``keep_previous=True``, so each model it replaces stays in ``models/versions/`` beside it
(``model-<UTC time of the replacement>.pt``); :meth:`DetectorStore.restore` puts one back
(:func:`medad.model.checkpoint.restore_model_version`). ``models/monailabel_adaptation.json`` records
the last change the app made to ``model.pt`` (an adaptation or a restore) and, under
``replaced_version``, the version file that holds the model the change replaced.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from monai.transforms import Compose

from medad import MVFADetector, load_detector
from medad.model.checkpoint import describe, model_versions, read_checkpoint, restore_model_version, save_model
from medad.io.files import atomic_write, strict_json
from medad.io.transforms import SLICE_PLANES, mvfa_preprocessing

from lib.options import int_option, parse_window

logger = logging.getLogger(__name__)


#: What the last change of model.pt by the app did, an adaptation or a restore (informational:
#: the thresholds themselves live in model.pt).
ADAPTATION_FILE = "monailabel_adaptation.json"


@dataclass(frozen=True)
class AppSettings:
    """What ``monailabel start_server --conf key value`` sets (see the app's README)."""

    bundle_path: Path
    clip_weights: str | None
    precision: str
    device: torch.device
    target: str | None
    window: str | list[float] | None
    slice_plane: str
    batch_size: int
    normal_prefix: str

    @classmethod
    def from_conf(cls, conf: Mapping[str, str]) -> AppSettings:
        if not conf.get("bundle_path"):
            raise ValueError(
                "no bundle: start the server with --conf bundle_path <folder holding models/model.pt> "
                "(the repository root, or an unpacked model-zoo bundle)"
            )
        if "amp" in conf:
            raise ValueError("--conf amp: amp is a training option; this app runs the model in float32, or with "
                             "--conf precision bf16 (or fp16) for the frozen blocks' matrix products")
        bundle_path = Path(conf["bundle_path"]).expanduser().resolve()
        model_path = bundle_path / "models" / "model.pt"
        if not model_path.is_file():
            raise FileNotFoundError(
                f"{model_path} not found: train the bundle first (python -m monai.bundle run training ...) "
                "or point --conf bundle_path at a bundle that has models/model.pt"
            )
        slice_plane = conf.get("slice_plane", "axial")
        if slice_plane not in SLICE_PLANES:
            raise ValueError(f"--conf slice_plane must be one of {sorted(SLICE_PLANES)}, got {slice_plane!r}")
        default_device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(
            bundle_path=bundle_path,
            clip_weights=conf.get("clip_weights") or None,
            precision=conf.get("precision", "fp32"),
            device=torch.device(conf.get("device", default_device)),
            target=conf.get("target") or None,
            window=parse_window(conf.get("window")),
            slice_plane=slice_plane,
            batch_size=int_option("--conf batch_size", conf.get("batch_size", 8), 1),
            normal_prefix=conf.get("normal_prefix", "normal_"),
        )

    def preprocessing(self, kind: str, image_size: int) -> Compose:
        """The bundle's preprocessing (``medad.io.transforms.mvfa_preprocessing``) of a 2D
        ``"image"`` or a ``"volume"``, with this app's window and slice plane."""
        if kind == "volume":
            return mvfa_preprocessing(
                image_size, mask_key=None, window=self.window, volume=True, slice_plane=self.slice_plane
            )
        return mvfa_preprocessing(image_size, mask_key=None, window=self.window)

    @property
    def model_path(self) -> Path:
        return self.bundle_path / "models" / "model.pt"

    @property
    def adaptation_path(self) -> Path:
        return self.bundle_path / "models" / ADAPTATION_FILE


def _signature(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


class DetectorStore:
    """The app's one detector, built on first use and reloaded when ``model.pt`` is replaced.

    Use it as ``with store.detector() as detector: ...``: the lock keeps a reload or an
    adaptation from changing the detector while a request uses it.
    """

    def __init__(self, settings: AppSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._detector: MVFADetector | None = None
        self._signature: tuple[int, int, int] | None = None

    @contextmanager
    def detector(self, changes: bool = False) -> Iterator[MVFADetector]:
        """The current detector (reloaded first if ``model.pt`` changed), under the store's lock.

        ``changes=True`` (an adaptation in this process): if the block fails, the detector may be
        half changed, so the next use reloads it from ``model.pt``.
        """
        with self._lock:
            self._refresh()
            try:
                yield self._detector
            except BaseException:
                if changes:
                    self._signature = None
                raise

    def _refresh(self) -> None:
        path = self.settings.model_path
        signature = _signature(path)
        if self._detector is not None and signature == self._signature:
            return
        if self._detector is None:
            self._detector = self._build()
        else:
            logger.info("%s changed: reloading the detector", path)
            self._detector.load_checkpoint(path)
            if self.settings.target:
                self._detector.target = self.settings.target
        self._signature = signature

    def _build(self) -> MVFADetector:
        settings, path = self.settings, self.settings.model_path
        logger.info("loading the detector from %s with CLIP weights %s", path, settings.clip_weights or "(the model's own)")
        return load_detector(
            path, settings.clip_weights, target=settings.target, precision=settings.precision, device=settings.device
        )

    def adaptation_record(self) -> dict[str, Any]:
        """What the last adaptation or restore wrote (empty before the first one)."""
        path = self.settings.adaptation_path
        return json.loads(path.read_text()) if path.is_file() else {}

    def versions(self) -> list[str]:
        """File names of the earlier models kept in ``models/versions/``, oldest first."""
        return [path.name for path in model_versions(self.settings.model_path)]

    def _write_record(self, record: Mapping[str, Any]) -> None:
        with atomic_write(self.settings.adaptation_path) as handle:
            json.dump(strict_json(dict(record)), handle, indent=2, allow_nan=False)

    def save(self, detector: MVFADetector, record: Mapping[str, Any]) -> dict[str, Any]:
        """Write ``model.pt`` (:func:`medad.model.checkpoint.save_model`, keeping the model it replaces
        in ``models/versions/``) and then the record, each atomically (readers see the old or the
        new file, never half of one). Returns the record as written: ``record`` with
        ``replaced_version``, the version file holding the replaced model."""
        path = self.settings.model_path
        kept = save_model(detector, path, keep_previous=True)
        replaced = kept.name if kept is not None else None
        record = {**record, "replaced_version": replaced}
        self._write_record(record)
        logger.info("saved the adapted detector to %s (the model it replaced: versions/%s)", path, replaced)
        return record

    def restore(self, version: str | None = None) -> dict[str, Any]:
        """Put a kept version back as ``model.pt`` (:func:`medad.model.checkpoint.restore_model_version`):
        ``version`` is a file name from :meth:`versions`, by default the newest (the model the last
        adaptation or restore replaced). The current model is kept as a version in turn, so a
        restore can be undone the same way. The server reloads the detector on its next request
        (``model.pt`` is a new file). Returns the record written: which version was restored, which
        version now holds the model it replaced, and the restored model's thresholds."""
        path = self.settings.model_path
        restored, kept = restore_model_version(path, version or None)
        replaced = kept.name if kept is not None else None
        state = read_checkpoint(path)
        description = describe(state)
        thresholds = description.thresholds if description is not None else None
        # a few-shot model holds a non-empty memory buffer (memory_<name>, per its method)
        few_shot = any(key.startswith("memory_") and isinstance(value, torch.Tensor) and value.numel() > 0 for key, value in state.items())
        record = {
            "action": "restore",
            "restored_version": restored.name,
            "replaced_version": replaced,
            "threshold": thresholds.pixel if thresholds else None,
            "score_threshold": thresholds.image if thresholds else None,
            "threshold_rule": thresholds.image_rule if thresholds else None,
            "target": description.target if description is not None else None,
            "mode": "few-shot" if few_shot else "zero-shot",
            "restored_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        self._write_record(record)
        logger.info("restored %s from versions/%s (the model it replaced: versions/%s)", path, restored.name, replaced)
        return record
