"""Scoring one input as a user has it: a file (2D image, NIfTI, DICOM file or series folder), a
PIL image or an array, with the model's own decision thresholds.

:func:`predict_input` is what the MONAI Label app and Python users call. It runs the bundle's
``inferring`` pipeline on one input, with the same objects: ``mvfa_preprocessing``,
:class:`medad.engine.inferers.AnomalyInferer`, :func:`medad.engine.inferers.final_scores` (the detector's final
scores and the blank rule) and ``MapToInputGridd``; so all surfaces give the same map, score and
decision for the same input and model (``tests/test_surfaces.py``). :func:`dicom_results` writes
a DICOM input's prediction as the DICOM objects that the bundle's ``output_format`` ``dicom``
writes (:func:`medad.io.dicom_results.write_results`, the same code).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from medad.model.decision import GIVEN_RULE, Thresholds, conformal_p_values
from medad.model.detector import MVFADetector
from medad.io.discovery import input_kind
from medad.io.outputs import MapToInputGridd
from medad.io.transforms import input_slice_indices, mvfa_preprocessing, plain_tensor
from medad.engine.inferers import AnomalyInferer, final_scores
from medad.engine.volumes import DEFAULT_SLICE_BATCH
from medad.surfaces.deploy import runtime_network, state_sha256

__all__ = ["Prediction", "dicom_results", "predict_input"]


@dataclass
class Prediction:
    """The result of :func:`predict_input`.

    Attributes:
        anomaly_map: float32 map on the input's own grid: ``(H, W)`` for 2D images (rows,
            columns, as PIL and numpy lay out images; the bundle's 2D NIfTI map, on the grid
            MONAI's ``LoadImage`` reads the image on, is its transpose), the input's voxel grid
            for volumes.
        score: image (volume) score; ``anomalous``: ``score >= thresholds.image``.
        thresholds: the thresholds applied and their rules (:mod:`medad.model.decision`).
        p_value: the score's conformal p-value against the normal images a site calibrated on
            (:func:`medad.model.decision.conformal_p_values`); ``None`` for a model without them.
        kind: ``"image"`` or ``"volume"``.
        blank: a 2D image that is background only (scored 0), or a volume without any
            non-empty slice.
        volume: for volumes, ``score_p95``, ``slice_axis``, ``slice_scores`` (by index in the
            input file) and ``empty_slices``.
        meta: the map's affine on MONAI's grid of the input (for 2D images that of
            ``anomaly_map.T``) and the input's name.
    """

    anomaly_map: np.ndarray
    score: float
    anomalous: bool
    thresholds: Thresholds
    kind: str
    blank: bool
    p_value: float | None = None
    volume: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> np.ndarray:
        """The pixel label, ``uint8`` 1 where ``anomaly_map >= thresholds.pixel``."""
        return (self.anomaly_map >= self.thresholds.pixel).astype(np.uint8)


def _as_file(source: Any, folder: str) -> str:
    """A path for ``source``: files as they are; PIL images and arrays written losslessly (TIFF) into
    ``folder``, so that they run through the very reader files run through (written by hand: MONAI's
    readers take files, and its array path skips the reader's mode conversion)."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, np.ndarray):
        array = source
        if np.issubdtype(array.dtype, np.floating):
            if array.ndim != 2:
                raise ValueError(f"float arrays must be 2D gray images (H, W), got shape {array.shape}")
            array = array.astype(np.float32)
        elif array.dtype not in (np.uint8, np.uint16) or (array.dtype == np.uint16 and array.ndim != 2):
            raise ValueError(
                f"arrays must be uint8 (gray, RGB, RGBA), uint16 or float gray images, got {array.dtype} {array.shape}"
            )
        source = Image.fromarray(array)  # modes L/RGB/RGBA, I;16 or F
    if not isinstance(source, Image.Image):
        raise TypeError(f"expected a file path, a PIL image or a numpy array, got {type(source).__name__}")
    path = os.path.join(folder, "input.tiff")  # lossless for every PIL mode (palette, CMYK, 16-bit, float)
    source.save(path)
    return path


@torch.no_grad()
def predict_input(
    detector: MVFADetector,
    source: str | os.PathLike | Image.Image | np.ndarray,
    window: str | list[float] | None = None,
    slice_plane: str = "axial",
    batch_size: int = DEFAULT_SLICE_BATCH,
    image_threshold: float | None = None,
    pixel_threshold: float | None = None,
    runtime: str = "torch",
    export_dir: str | os.PathLike | None = None,
) -> Prediction:
    """Score one input with ``detector`` (on its own device) and return the fused map at the
    input's size, the score and the decision (:class:`Prediction`).

    Thresholds: the model's (:meth:`medad.MVFADetector.effective_thresholds`) unless given.
    ``window`` and ``slice_plane`` as in :func:`medad.io.transforms.mvfa_preprocessing`.
    ``runtime``: ``"torch"``, or ``"onnxruntime"`` / ``"openvino"`` to score with the detector's
    exported graph (:func:`medad.surfaces.deploy.runtime_network`; kept in ``export_dir`` and
    reused while it records the same model, else exported on every call): for many inputs, pass
    the detector ``runtime_network`` returns, once, with ``runtime="torch"``.

    >>> # prediction = predict_input(medad.load_detector("models/model.pt"), "scan.png")
    """
    device = detector.text_features.device
    if runtime != "torch":
        detector = runtime_network(detector, device, runtime, export_dir=export_dir)
    with tempfile.TemporaryDirectory(prefix="medad-input-") as folder:
        path = _as_file(source, folder)
        kind = input_kind(path)
        if kind is None:
            raise ValueError(f"{path}: not a supported input (2D PNG/JPEG/BMP/TIFF image, NIfTI or DICOM)")
        volume = kind == "volume"
        preprocessing = mvfa_preprocessing(
            detector.image_size, mask_key=None, window=window, volume=volume, slice_plane=slice_plane
        )
        data = preprocessing({"image": path})
    image = data["image"]
    batch = plain_tensor(image)[None].to(device)
    scored = AnomalyInferer(batch_size)(batch, detector)
    final, blanks = final_scores(detector, scored, batch)
    if final is None:
        raise RuntimeError("this detector has a few-shot memory but no calibration: build it with the few-shot workflow")
    anomaly_map, score, blank = final.anomaly_map[0], float(final.score[0]), bool(blanks[0])
    extra: dict[str, Any] = {}
    if volume:
        axis, indices = input_slice_indices(image)
        order = sorted(range(len(indices)), key=indices.__getitem__)
        extra = {
            "score_p95": float(scored.score_p95[0]),
            "slice_axis": axis,
            "slice_scores": [float(scored.slice_scores[0, k]) for k in order],
            "empty_slices": [indices[k] for k in order if bool(scored.empty_slices[0, k])],
        }
    pred = _like(image, torch.as_tensor(anomaly_map).float().cpu()[None])
    restored = MapToInputGridd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=False)(
        {"image": image, "pred": pred}
    )["pred"]
    values = np.asarray(restored.array[0], dtype=np.float32)
    if volume and len(image.meta["spatial_shape"]) == 2:
        values = values[..., 0]  # a 2D NIfTI or DICOM frame ran as a one-slice volume
    elif not volume:
        values = np.ascontiguousarray(values.T)  # MONAI's (columns, rows) to (rows, columns)
    effective = detector.effective_thresholds()
    thresholds = Thresholds(
        effective.image if image_threshold is None else float(image_threshold),
        effective.pixel if pixel_threshold is None else float(pixel_threshold),
        effective.image_rule if image_threshold is None else GIVEN_RULE,
        effective.pixel_rule if pixel_threshold is None else GIVEN_RULE,
        effective.reference_scores,
        effective.provenance,
    )
    name = str(source) if isinstance(source, (str, os.PathLike)) else f"<{type(source).__name__}>"
    meta = {"affine": np.asarray(restored.affine, dtype=np.float64), "filename_or_obj": name}
    p_value = float(conformal_p_values([score], effective.reference_scores)[0]) if effective.reference_scores else None
    return Prediction(values, score, score >= thresholds.image, thresholds, kind, blank, p_value, extra, meta)


