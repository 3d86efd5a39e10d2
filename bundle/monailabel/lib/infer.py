"""The infer task: MVFA's anomaly label (or continuous map), image score and decision.

Scoring is :func:`medad.predict_input`, the library function Python users call, which runs the
bundle's own steps (``mvfa_preprocessing``, the detector's final scores with the blank rule,
volumes slice by slice, the map brought back to the input's grid by ``Invertd``): the same input
and model give the same map, score and decision here, in the bundle's ``inferring`` and in
Python. The thresholds are the model's (:meth:`medad.MVFADetector.effective_thresholds`).
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import nibabel as nib
import numpy as np
from fastapi import HTTPException
from monai.data.utils import to_affine_nd
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from PIL import Image

from medad import predict_input
from medad.io.files import strict_json
from medad.io.discovery import input_kind

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
      anomaly map (float32 NIfTI on the same grid; for 2D images on the ``(columns, rows)`` grid
      MONAI's ``LoadImage`` reads the image on, as the bundle writes 2D maps) for clients that
      show scalar overlays.
    - ``threshold``: pixel threshold of the label; ``score_threshold``: image (volume) score
      threshold of the decision. ``"auto"`` takes the model's (stored with it, or the default
      of medad's threshold rule, :mod:`medad.model.decision`).

    The JSON result holds the score, the decision, the thresholds used and where they come from
    (with a site threshold's provenance), the score's conformal p-value where the model holds a
    site's reference scores (:mod:`medad.model.decision`),
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

        settings = self.store.settings
        with self.store.detector() as detector:
            prediction = predict_input(
                detector, path, window=settings.window, slice_plane=settings.slice_plane, batch_size=settings.batch_size,
                image_threshold=requested_score, pixel_threshold=requested_pixel,
            )
            target, mode = detector.target, "few-shot" if detector.has_memory else "zero-shot"
        scored = time.perf_counter()

        values, label = prediction.anomaly_map, prediction.label
        if kind == "volume":
            affine = to_affine_nd(3, prediction.meta["affine"])
            output = _write_nifti(values if result == "map" else label, affine)
        elif result == "map":
            # on the grid MONAI's LoadImage reads the image on, (columns, rows), as the bundle's 2D maps
            output = _write_nifti(values.T, to_affine_nd(3, prediction.meta["affine"]))
        else:
            output = _write_png(label)
        score, thresholds = prediction.score, prediction.thresholds
        abnormal = prediction.anomalous
        done = time.perf_counter()
        return output, strict_json({
            "label_names": LABEL_NAMES,
            "result": result,
            "kind": kind,
            "target": target,
            "mode": mode,
            "score": score,
            "decision": "abnormal" if abnormal else "normal",
            "abnormal": abnormal,
            "score_threshold": thresholds.image,
            "threshold": thresholds.pixel,
            "threshold_source": {
                "threshold": "request" if requested_pixel is not None else thresholds.pixel_rule,
                "score_threshold": "request" if requested_score is not None else thresholds.image_rule,
            },
            "p_value": prediction.p_value,
            "threshold_provenance": thresholds.provenance,
            "blank": prediction.blank,
            "map_range": [float(values.min()), float(values.max())],
            "anomalous_fraction": float(label.mean()),
            "shape": list(values.shape),
            **prediction.volume,
            "latencies": {
                "infer": round(scored - start, 3),
                "post": round(done - scored, 3),
                "total": round(done - start, 3),
            },
        })  # strict JSON (null, not NaN) for every client's parser
