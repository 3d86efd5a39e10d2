"""Few-shot adaptation from the server: MVFA's memory bank, calibration and decision thresholds
rebuilt from the studies marked normal in the datastore.

A study is a normal reference when its datastore info says ``"normal": true`` (set it with
``PUT /datastore/image/info?image=<id>`` and the form field ``info={"normal": true}``, or when
uploading with ``params={"normal": true}``), or, unless its info says ``"normal": false``, when
its image id starts with the ``normal_prefix`` (``normal_`` by default: drop ``normal_*.png``
or ``normal_*.nii.gz`` into the studies folder).

What it does (MVFA's few-shot memory, with normal studies only):

1. load the normal studies (at most ``max_images`` support images, spread evenly over them): a
   2D image is one support image, a volume gives ``slices_per_volume`` non-empty slices spread
   over its extent, prepared as the bundle prepares them;
2. split the studies in two halves, alternately: a memory half and a held-out half;
3. build the memory bank from the memory half (augmented x11 as MVFA does, unless
   ``augment=false``) and calibrate the fusion on all support images; a held-out image is not in
   the memory, so it shows the memory distances an unseen normal image gets;
4. take the thresholds as the highest anomaly-map value (label) and the highest score
   (decision) of the held-out images: above anything seen on normal studies the model had not
   memorised;
5. rebuild the memory bank from all support images and save ``models/model.pt`` and the
   thresholds atomically; the server reloads them on its next request.

The adapters are not trained here: the bundle's few-shot training (``configs/fewshot.json``)
needs abnormal images with masks as well.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any, TypeVar

import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from medad import MVFADetector, augment_fewshot
from medad.volumes import input_kind, iter_slice_batches, prepare_slices

from lib.options import int_option, parse_bool
from lib.store import DetectorStore, calibration_record

logger = logging.getLogger(__name__)

#: Datastore image info key that marks (true) or unmarks (false) a normal reference study.
NORMAL_INFO_KEY = "normal"

T = TypeVar("T")


def is_normal(image_id: str, info: dict[str, Any], prefix: str) -> bool:
    """Whether a datastore study is a normal reference: its info flag where set, else its name."""
    if NORMAL_INFO_KEY in info:
        return parse_bool(f"datastore info {NORMAL_INFO_KEY!r} of {image_id}", info[NORMAL_INFO_KEY])
    return bool(prefix) and image_id.startswith(prefix)


def spread(items: Sequence[T], count: int) -> list[T]:
    """At most ``count`` of ``items``, evenly spread (the middle of ``count`` equal parts)."""
    if len(items) <= count:
        return list(items)
    return [items[int((k + 0.5) * len(items) / count)] for k in range(count)]


class NormalAdaptation(TrainTask):
    """MONAI Label "train" task that adapts the detector to the normal studies of the datastore
    (see the module docstring). Options: ``max_images``, ``slices_per_volume``, ``augment``."""

    def __init__(self, store: DetectorStore) -> None:
        super().__init__(
            "Few-shot adaptation: rebuild MVFA's memory bank, calibration and thresholds from the "
            "studies marked normal in the datastore (info normal=true, or ids starting with "
            f"{store.settings.normal_prefix!r})"
        )
        self.store = store
        self._config = {"max_images": 16, "slices_per_volume": 4, "augment": True}

    def config(self) -> dict[str, Any]:
        return dict(self._config)

    def stats(self) -> dict[str, Any]:
        return self.store.adaptation_record()

    def _support_images(self, path: str, image_size: int, slices_per_volume: int) -> torch.Tensor:
        """One study as support images ``(n, 3, S, S)`` in [0, 1]."""
        settings = self.store.settings
        kind = input_kind(path)
        if kind is None:
            raise ValueError(f"{path}: not a supported input (2D PNG/JPEG/BMP/TIFF image, NIfTI or DICOM)")
        image = settings.preprocessing(kind, image_size)({"image": path})["image"].as_tensor()
        if kind == "image":
            return image[None]
        # The non-empty slices, by the rule score_volumes skips background slices with.
        foreground = [k for indices, _ in iter_slice_batches(image, settings.batch_size) for k in indices]
        if not foreground:
            raise ValueError(f"{path}: every slice is background; it cannot serve as a normal reference")
        chosen = spread(foreground, slices_per_volume)
        return prepare_slices(image[..., chosen].movedim(-1, 0), image_size)

    def _augmented(self, images: torch.Tensor, augment: bool) -> torch.Tensor:
        return augment_fewshot(images)[0] if augment else images

    @torch.no_grad()
    def _held_out_maxima(self, detector: MVFADetector, images: torch.Tensor) -> tuple[float, float]:
        """Highest map value and highest score of ``images`` with the current memory and calibration."""
        device, batch_size = self.store.settings.device, self.store.settings.batch_size
        parts = [detector.predict(batch.to(device)) for batch in images.split(batch_size)]
        return max(float(p.anomaly_map.max()) for p in parts), max(float(p.score.max()) for p in parts)

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        start = time.perf_counter()
        max_images = int_option("max_images", request.get("max_images", self._config["max_images"]), 2)
        per_volume = int_option("slices_per_volume", request.get("slices_per_volume", self._config["slices_per_volume"]), 1)
        augment = parse_bool("augment", request.get("augment", self._config["augment"]))
        prefix = self.store.settings.normal_prefix
        normal = sorted(i for i in datastore.list_images() if is_normal(i, datastore.get_image_info(i), prefix))
        if len(normal) < 2:
            raise ValueError(
                f"few-shot adaptation needs at least 2 normal studies, found {len(normal)} {normal}: mark studies "
                f"with the datastore info {{{NORMAL_INFO_KEY!r}: true}} or name them {prefix}*"
            )
        logger.info("adapting to %d normal studies: %s", len(normal), normal)

        with self.store.detector(changes=True) as detector:
            batch_size = self.store.settings.batch_size
            pairs = [
                (study, image)
                for study in spread(normal, max_images)
                for image in self._support_images(datastore.get_image_uri(study), detector.image_size, per_volume)
            ]
            groups: dict[str, list[torch.Tensor]] = {}
            for study, image in spread(pairs, max_images):
                groups.setdefault(study, []).append(image)
            studies = list(groups)
            if len(studies) < 2:
                raise ValueError(f"the support images come from one study ({studies}): raise max_images or mark more studies")
            memory_studies, held_out_studies = studies[0::2], studies[1::2]
            memory = torch.stack([image for study in memory_studies for image in groups[study]])
            held_out = torch.stack([image for study in held_out_studies for image in groups[study]])
            support = torch.cat([memory, held_out])

            detector.build_memory(self._augmented(memory, augment), batch_size)
            detector.calibrate(support, batch_size)
            pixel_threshold, score_threshold = self._held_out_maxima(detector, held_out)
            detector.build_memory(self._augmented(support, augment), batch_size)
            record = {
                "threshold": pixel_threshold,
                "score_threshold": score_threshold,
                "calibration": calibration_record(detector),
                "target": detector.target,
                "normal_studies": studies,
                "memory_studies": memory_studies,
                "held_out_studies": held_out_studies,
                "support_images": int(support.shape[0]),
                "augment": augment,
                "adapted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "seconds": round(time.perf_counter() - start, 2),
            }
            self.store.save(detector, record)
        logger.info("adaptation done: %s", record)
        return record
