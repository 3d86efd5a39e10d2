"""The infer task: MVFA's anomaly label (or continuous map), image score and decision.

2D images (PNG, JPEG, BMP, TIFF) run through ``medad.transforms.mvfa_preprocessing``; volumes
(NIfTI, DICOM file or series folder) through its ``volume=True`` pipeline and
:func:`medad.volumes.score_volumes`, slice by slice along the ``slice_plane`` axis. The map is
brought back to the input's pixel or voxel grid by inverting the preprocessing (MONAI
``Invertd``, as the bundle's inference does), so the label overlays the image it came from.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import nibabel as nib
import numpy as np
import torch
from fastapi import HTTPException
from monai.data import MetaTensor
from monai.data.utils import to_affine_nd
from monai.transforms import Invertd
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from PIL import Image

from medad import MVFADetector
from medad.transforms import input_slice_indices
from medad.volumes import input_kind, score_volumes

from lib.options import choice_option, numeric_option
from lib.store import DetectorStore

#: The label value of anomalous pixels in the returned label image.
LABEL_NAMES = {"anomaly": 1}
#: What the returned file holds: the thresholded label, or the continuous anomaly map (float32).
RESULTS = ("label", "map")


def _write_nifti(array: np.ndarray, affine: np.ndarray) -> str:
    """Write a temporary NIfTI file (MONAI Label deletes it once sent) and return its path."""
    handle = tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False)
    handle.close()
    image = nib.Nifti1Image(array, affine)
    # Scanner coordinates in both header fields, as MONAI's and ITK's writers set them.
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, handle.name)
    return handle.name


def _write_png(label: np.ndarray) -> str:
    handle = tempfile.NamedTemporaryFile(suffix=".png", delete=False)
    handle.close()
    Image.fromarray(label).save(handle.name)
    return handle.name


class AnomalyInfer(InferTask):
    """Anomaly detection of one image or volume of the datastore.

    Request options (shown in the viewers' options table):

    - ``result``: ``"label"`` returns the thresholded label (uint8, 1 = anomaly; PNG for 2D
      images, NIfTI with the input's affine for volumes); ``"map"`` returns the continuous
      anomaly map (float32 NIfTI on the same grid) for clients that show scalar overlays.
    - ``threshold``: pixel threshold of the label; ``score_threshold``: image (volume) score
      threshold of the decision. ``"auto"`` takes those of the last few-shot adaptation, or the
      defaults of :func:`lib.store.default_thresholds`.

    The JSON result holds the score, the decision, the thresholds used and where they come from,
    the map's range and, for volumes, the score of every slice (by its index in the input file).
    """

    def __init__(self, store: DetectorStore) -> None:
        super().__init__(
            type=InferType.SEGMENTATION,
            labels=LABEL_NAMES,
            # Volumes are what 3D Slicer and OHIF show; 2D images run through the same model.
            dimension=3,
            description=(
                "MVFA anomaly detection (CLIP with multi-level adapters): anomaly label or map, "
                "image score and decision, for 2D images and volumes (slice by slice)"
            ),
            config={"result": list(RESULTS), "threshold": "auto", "score_threshold": "auto"},
        )
        self.store = store

    def is_valid(self) -> bool:
        return self.store.settings.model_path.is_file()

    @torch.no_grad()
    def _score(self, detector: MVFADetector, kind: str, image: MetaTensor) -> tuple[torch.Tensor, float, dict]:
        """The anomaly map on the preprocessed grid, the score, and per-slice results for volumes."""
        batch = image.as_tensor()[None].to(self.store.settings.device)
        if kind == "image":
            scores = detector.predict(batch)
            return scores.anomaly_map[0].float().cpu(), float(scores.score[0]), {}
        scores = score_volumes(detector, batch, self.store.settings.batch_size)
        axis, indices = input_slice_indices(image)
        order = sorted(range(len(indices)), key=indices.__getitem__)
        slices = {
            "score_p95": float(scores.score_p95[0]),
            "slice_axis": axis,
            "slice_scores": [float(scores.slice_scores[0, k]) for k in order],
            "empty_slices": [indices[k] for k in order if bool(scores.empty_slices[0, k])],
        }
        return scores.anomaly_map[0].float().cpu(), float(scores.score[0]), slices

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Run :meth:`infer`; a bad request or input file is answered with HTTP 400 and the reason
        (MONAI Label answers any other exception with a bare 500)."""
        try:
            return self.infer(request)
        except (ValueError, FileNotFoundError) as error:
            raise HTTPException(status_code=400, detail=str(error)) from error

    def infer(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The result file's path and the JSON result for a MONAI Label infer request."""
        start = time.perf_counter()
        path = request.get("image")
        if not path:
            raise ValueError("no image: the image id is not in the datastore, and no file was uploaded")
        if not isinstance(path, str) or not os.path.exists(path):
            raise ValueError(f"expected the path of an image, volume or DICOM series folder, got {path!r}")
        kind = input_kind(path)
        if kind is None:
            raise ValueError(f"{path}: not a supported input (2D PNG/JPEG/BMP/TIFF image, NIfTI or DICOM)")
        result = choice_option("result", request.get("result", RESULTS[0]), RESULTS)
        requested_pixel = numeric_option("threshold", request.get("threshold"))
        requested_score = numeric_option("score_threshold", request.get("score_threshold"))

        with self.store.detector() as detector:
            preprocessing = self.store.settings.preprocessing(kind, detector.image_size)
            data = preprocessing({"image": path})
            loaded = time.perf_counter()
            anomaly_map, score, slices = self._score(detector, kind, data["image"])
            defaults = self.store.thresholds(detector)
            target, mode = detector.target, "few-shot" if detector.has_memory else "zero-shot"
        scored = time.perf_counter()

        pixel_threshold = defaults.pixel if requested_pixel is None else requested_pixel
        score_threshold = defaults.image if requested_score is None else requested_score
        image = data["image"]
        data["pred"] = MetaTensor(anomaly_map[None])
        pred = Invertd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=False)(data)["pred"]
        values = np.asarray(pred.array[0], dtype=np.float32)
        if kind == "volume" and len(image.meta["spatial_shape"]) == 2:
            values = values[..., 0]  # a 2D NIfTI or DICOM frame ran as a one-slice volume
        label = (values >= pixel_threshold).astype(np.uint8)
        if kind == "volume":
            affine = to_affine_nd(3, np.asarray(pred.affine, dtype=np.float64))
            output = _write_nifti(values if result == "map" else label, affine)
        elif result == "map":
            output = _write_nifti(values, np.eye(4))  # rows, columns as the bundle's 2D maps
        else:
            output = _write_png(label)

        abnormal = score >= score_threshold
        done = time.perf_counter()
        return output, {
            "label_names": LABEL_NAMES,
            "result": result,
            "kind": kind,
            "target": target,
            "mode": mode,
            "score": score,
            "decision": "abnormal" if abnormal else "normal",
            "abnormal": abnormal,
            "score_threshold": score_threshold,
            "threshold": pixel_threshold,
            "threshold_source": {
                "threshold": defaults.source if requested_pixel is None else "request",
                "score_threshold": defaults.source if requested_score is None else "request",
            },
            "map_range": [float(values.min()), float(values.max())],
            "anomalous_fraction": float(label.mean()),
            "shape": list(values.shape),
            **slices,
            "latencies": {
                "pre": round(loaded - start, 3),
                "infer": round(scored - loaded, 3),
                "post": round(done - scored, 3),
                "total": round(done - start, 3),
            },
        }