def _like(image: Any, values: torch.Tensor) -> Any:
    """``values`` as a MetaTensor carrying ``image``'s meta data and applied transforms (what
    ``Invertd`` reads)."""
    from monai.utils import convert_to_dst_type

    return convert_to_dst_type(values, image)[0]


def dicom_results(
    prediction: Prediction,
    source: str | os.PathLike,
    detector: MVFADetector,
    output_dir: str | os.PathLike,
    model_file: str | os.PathLike | None = None,
) -> dict[str, str]:
    """Write the DICOM results of ``prediction`` (:func:`predict_input` of ``source``, a DICOM file
    or series folder) into ``output_dir``: ``parametric_map.dcm`` (the map), ``segmentation.dcm``
    (``prediction.label``) and ``report.dcm`` (TID 1500 SR: score, decision, image threshold and
    its rule, p-value), the objects and UIDs the bundle's inference writes with ``output_format``
    ``dicom`` for the same input and model (:func:`medad.io.dicom_results.write_results`). Needs
    highdicom (``pip install medad[dicom]``).

    ``model_file``: the ``model.pt`` the detector was loaded from, whose SHA-256 keys the objects'
    UIDs as in the bundle (:func:`medad.io.dicom_results.result_uids`); without it they are keyed
    by a SHA-256 of the detector's weights (the same on every run, but not the bundle's UIDs).
    Returns the paths written, by object.

    >>> # prediction = predict_input(detector, "series/"); dicom_results(prediction, "series/", detector, "out/")
    """
    from medad.io.dicom_results import read_sources, write_results
    from medad.io.files import content_sha256

    model_key = content_sha256(model_file) if model_file is not None else state_sha256(detector)
    thresholds = prediction.thresholds
    affine = None if prediction.kind == "image" else prediction.meta["affine"]
    written = write_results(
        output_dir, read_sources(source), prediction.anomaly_map, affine,
        score=prediction.score, anomalous=prediction.anomalous, threshold=thresholds.image, rule=thresholds.image_rule,
        pixel_threshold=thresholds.pixel, pixel_rule=thresholds.pixel_rule, model=detector.description,
        model_key=model_key, p_value=prediction.p_value,
    )
    return {name: str(path) for name, path in written.items()}
