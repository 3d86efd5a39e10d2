"""Few-shot adaptation from the server: MVFA's memory bank, calibration and decision thresholds
rebuilt from the studies marked normal in the datastore.

A study is a normal reference when its datastore info says ``"normal": true`` (set it with
``PUT /datastore/image/info?image=<id>`` and the form field ``info={"normal": true}``, or when
uploading with ``params={"normal": true}``), or, unless its info says ``"normal": false``, when
its image id starts with the ``normal_prefix`` (``normal_`` by default: drop ``normal_*.png``
or ``normal_*.nii.gz`` into the studies folder).

What it does: load the normal studies (at most ``max_images`` support images, spread evenly over
them: a 2D image is one support image, a volume gives ``slices_per_volume`` non-empty slices
spread over its extent, prepared as the bundle prepares them), then call the library's
:func:`medad.engine.adaptation.adapt_to_normal_images` with each image's study as its group: the memory
holds every support image (augmented x11 as MVFA does, unless ``augment=false``), and the
calibration and the thresholds come from each study scored against the memory without its own
images (an image never scores against itself). ``models/model.pt``, which now holds the memory,
calibration and thresholds, is replaced atomically once the adaptation has completed; the model
it replaces is kept in ``models/versions/`` (its file name is the record's ``replaced_version``;
:mod:`lib.restore` puts it back), and the server reloads ``model.pt`` on its next request.

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

from medad.engine.adaptation import adapt_to_normal_images
from medad.io.discovery import input_kind
from medad.engine.volumes import iter_slice_batches, prepare_slices

from lib.options import int_option, parse_bool
from lib.store import DetectorStore

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
        """The record of the last adaptation (or restore) and the kept ``versions``, oldest first."""
        return {**self.store.adaptation_record(), "versions": self.store.versions()}

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
            support = torch.stack([image for study in studies for image in groups[study]])
            owners = [study for study in studies for _ in groups[study]]
            thresholds = adapt_to_normal_images(detector, support, owners, augment, batch_size)
            record = {
                "action": "adaptation",
                "threshold": thresholds.pixel,
                "score_threshold": thresholds.image,
                "threshold_rule": thresholds.image_rule,
                "target": detector.target,
                "normal_studies": studies,
                "support_images": int(support.shape[0]),
                "augment": augment,
                "adapted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "seconds": round(time.perf_counter() - start, 2),
            }
            record = self.store.save(detector, record)
        logger.info("adaptation done: %s", record)
        return record
