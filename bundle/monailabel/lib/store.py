"""The detector behind the app: its settings, its loading and reloading, and its thresholds.

The bundle's ``models/model.pt`` holds the MVFA adapters, prompt features, few-shot memory and
calibration, and which backbone they were made for (not the frozen CLIP weights, which come from
``clip_weights``). The detector is built on first use and reloaded whenever ``model.pt`` changes,
which is how the server picks up a few-shot adaptation run in MONAI Label's training subprocess.

The decision thresholds (pixel threshold of the "anomaly" label, image-score threshold of the
decision) that an adaptation derives from held-out normal studies are kept beside the model in
``models/monailabel_thresholds.json``, with the calibration they belong to: a ``model.pt``
replaced by other means (retraining with the bundle) no longer matches them, and the defaults
of :func:`default_thresholds` apply again.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from monai.transforms import Compose

from medad import MVFADetector, build_detector
from medad.detector import read_checkpoint
from medad.io import atomic_write
from medad.transforms import SLICE_PLANES, mvfa_preprocessing

from lib.options import int_option, parse_bool, parse_window

logger = logging.getLogger(__name__)

#: Name of the thresholds file written beside ``model.pt`` by the few-shot adaptation.
THRESHOLDS_FILE = "monailabel_thresholds.json"


@dataclass(frozen=True)
class AppSettings:
    """What ``monailabel start_server --conf key value`` sets (see the app's README)."""

    bundle_path: Path
    clip_weights: str
    clip_random_init: bool
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
            clip_weights=conf.get("clip_weights", "openai"),
            clip_random_init=parse_bool("--conf clip_random_init", conf.get("clip_random_init", "false")),
            precision=conf.get("precision", "fp32"),
            device=torch.device(conf.get("device", default_device)),
            target=conf.get("target") or None,
            window=parse_window(conf.get("window")),
            slice_plane=slice_plane,
            batch_size=int_option("--conf batch_size", conf.get("batch_size", 8), 1),
            normal_prefix=conf.get("normal_prefix", "normal_"),
        )

    def preprocessing(self, kind: str, image_size: int) -> Compose:
        """The bundle's preprocessing (``medad.transforms.mvfa_preprocessing``) of a 2D
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
    def thresholds_path(self) -> Path:
        return self.bundle_path / "models" / THRESHOLDS_FILE


@dataclass(frozen=True)
class Thresholds:
    """Pixel threshold of the "anomaly" label and image-score threshold of the decision."""

    pixel: float
    image: float
    source: str  # "adaptation" (derived from held-out normal studies) or "default"


def default_thresholds(detector: MVFADetector) -> Thresholds:
    """Thresholds for a detector without an adaptation of its own.

    Zero-shot maps and scores sum an abnormal probability over the adapted levels, so half the
    number of levels is "abnormal more likely than normal" on average over the levels. Few-shot
    maps are min-max normalised with the calibration ranges, so 0.5 is the middle of the range
    seen on the support set.
    """
    if detector.has_memory:
        return Thresholds(0.5, 0.5, "default")
    middle = 0.5 * len(detector.encoder.levels)
    return Thresholds(middle, middle, "default")


def calibration_record(detector: MVFADetector) -> dict[str, list[float]]:
    """The detector's calibration ranges as plain numbers (what adaptation thresholds belong to)."""
    return {name: [float(r.low), float(r.high)] for name, r in detector.calibrated_ranges().items()}


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
        extra = read_checkpoint(path).get("_extra_state")
        # The backbone a medad model.pt was made for (model_name, image_size, quick_gelu) and its
        # adapter levels; a released MVFA adapter file has none: build_detector's defaults are its.
        made_for = {**extra["backbone"], "levels": extra["levels"]} if isinstance(extra, Mapping) else {}
        weights = None if settings.clip_random_init else settings.clip_weights
        logger.info("building the detector from %s with CLIP weights %s", path, weights or "(random)")
        detector = build_detector(
            datasets=[],
            target=settings.target,
            pretrained=weights,
            random_init=settings.clip_random_init,
            checkpoint=path,
            precision=settings.precision,
            **made_for,
        )
        if detector.target is None:
            raise ValueError(
                f"{path} names no target data set to score: start the server with --conf target <name> "
                "(a BMAD name such as Brain, Liver, Retina_RESC, Chest, or the name the model was trained with)"
            )
        return detector.to(settings.device).eval()

    def thresholds(self, detector: MVFADetector) -> Thresholds:
        """The adaptation's thresholds where they belong to the detector's calibration, else the
        defaults."""
        path = self.settings.thresholds_path
        if not path.is_file() or not (detector.has_memory and detector.is_calibrated):
            return default_thresholds(detector)
        record = json.loads(path.read_text())
        stored = record.get("calibration", {})
        current = calibration_record(detector)
        if set(stored) != set(current) or any(
            not torch.allclose(torch.tensor(stored[name]), torch.tensor(current[name])) for name in current
        ):
            logger.warning("%s belongs to another calibration than %s: using default thresholds", path, self.settings.model_path)
            return default_thresholds(detector)
        return Thresholds(float(record["threshold"]), float(record["score_threshold"]), "adaptation")

    def adaptation_record(self) -> dict[str, Any]:
        """What the last adaptation wrote (empty before the first one)."""
        path = self.settings.thresholds_path
        return json.loads(path.read_text()) if path.is_file() else {}

    def save(self, detector: MVFADetector, record: Mapping[str, Any]) -> None:
        """Write ``model.pt`` and then the thresholds file, each atomically (readers see the old or
        the new file, never half of one)."""
        with atomic_write(self.settings.model_path, "wb") as handle:
            torch.save(detector.state_dict(), handle)
        with atomic_write(self.settings.thresholds_path) as handle:
            json.dump(dict(record), handle, indent=2)
        logger.info("saved the adapted detector to %s", self.settings.model_path)
