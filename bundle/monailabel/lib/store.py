"""The detector behind the app: its settings, its loading and reloading.

The bundle's ``models/model.pt`` describes itself (:mod:`medad.checkpoint`): the MVFA adapters,
prompt features, few-shot memory, calibration, the backbone they were made for and the decision
thresholds with their rules; the frozen CLIP weights come from ``clip_weights`` (or, for a test
or demo model, the seeded random backbone it records). The detector is loaded with
:func:`medad.load_detector`, as the bundle's evaluation and inference load it, on first use and
again whenever ``model.pt`` changes, which is how the server picks up a few-shot adaptation run
in MONAI Label's training subprocess. Its thresholds are the ones every surface uses
(:meth:`medad.MVFADetector.effective_thresholds`).
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

from medad import MVFADetector, load_detector
from medad.io import atomic_write
from medad.transforms import SLICE_PLANES, mvfa_preprocessing

from lib.options import int_option, parse_window

logger = logging.getLogger(__name__)

#: What the last adaptation did (informational: the thresholds themselves live in model.pt).
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
        """What the last adaptation wrote (empty before the first one)."""
        path = self.settings.adaptation_path
        return json.loads(path.read_text()) if path.is_file() else {}

    def save(self, detector: MVFADetector, record: Mapping[str, Any]) -> None:
        """Write ``model.pt`` and then the adaptation record, each atomically (readers see the old
        or the new file, never half of one)."""
        with atomic_write(self.settings.model_path, "wb") as handle:
            torch.save(detector.state_dict(), handle)
        with atomic_write(self.settings.adaptation_path) as handle:
            json.dump(dict(record), handle, indent=2)
        logger.info("saved the adapted detector to %s", self.settings.model_path)
