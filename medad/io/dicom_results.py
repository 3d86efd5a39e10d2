"""DICOM result objects for a DICOM input, built with highdicom: the anomaly map as a Parametric
Map, the thresholded region as a binary Segmentation, the score and decision as a TID 1500
measurement report (Comprehensive 3D SR), and an optional RGB overlay as a Secondary Capture.

Every object references its source series and instances (study, series and SOP instance UIDs,
frame of reference; highdicom copies the patient and study attributes from the sources), is
marked derived and for research only (Parametric Map: ``ContentQualification`` ``RESEARCH``;
Parametric Map and Segmentation: ``ImageType`` ``DERIVED``; every object's series description
says "research use only, not for clinical use") and names the algorithm: software version
``medad.__version__`` and the model's method, backbone and target (a
:class:`medad.ModelDescription` or a plain mapping with those keys).

Geometry (:func:`map_to_frames`): medad's maps come on the grid MONAI's ``LoadImage`` reads the
input on (:class:`medad.io.outputs.MapToInputGridd`, :class:`medad.Prediction`), with its affine.
Each source frame's pixels are placed in the patient coordinates DICOM gives them
(``ImagePositionPatient``, ``ImageOrientationPatient``, ``PixelSpacing``) and looked up on the map
through the inverse of the map's affine, so nothing is assumed about the order of the map's axes.
Files without top-level ``ImagePositionPatient``/``ImageOrientationPatient`` (enhanced multi-frame
files, radiographs) get from MONAI's ``PydicomReader`` an affine over pixel indices (frame, row,
column), and are placed the same way here.

Supported sources: one single-frame image (2D: DX, CR, SC, a single CT/MR slice, single-frame
colour images), a series of single-frame images with plane geometry (CT, MR, PT; one instance per
slice), and one multi-frame image (enhanced CT/MR, legacy converted). Anything else is refused with
the file named (:class:`DicomResultError`).

One case's results (:func:`write_results`: Parametric Map, SEG and SR with :func:`result_uids`)
are what the bundle's inference writes with ``output_format`` ``dicom`` or ``both``
(:class:`SaveDicomResultsd`, into ``outputs/dicom/<case>/``) and what
:func:`medad.surfaces.predict.dicom_results` writes for a :class:`medad.Prediction`: one code path.
The bundle also stores its PNG overlay as a Secondary Capture there (``secondary_capture``) for
viewers that show none of the other objects.

highdicom is an optional dependency (``pip install medad[dicom]``); it is imported only when an
object is built, so medad imports without it.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from monai.transforms import MapTransform
from PIL import Image

from medad.io.files import atomic_write, content_sha256, output_stem
from medad.io.transforms import SLICE_PLANES, import_pydicom, is_dicom_file, number_of_frames
from medad.model.decision import checked_threshold_setting

logger = logging.getLogger(__name__)

__all__ = [
    "ANOMALY_SCORE",
    "ANOMALY_THRESHOLD",
    "ANOMALY_DECISION",
    "CODING_SCHEME",
    "DicomResultError",
    "OUTPUT_FORMATS",
    "OVERLAY_FILE",
    "RESEARCH_ONLY",
    "RESULT_FILES",
    "SaveDicomResultsd",
    "map_to_frames",
    "parametric_map",
    "places_a_map",
    "read_sources",
    "result_objects",
    "result_uids",
    "secondary_capture",
    "segmentation",
    "structured_report",
    "write_dataset",
    "write_results",
]

#: medad's private coding scheme (DICOM PS3.16 8.2: private designators start with "99").
CODING_SCHEME = "99MEDAD"
#: Concept names of the report's items (code value, meaning) in :data:`CODING_SCHEME`.
ANOMALY_SCORE = ("ANOM_SCORE", "Anomaly score")
ANOMALY_THRESHOLD = ("ANOM_THRESHOLD", "Anomaly score threshold")
ANOMALY_DECISION = ("ANOM_DECISION", "Anomaly decision")
#: What every object's series description ends with.
RESEARCH_ONLY = "research use only, not for clinical use"

#: The bundle's ``output_format`` values: today's map files only, DICOM objects instead, or both.
OUTPUT_FORMATS = ("nifti", "dicom", "both")
#: The files :func:`write_results` writes into a case's folder, by object.
RESULT_FILES = {"parametric_map": "parametric_map.dcm", "segmentation": "segmentation.dcm", "report": "report.dcm"}
#: The Secondary Capture of the overlay that :class:`SaveDicomResultsd` writes beside them on request.
OVERLAY_FILE = "overlay.dcm"
#: The patient direction opposite each axis code (DICOM's letters: H head, F foot).
_OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "F", "I": "H"}

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_INDEX_TOLERANCE = 1e-3  # voxels: how far from a voxel centre a source pixel may land


class DicomResultError(ValueError):
    """Sources or a map that a DICOM result object cannot be built from; the message names the
    file (or SOP instance) and the reason."""


def _hd() -> Any:
    try:
        import highdicom
    except ImportError as error:
        raise ImportError(
            "DICOM result objects (Parametric Map, SEG, SR, Secondary Capture) need highdicom: "
            "pip install medad[dicom]"
        ) from error
    return highdicom


# --------------------------------------------------------------------------------------------
# sources


def _name(ds: Any) -> str:
    """The file a source data set was read from, else its SOP instance UID."""
    filename = getattr(ds, "filename", None)
    if isinstance(filename, (str, os.PathLike)) and str(filename):
        return str(filename)
    return f"SOP instance {ds.get('SOPInstanceUID', '<no SOPInstanceUID>')}"


def read_sources(path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Any]:
    """The source data sets of a DICOM input as medad takes it: a DICOM file, a series folder (every
    DICOM file in it) or a list of files; with pixel data, each remembering its ``filename``."""
    pydicom = import_pydicom()
    if isinstance(path, (str, os.PathLike)):
        path = Path(path)
        files = sorted(p for p in path.iterdir() if p.is_file() and is_dicom_file(p)) if path.is_dir() else [path]
        if not files:
            raise DicomResultError(f"{path}: no DICOM files in the folder")
    else:
        files = [Path(p) for p in path]
    sources = []
    for file in files:
        try:
            sources.append(pydicom.dcmread(file))
        except Exception as error:  # pydicom raises several types for broken files
            raise DicomResultError(f"{file}: not a readable DICOM file ({type(error).__name__}: {error})") from error
    return sources


def _has_plane_geometry(ds: Any) -> bool:
    """Whether ``ds`` has top-level ``ImagePositionPatient`` and ``ImageOrientationPatient``: what
    MONAI's ``PydicomReader`` builds a patient-space affine from."""
    return "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds


def _checked_sources(sources: Sequence[Any]) -> list[Any]:
    """``sources`` in DICOM frame order, after the checks that the objects need: one study and
    series, one size, a single multi-frame image alone, a series with plane geometry (sorted along
    its slice normal, then by ``InstanceNumber``)."""
    pydicom = import_pydicom()
    if isinstance(sources, pydicom.Dataset):
        sources = [sources]
    sources = list(sources)
    if not sources:
        raise DicomResultError("no source DICOM data sets given")
    for ds in sources:
        if not isinstance(ds, pydicom.Dataset):
            raise TypeError(f"sources must be pydicom data sets (see read_sources), got {type(ds).__name__}")
        for keyword in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns"):
            if keyword not in ds:
                raise DicomResultError(f"{_name(ds)}: not an image with {keyword}: cannot reference it")
    first = sources[0]
    for ds in sources[1:]:
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns"):
            if ds.get(keyword) != first.get(keyword):
                raise DicomResultError(
                    f"{_name(ds)}: {keyword} {ds.get(keyword)} differs from {first.get(keyword)} of {_name(first)}: "
                    "the sources must be one series of images of one size"
                )
    uids = [str(ds.SOPInstanceUID) for ds in sources]
    if len(set(uids)) != len(uids):
        duplicate = next(ds for ds in sources if uids.count(str(ds.SOPInstanceUID)) > 1)
        raise DicomResultError(f"{_name(duplicate)}: SOP instance {duplicate.SOPInstanceUID} given twice")
    multi = [ds for ds in sources if number_of_frames(ds) > 1]
    if multi and len(sources) > 1:
        raise DicomResultError(
            f"{_name(multi[0])}: a multi-frame image ({number_of_frames(multi[0])} frames) among {len(sources)} sources: "
            "give a multi-frame image on its own or a series of single-frame images"
        )
    if multi:
        if "PerFrameFunctionalGroupsSequence" not in multi[0] and "SharedFunctionalGroupsSequence" not in multi[0]:
            raise DicomResultError(
                f"{_name(multi[0])}: a multi-frame image without functional groups (not an enhanced or legacy "
                "converted image, e.g. a multi-frame secondary capture or ultrasound cine): not supported"
            )
        return sources
    if len(sources) == 1:
        return sources
    for ds in sources:
        if not _has_plane_geometry(ds) or "FrameOfReferenceUID" not in ds:
            raise DicomResultError(
                f"{_name(ds)}: a series of {len(sources)} images without ImagePositionPatient, "
                "ImageOrientationPatient and FrameOfReferenceUID: its slices cannot be placed"
            )
    orientation = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    for ds in sources[1:]:
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=np.float64), orientation, atol=1e-4):
            raise DicomResultError(f"{_name(ds)}: ImageOrientationPatient differs from {_name(first)}'s")
    normal = np.cross(orientation[:3], orientation[3:])

    def key(ds: Any) -> tuple[float, int]:
        return float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=np.float64))), int(ds.get("InstanceNumber", 0) or 0)

    return sorted(sources, key=key)


def _world_of_pixels(ds: Any, frame: int, space: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where pixel (row r, column c) of ``frame`` (0-based) of ``ds`` lies in the coordinates of the
    map's affine: ``origin + r * down + c * right``, as MONAI's ``PydicomReader`` places it (patient
    coordinates in ``space`` from the plane geometry; pixel indices (frame, row, column) for files
    without top-level plane geometry, where that reader's affine is over indices)."""
    if _has_plane_geometry(ds) and number_of_frames(ds) > 1:  # MONAI stacks such a file as if all frames lay there
        raise DicomResultError(
            f"{_name(ds)}: a multi-frame image with top-level ImagePositionPatient: MONAI's reader places all its "
            "frames in one plane, so its map cannot be placed; give the map in frame order with affine=None"
        )
    if not _has_plane_geometry(ds):
        if number_of_frames(ds) > 1:
            return np.array([frame, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, 1.0])
        return np.zeros(3), np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    orientation = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
    row_spacing, column_spacing = (float(v) for v in ds.get("PixelSpacing", (1.0, 1.0)))
    origin = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
    right, down = orientation[:3] * column_spacing, orientation[3:] * row_spacing
    if space.upper() == "RAS":
        origin, right, down = _LPS_TO_RAS @ origin, _LPS_TO_RAS @ right, _LPS_TO_RAS @ down
    elif space.upper() != "LPS":
        raise ValueError(f"space must be 'RAS' or 'LPS' (MONAI's meta 'space'), got {space!r}")
    return origin, down, right


def _array_and_affine(anomaly_map: Any, affine: Any, space: str | None) -> tuple[np.ndarray, np.ndarray | None, str]:
    """A plain array, its affine (from a MetaTensor where not given) and space (default RAS)."""
    if affine is None and hasattr(anomaly_map, "affine") and hasattr(anomaly_map, "meta"):
        affine = anomaly_map.affine
    if space is None:
        space = str(getattr(anomaly_map, "meta", {}).get("space", "RAS"))
    if hasattr(anomaly_map, "detach"):  # torch (and MONAI's MetaTensor)
        anomaly_map = anomaly_map.detach().cpu().numpy()
    array = np.asarray(anomaly_map)
    if affine is not None:
        affine = np.asarray(affine.detach().cpu().numpy() if hasattr(affine, "detach") else affine, dtype=np.float64)
    return array, affine, space


def map_to_frames(
    sources: Sequence[Any], anomaly_map: Any, affine: Any = None, space: str | None = None
) -> tuple[np.ndarray, list[Any]]:
    """``anomaly_map`` on the DICOM sources' frames: ``(frames, rows, columns)`` and the sources in
    that frame order (a series sorted along its slice normal; a multi-frame image's frames in file
    order), what :func:`parametric_map` and :func:`segmentation` pass highdicom.

    ``anomaly_map``: a map on MONAI's grid of the input with its ``affine`` (4 x 4; taken from a
    MetaTensor where not given) in ``space`` (``"RAS"``, MONAI's default, or ``"LPS"``; from the
    MetaTensor's meta, else RAS): a volume's map from :class:`medad.io.outputs.MapToInputGridd` or
    ``Prediction.anomaly_map`` with ``Prediction.meta["affine"]`` (a one-slice input's 2D map
    included). Each source pixel is placed in those coordinates (:func:`_world_of_pixels`) and looked
    up on the map; a grid that does not hold every source pixel at a voxel centre (a resampled
    map, another series) is refused.

    Without an affine: a single-frame source takes a 2D map ``(rows, columns)`` (as
    ``Prediction.anomaly_map`` of a 2D image), a multi-frame source a map already in frame order
    ``(frames, rows, columns)``; a series needs the affine.
    """
    ordered = _checked_sources(sources)
    array, affine, space = _array_and_affine(anomaly_map, affine, space)
    rows, columns = int(ordered[0].Rows), int(ordered[0].Columns)
    frames = sum(number_of_frames(ds) for ds in ordered)
    name = _name(ordered[0]) if len(ordered) == 1 else f"the series {ordered[0].SeriesInstanceUID} ({_name(ordered[0])}, ...)"
    if array.ndim == 3 and array.shape[0] == 1 and affine is None:
        array = array[0]  # one channel first
    if affine is None:
        expected = (rows, columns) if frames == 1 else (frames, rows, columns)
        if len(ordered) > 1:
            raise DicomResultError(f"{name}: a series' map needs its affine (MONAI's grid of the series) to be placed")
        if array.shape != expected:
            raise DicomResultError(
                f"{name}: a map of shape {array.shape} without an affine, expected {expected} "
                f"({'rows, columns' if frames == 1 else 'frames, rows, columns'})"
            )
        return (array[None] if frames == 1 else array).copy(), ordered
    if affine.shape != (4, 4):
        raise DicomResultError(f"{name}: the map's affine must be 4 x 4 (MONAI's 3D affine), got {affine.shape}")
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]  # (1, H, W, D): channel first
    if array.ndim == 2:
        array = array[..., None]  # a one-slice input's map: the slice axis dropped
    if array.ndim != 3:
        raise DicomResultError(f"{name}: expected a 2D or 3D map, got shape {array.shape}")
    to_index = np.linalg.inv(affine)
    r, c = np.arange(rows, dtype=np.float64)[:, None], np.arange(columns, dtype=np.float64)[None, :]
    out = np.empty((frames, rows, columns), dtype=array.dtype)
    for k, (ds, frame) in enumerate((ds, f) for ds in ordered for f in range(number_of_frames(ds))):
        origin, down, right = _world_of_pixels(ds, frame, space)
        start = to_index[:3, :3] @ origin + to_index[:3, 3]
        step_down, step_right = to_index[:3, :3] @ down, to_index[:3, :3] @ right
        index = start[:, None, None] + step_down[:, None, None] * r + step_right[:, None, None] * c  # (3, rows, columns)
        rounded = np.rint(index)
        where = f"{_name(ds)}{f' frame {frame + 1}' if number_of_frames(ds) > 1 else ''}"
        if np.abs(index - rounded).max() > _INDEX_TOLERANCE:
            raise DicomResultError(
                f"{where}: its pixels do not fall on the map's voxel centres (off by up to "
                f"{np.abs(index - rounded).max():.3g} voxels): the map is not on MONAI's grid of these sources"
            )
        rounded = rounded.astype(np.int64)
        for axis in range(3):
            if rounded[axis].min() < 0 or rounded[axis].max() >= array.shape[axis]:
                raise DicomResultError(
                    f"{where}: its pixels fall outside the map (voxel axis {axis} index "
                    f"{rounded[axis].min()}..{rounded[axis].max()}, map shape {array.shape}): "
                    "the map is not on MONAI's grid of these sources"
                )
        out[k] = array[rounded[0], rounded[1], rounded[2]]
    return out, ordered


# --------------------------------------------------------------------------------------------
# algorithm and common attributes


def result_uids(sources: Sequence[Any], model_key: str, kind: str) -> dict[str, str]:
    """The series and SOP instance UIDs of the ``kind`` result object (``"parametric_map"``,
    ``"segmentation"``, ...) of ``sources`` by the model ``model_key`` (e.g. the SHA-256 of its
    ``model.pt``), the same on every run: a rerun writes objects with the same UIDs, which a
    PACS stores once (and replaces) instead of adding copies; another model or another source
    series gives other UIDs. UUID-derived UIDs (``2.25.<128-bit integer>``, ISO/IEC 9834-8) of a
    SHA-256 of those identities: they need no organisation root (pydicom's ``generate_uid``
    is deterministic only under one, and random without).

    Example:
        >>> import pydicom
        >>> source = pydicom.Dataset()
        >>> source.SeriesInstanceUID, source.SOPInstanceUID = "1.2.3", "1.2.3.4"
        >>> result_uids([source], "abc", "segmentation") == result_uids([source], "abc", "segmentation")
        True
        >>> result_uids([source], "abc", "segmentation") != result_uids([source], "abd", "segmentation")
        True
    """
    identity = [str(sources[0].SeriesInstanceUID), *sorted(str(ds.SOPInstanceUID) for ds in sources), str(model_key), kind]

    def uid(role: str) -> str:
        digest = hashlib.sha256("\n".join([*identity, role]).encode()).digest()
        return "2.25." + str(int.from_bytes(digest[:16], "big"))

    return {"series_instance_uid": uid("series"), "sop_instance_uid": uid("instance")}


def _derived_uid(common: Mapping[str, Any], role: str) -> str:
    """A UID for ``role`` inside an object (the SR's observer device, its tracking identifier),
    derived from the object's SOP instance UID: a rerun with :func:`result_uids` gives the same
    object, content included."""
    digest = hashlib.sha256(f"{common['sop_instance_uid']}\n{role}".encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def _model_fields(model: Any) -> dict[str, str]:
    """``method``, ``backbone`` and ``target`` of a :class:`medad.ModelDescription` or a mapping."""
    if model is None:
        return {}
    if isinstance(model, Mapping):
        fields = {key: model.get(key) for key in ("method", "backbone", "target")}
    else:
        fields = {key: getattr(model, key, None) for key in ("method", "backbone", "target")}
    backbone = fields.get("backbone")
    if backbone is not None and not isinstance(backbone, str):
        get = backbone.get if isinstance(backbone, Mapping) else lambda key, default=None: getattr(backbone, key, default)
        backbone = f"{get('model_name', backbone)} at {get('image_size', '?')} px" if get("model_name") else str(backbone)
    fields["backbone"] = backbone
    return {key: str(value) for key, value in fields.items() if value is not None}


def _version() -> str:
    from medad import __version__

    return str(__version__)


def _algorithm_name(model: Any) -> str:
    method = _model_fields(model).get("method", "mvfa")
    return f"medad {method}"


def _description_parameters(model: Any) -> dict[str, str]:
    return {**_model_fields(model), "intended use": RESEARCH_ONLY}


def _common(kwargs: Mapping[str, Any], default_series_number: int, what: str, model: Any) -> dict[str, Any]:
    hd = _hd()
    fields = _model_fields(model)
    target = f" ({fields['target']})" if "target" in fields else ""
    return {
        "series_instance_uid": kwargs.get("series_instance_uid") or hd.UID(),
        "series_number": int(kwargs.get("series_number") or default_series_number),
        "sop_instance_uid": kwargs.get("sop_instance_uid") or hd.UID(),
        "instance_number": int(kwargs.get("instance_number") or 1),
        "manufacturer": kwargs.get("manufacturer") or "medad",
        "series_description": kwargs.get("series_description")
        or f"medad {what}{target}: {RESEARCH_ONLY}"[:64],
    }


def _finish(
    dataset: Any,
    sources: Sequence[Any],
    common: Mapping[str, Any],
    laterality: bool = True,
    image: bool = True,
    scheme: bool = True,
) -> None:
    """What every object gets beyond highdicom's: the series description, the definition of
    :data:`CODING_SCHEME` where the object uses it (``scheme``); with ``laterality`` the series' ``Laterality`` (type 2C, as dciodvfy
    asks it of Parametric Maps and Secondary Captures) copied from the sources, empty where they
    have none; for ``image`` objects without a frame of reference the sources' ``PatientOrientation``
    (type 2C there), empty where they have none."""
    pydicom = import_pydicom()
    dataset.SeriesDescription = common["series_description"]
    if scheme:
        item = pydicom.Dataset()
        item.CodingSchemeDesignator = CODING_SCHEME
        item.CodingSchemeName = "medad anomaly detection concepts"
        item.CodingSchemeResponsibleOrganization = "medad"
        others = dataset.get("CodingSchemeIdentificationSequence", [])
        dataset.CodingSchemeIdentificationSequence = [
            *(other for other in others if other.get("CodingSchemeDesignator") != CODING_SCHEME), item
        ]
    if laterality and "Laterality" not in dataset:
        dataset.Laterality = sources[0].get("Laterality", None)
    if image and "FrameOfReferenceUID" not in dataset and "PatientOrientation" not in dataset:
        dataset.PatientOrientation = sources[0].get("PatientOrientation", None)


@contextmanager
def _highdicom_refusal(sources: Sequence[Any], what: str) -> Iterator[None]:
    """highdicom's refusals (and failures) while building ``what`` as a :class:`DicomResultError`
    naming the source. highdicom 0.28 cannot build a Parametric Map of an image without a frame of
    reference (secondary captures, most radiographs): its frames get a "Frame Label" dimension
    without index values, which its own reader then rejects."""
    try:
        yield
    except (ValueError, RuntimeError, TypeError, KeyError, AttributeError) as error:
        hint = ""
        if "FrameOfReferenceUID" not in sources[0]:
            hint = " (the source has no frame of reference, FrameOfReferenceUID)"
        version = getattr(_hd(), "__version__", "?")
        raise DicomResultError(
            f"{_name(sources[0])}: highdicom {version} cannot build {what} of this image{hint}: "
            f"{type(error).__name__}: {error}"
        ) from error


def _finite(array: np.ndarray, what: str) -> np.ndarray:
    if not np.isfinite(array).all():
        raise DicomResultError(f"the {what} has NaN or infinite values: a DICOM result cannot hold them")
    return array


# --------------------------------------------------------------------------------------------
# the objects


def parametric_map(
    sources: Sequence[Any],
    anomaly_map: Any,
    affine: Any = None,
    space: str | None = None,
    model: Any = None,
    **kwargs: Any,
) -> Any:
    """The anomaly map as a DICOM Parametric Map (``highdicom.pm.ParametricMap``): float32 pixel
    data, one frame per source frame (:func:`map_to_frames`), a real-world value mapping over the
    map's range in the unitless UCUM unit ``1`` (identity: stored value = anomaly score),
    ``ContentQualification`` ``RESEARCH``, ``ImageType`` ``DERIVED``.

    ``model``: a :class:`medad.ModelDescription` or a mapping with ``method``, ``backbone``,
    ``target``. ``kwargs``: ``series_instance_uid``, ``series_number`` (default 901),
    ``sop_instance_uid``, ``instance_number``, ``manufacturer``, ``series_description``.
    """
    hd = _hd()
    from pydicom.sr.codedict import codes

    frames, ordered = map_to_frames(sources, anomaly_map, affine, space)
    frames = _finite(frames.astype(np.float32), "anomaly map")
    low, high = float(frames.min()), float(frames.max())
    common = _common(kwargs, 901, "anomaly map", model)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="ANOMALY",
        lut_explanation="medad anomaly score",
        unit=codes.UCUM.NoUnits,
        value_range=(low, high),
        slope=1.0,
        intercept=0.0,
        quantity_definition=_code(ANOMALY_SCORE),
    )
    fields = _model_fields(model)
    with _highdicom_refusal(ordered, "a Parametric Map"):
        pm = hd.pm.ParametricMap(
            source_images=ordered,
            pixel_array=frames if len(frames) > 1 else frames[0],
            series_instance_uid=common["series_instance_uid"],
            series_number=common["series_number"],
            sop_instance_uid=common["sop_instance_uid"],
            instance_number=common["instance_number"],
            manufacturer=common["manufacturer"],
            manufacturer_model_name=_algorithm_name(model)[:64],
            software_versions=_version(),
            device_serial_number="none",
            contains_recognizable_visual_features=False,
            real_world_value_mappings=[mapping],
            voi_lut_transformations=[
                hd.VOILUTTransformation(
                    window_center=(low + high) / 2,
                    window_width=max(high - low, 1e-6),
                    window_explanation="anomaly map range",
                    voi_lut_function="LINEAR_EXACT",  # scores span less than 1: a LINEAR window must be >= 1 wide
                )
            ],
            content_label="ANOMALY",
            content_description=f"anomaly map of {fields.get('method', 'medad')}: {RESEARCH_ONLY}"[:64],
            content_qualification=hd.ContentQualificationValues.RESEARCH,
            derived_pixel_contrast="QUANTITY",
        )
    _finish(pm, ordered, common)
    return pm


def segmentation(
    sources: Sequence[Any],
    label: Any,
    affine: Any = None,
    space: str | None = None,
    model: Any = None,
    threshold: float | None = None,
    rule: str | None = None,
    category: Any = None,
    property_type: Any = None,
    **kwargs: Any,
) -> Any:
    """The thresholded region (``label``: nonzero = anomalous, on the same grid as the map; e.g.
    ``Prediction.label``) as a binary DICOM Segmentation (``highdicom.seg.Segmentation``) with
    empty frames omitted and one segment ``anomaly`` (property category and type: SNOMED CT
    "Morphologically abnormal structure" unless ``category`` / ``property_type`` are given),
    algorithm type AUTOMATIC with medad's algorithm identification (software version, the model's
    method, backbone and target, and the pixel ``threshold`` and its ``rule`` where given).

    A label without any anomalous pixel keeps one (empty) frame: DICOM requires at least one.
    ``kwargs`` as :func:`parametric_map` (default series number 902).
    """
    hd = _hd()
    from pydicom.sr.codedict import codes

    frames, ordered = map_to_frames(sources, label, affine, space)
    frames = _finite(frames.astype(np.float64), "label") != 0
    common = _common(kwargs, 902, "anomaly region", model)
    parameters = _description_parameters(model)
    if threshold is not None:
        parameters["pixel threshold"] = repr(float(threshold))
    if rule is not None:
        parameters["pixel threshold rule"] = str(rule)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=_algorithm_name(model)[:64],
        family=codes.cid7162.ArtificialIntelligence,
        version=_version(),
        source="medad",
        parameters={key: str(value)[:64] for key, value in parameters.items()},
    )
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="anomaly",
        segmented_property_category=category or codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=property_type or codes.SCT.MorphologicallyAbnormalStructure,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    omit = bool(frames.any())  # all empty: keep the frames (highdicom refuses a SEG without any)
    fields = _model_fields(model)
    with _highdicom_refusal(ordered, "a Segmentation"):
        seg = hd.seg.Segmentation(
            source_images=ordered,
            pixel_array=frames if len(frames) > 1 else frames[0],
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[description],
            series_instance_uid=common["series_instance_uid"],
            series_number=common["series_number"],
            sop_instance_uid=common["sop_instance_uid"],
            instance_number=common["instance_number"],
            manufacturer=common["manufacturer"],
            manufacturer_model_name=_algorithm_name(model)[:64],
            software_versions=_version(),
            device_serial_number="none",
            content_label="ANOMALY",
            content_description=f"anomaly region of {fields.get('method', 'medad')}: {RESEARCH_ONLY}"[:64],
            omit_empty_frames=omit,
        )
    _finish(seg, ordered, common, laterality=False, scheme=False)
    return seg


def _code(concept: tuple[str, str]) -> Any:
    return _hd().sr.CodedConcept(concept[0], CODING_SCHEME, concept[1])


def structured_report(
    sources: Sequence[Any],
    score: float,
    anomalous: bool,
    threshold: float,
    rule: str,
    model: Any = None,
    p_value: float | None = None,
    evidence: Sequence[Any] = (),
    **kwargs: Any,
) -> Any:
    """The image's (volume's) result as a TID 1500 measurement report in a Comprehensive 3D SR
    (``highdicom.sr.Comprehensive3DSR``): one measurement group (TID 1501) for the source series
    with the anomaly ``score`` (numeric, unit UCUM ``1``), the decision (qualitative evaluation
    "Anomaly decision": SNOMED CT Abnormal or Normal), the image ``threshold`` (numeric) and, in
    the group's algorithm identification (TID 4019, text parameters), its ``rule``, the model's
    method, backbone and target and ``intended use: research use only, not for clinical use``;
    ``p_value`` (conformal, where the model has one) as a further numeric measurement.

    ``evidence``: further objects of the study to list as evidence (e.g. the Parametric Map and
    Segmentation built here). The report is complete, not verified. ``kwargs`` as
    :func:`parametric_map` (default series number 903).
    """
    hd = _hd()
    from pydicom.sr.codedict import codes

    ordered = _checked_sources(sources)
    for value, what in ((score, "score"), (threshold, "threshold")):
        if not np.isfinite(float(value)):
            raise DicomResultError(f"the {what} {value!r} is not finite: a DICOM report cannot hold it")
    common = _common(kwargs, 903, "anomaly report", model)
    version = _version()
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=_derived_uid(common, "device"), name=_algorithm_name(model)[:64], manufacturer_name=common["manufacturer"],
        model_name=_algorithm_name(model)[:64],
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(observer_type=codes.DCM.Device, observer_identifying_attributes=device)
    )
    parameters = {**_description_parameters(model), "image threshold rule": str(rule)}
    algorithm = hd.sr.AlgorithmIdentification(
        name=_algorithm_name(model)[:64], version=version,
        parameters=[f"{key}: {value}" for key, value in parameters.items()],
    )
    measurements = [
        hd.sr.Measurement(name=_code(ANOMALY_SCORE), value=float(score), unit=codes.UCUM.NoUnits, algorithm_id=algorithm),
        hd.sr.Measurement(name=_code(ANOMALY_THRESHOLD), value=float(threshold), unit=codes.UCUM.NoUnits),
    ]
    if p_value is not None:
        measurements.append(
            hd.sr.Measurement(
                name=hd.sr.CodedConcept("ANOM_P_VALUE", CODING_SCHEME, "Conformal p-value of the anomaly score"),
                value=float(p_value), unit=codes.UCUM.NoUnits,
            )
        )
    decision = hd.sr.QualitativeEvaluation(
        name=_code(ANOMALY_DECISION), value=codes.SCT.Abnormal if anomalous else codes.SCT.Normal
    )
    if number_of_frames(ordered[0]) > 1:
        images = [hd.sr.SourceImageForMeasurementGroup.from_source_image(ordered[0], list(range(1, number_of_frames(ordered[0]) + 1)))]
    else:
        images = [hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in ordered]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=_derived_uid(common, "tracking"), identifier="medad anomaly detection"),
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=[decision],
        source_images=images,
    )
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=hd.sr.CodedConcept("363679005", "SCT", "Imaging"),
        imaging_measurements=[group],
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*ordered, *evidence],
        content=report,
        series_instance_uid=common["series_instance_uid"],
        series_number=common["series_number"],
        sop_instance_uid=common["sop_instance_uid"],
        instance_number=common["instance_number"],
        manufacturer=common["manufacturer"],
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    _finish(sr, ordered, common, laterality=False, image=False)
    sr.SoftwareVersions = version
    return sr


def _patient_orientation(ds: Any) -> tuple[str, str]:
    """``PatientOrientation`` of a picture laid out as ``ds``'s pixels: the source's own, else the
    letters of its row and column directions (``ImageOrientationPatient``), else ``("", "")``."""
    if "PatientOrientation" in ds and len(ds.PatientOrientation) == 2:
        return tuple(str(v) for v in ds.PatientOrientation)  # type: ignore[return-value]
    if "ImageOrientationPatient" not in ds:
        return ("", "")
    letters = (("L", "R"), ("P", "A"), ("H", "F"))
    orientation = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)

    def word(direction: np.ndarray) -> str:
        order = np.argsort(-np.abs(direction))
        return "".join(letters[k][0 if direction[k] > 0 else 1] for k in order if abs(direction[k]) > 1e-3)[:3]

    return word(orientation[:3]), word(orientation[3:])


def secondary_capture(
    sources: Sequence[Any],
    overlay_rgb: Any,
    model: Any = None,
    patient_orientation: tuple[str, str] | None = None,
    **kwargs: Any,
) -> Any:
    """An RGB overlay picture (``(rows, columns, 3)`` uint8, or floats in [0, 1]; a PIL image works)
    as a DICOM Secondary Capture (``highdicom.sc.SCImage``) of the sources' patient and study,
    ``ImageType`` ``DERIVED\\SECONDARY``, burned-in annotation YES (medad's overlays carry the score),
    the sources listed in ``SourceImageSequence``. ``patient_orientation``: the picture's row and
    column directions (default: the first source's, see :func:`_patient_orientation`).
    ``kwargs`` as :func:`parametric_map` (default series number 904).
    """
    hd = _hd()
    pydicom = import_pydicom()
    ordered = _checked_sources(sources)
    picture = np.asarray(overlay_rgb)
    if picture.ndim != 3 or picture.shape[-1] != 3:
        raise DicomResultError(f"the overlay must be an RGB picture (rows, columns, 3), got shape {picture.shape}")
    if picture.dtype != np.uint8:
        picture = (np.clip(_finite(picture.astype(np.float64), "overlay"), 0, 1) * 255).round().astype(np.uint8)
    common = _common(kwargs, 904, "anomaly overlay", model)
    orientation = tuple(patient_orientation or _patient_orientation(ordered[0]))
    # highdicom accepts one letter per direction only; DICOM also allows an oblique direction's
    # letters ("LP") and, PatientOrientation being type 2, an empty value where it is unknown (a
    # radiograph without it): such values are built with a placeholder and then set as they are
    single_letters = all(value in ("A", "P", "R", "L", "H", "F") for value in orientation)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ordered[0],
        pixel_array=picture,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=common["series_instance_uid"],
        series_number=common["series_number"],
        sop_instance_uid=common["sop_instance_uid"],
        instance_number=common["instance_number"],
        manufacturer=common["manufacturer"],
        patient_orientation=orientation if single_letters else ("L", "P"),
    )
    if not single_letters:
        sc.PatientOrientation = list(orientation) if any(orientation) else ""
    _finish(sc, ordered, common, scheme=False)
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    sc.SoftwareVersions = _version()
    sc.ImageComments = f"medad anomaly overlay ({_algorithm_name(model)}): {RESEARCH_ONLY}"
    references = []
    for ds in ordered:
        item = pydicom.Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        references.append(item)
    sc.SourceImageSequence = references
    return sc


def write_dataset(dataset: Any, path: str | os.PathLike) -> Path:
    """Write a DICOM data set (any object built here) to ``path`` as a DICOM file (with its file
    meta information), atomically: to a temporary name beside it, renamed when complete
    (:func:`medad.io.files.atomic_write`). A failure leaves no file and names ``path``."""
    path = Path(path)
    try:
        with atomic_write(path, "wb") as handle:
            if int(import_pydicom().__version__.split(".")[0]) >= 3:
                dataset.save_as(handle, enforce_file_format=True)
            else:
                dataset.save_as(handle, write_like_original=False)
    except OSError as error:
        raise OSError(error.errno or errno.EIO, f"{path}: cannot write the DICOM file ({error.strerror or error})") from error
    except Exception as error:  # pydicom raises several types for data sets it cannot encode
        raise DicomResultError(f"{path}: cannot write the DICOM file ({type(error).__name__}: {error})") from error
    return path


# --------------------------------------------------------------------------------------------
# one case's results: what the bundle and Python write


def places_a_map(sources: Sequence[Any]) -> bool:
    """Whether a Parametric Map of ``sources`` can be built: each has a frame of reference and
    plane geometry (top-level ``ImagePositionPatient``, or a multi-frame image's functional
    groups). highdicom (0.28) builds none for images without (secondary captures, radiographs)."""
    return all(
        "FrameOfReferenceUID" in ds and (number_of_frames(ds) > 1 or "ImagePositionPatient" in ds)
        for ds in sources
    )


def result_objects(
    sources: Sequence[Any],
    anomaly_map: Any,
    affine: Any,
    *,
    score: float,
    anomalous: bool,
    threshold: float,
    rule: str,
    pixel_threshold: float,
    pixel_rule: str | None,
    model: Any,
    model_key: str,
    p_value: float | None = None,
    space: str | None = None,
) -> dict[str, Any]:
    """One case's DICOM results, by kind (:data:`RESULT_FILES`' keys): the map as a Parametric Map
    (where :func:`places_a_map`; logged otherwise), the region ``anomaly_map >= pixel_threshold``
    as a Segmentation (with the threshold and its ``pixel_rule``), and the ``score``, decision
    ``anomalous`` at the image ``threshold`` and its ``rule`` (and ``p_value`` where given) as a
    TID 1500 SR listing the other two as evidence; each with :func:`result_uids` of the sources
    and ``model_key``, so that a rerun gives the same UIDs. What :func:`write_results` writes and
    the PACS round trip (:mod:`medad.surfaces.pacs`) stores.

    ``anomaly_map`` and ``affine`` as :func:`map_to_frames` takes them (a volume's map with its
    affine; a 2D image's ``(rows, columns)`` map with ``affine=None``).
    """
    array, affine, space = _array_and_affine(anomaly_map, affine, space)
    objects: dict[str, Any] = {}
    if places_a_map(_checked_sources(sources)):
        objects["parametric_map"] = parametric_map(
            sources, array, affine, space, model=model, **result_uids(sources, model_key, "parametric_map")
        )
    else:
        logger.warning("%s: no Parametric Map (no frame of reference or plane geometry to place it)", _name(sources[0]))
    label = (array >= float(pixel_threshold)).astype(np.uint8)
    objects["segmentation"] = segmentation(
        sources, label, affine, space, model=model, threshold=pixel_threshold, rule=pixel_rule,
        **result_uids(sources, model_key, "segmentation"),
    )
    objects["report"] = structured_report(
        sources, score, anomalous, threshold, rule, model=model, p_value=p_value, evidence=list(objects.values()),
        **result_uids(sources, model_key, "report"),
    )
    return objects


def write_results(folder: str | os.PathLike, sources: Sequence[Any], anomaly_map: Any, affine: Any, **decision: Any) -> dict[str, Path]:
    """Write one case's :func:`result_objects` (``decision``: its keyword arguments) into
    ``folder`` as :data:`RESULT_FILES`, each file atomically (:func:`write_dataset`); returns the
    paths written, by kind. What the bundle's :class:`SaveDicomResultsd` and
    :func:`medad.surfaces.predict.dicom_results` both call."""
    objects = result_objects(sources, anomaly_map, affine, **decision)
    return {kind: write_dataset(dataset, Path(folder) / RESULT_FILES[kind]) for kind, dataset in objects.items()}


class SaveDicomResultsd(MapTransform):
    """The bundle inference's DICOM results (``output_format`` ``dicom`` or ``both``; ``nifti``
    writes nothing): for each case, after :class:`medad.io.outputs.MapToInputGridd` (the map
    on MONAI's grid of the input, with its affine), :func:`write_results` into
    ``<output_dir>/<case>/`` (``case``: :func:`medad.io.files.output_stem` of the input, the DICOM
    file or series folder in the image's ``filename_or_obj``).

    ``secondary_capture``: also store the case's overlay picture, the PNG
    :class:`medad.io.outputs.SaveOverlayd` wrote into ``overlay_dir`` earlier in the same
    postprocessing, as a Secondary Capture (:func:`secondary_capture`, ``overlay.dcm``, with
    :func:`result_uids` kind ``"secondary_capture"``). A 2D image's overlay is laid out as the
    image, and takes its orientation; a volume's strip of slices is shown as radiologists do
    (:class:`~medad.io.outputs.SaveOverlayd`) in ``slice_plane``, which gives its
    ``PatientOrientation`` (axial: ``L\\P``, coronal: ``L\\F``, sagittal: ``P\\F``).

    Decisions as :class:`medad.engine.handlers.ScoresWriter` takes them, read from ``detector``
    when the first case comes (the configs resolve before the model may exist):
    ``threshold="model"`` the model's effective image threshold and rule, a number as given
    (rule :data:`medad.model.decision.GIVEN_RULE`); the model's effective pixel threshold and
    rule; the conformal p-value where the model has reference scores; the model's description
    (:attr:`medad.MVFADetector.description`); UIDs keyed by the SHA-256 of ``model_path``
    (computed once).
    """

    def __init__(
        self,
        keys: Any,
        output_dir: str | os.PathLike,
        detector: Any,
        model_path: str | os.PathLike,
        output_format: str = "nifti",
        threshold: float | str = "model",
        image_key: str = "image",
        score_key: str = "score",
        secondary_capture: bool = False,
        overlay_dir: str | os.PathLike | None = None,
        slice_plane: str = "axial",
    ) -> None:
        super().__init__(keys)
        if output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output_format must be one of {list(OUTPUT_FORMATS)}, got {output_format!r}")
        if secondary_capture not in (False, True):
            raise ValueError(f"secondary_capture (the bundle's dicom_overlay) must be true or false, got {secondary_capture!r}")
        if secondary_capture and output_format not in ("dicom", "both"):
            raise ValueError(f"secondary_capture (the bundle's dicom_overlay) stores the overlay with the DICOM results: it needs "
                             f"output_format dicom or both (DICOM inputs), got {output_format!r}")
        if secondary_capture and overlay_dir is None:
            raise ValueError("secondary_capture needs overlay_dir: the folder of the overlays SaveOverlayd writes")
        if slice_plane not in SLICE_PLANES:
            raise ValueError(f"unknown slice_plane {slice_plane!r}; expected one of {sorted(SLICE_PLANES)}")
        self.secondary_capture = bool(secondary_capture)
        self.overlay_dir = None if overlay_dir is None else Path(overlay_dir)
        # the volume strip's panels: the plane's first two axis codes flipped (SaveOverlayd._strip)
        self.strip_orientation = tuple(_OPPOSITE[code] for code in SLICE_PLANES[slice_plane][:2])
        self.output_dir, self.detector, self.model_path = Path(output_dir), detector, model_path
        self.enabled = output_format in ("dicom", "both")
        self.threshold, self.image_key, self.score_key = checked_threshold_setting(threshold), image_key, score_key
        self._model: dict[str, Any] | None = None

    def _decisions(self) -> dict[str, Any]:
        """The model's key, description and thresholds, once (when the first case comes)."""
        if self._model is None:
            from medad.model.decision import GIVEN_RULE
            from medad.model.detector import unwrap

            detector = unwrap(self.detector)
            effective = detector.effective_thresholds()
            given = self.threshold not in ("model", None)  # None (no decision elsewhere): the model's here
            self._model = {
                "model": detector.description,
                "model_key": content_sha256(self.model_path),
                "threshold": float(self.threshold) if given else float(effective.image),
                "rule": GIVEN_RULE if given else effective.image_rule,
                "pixel_threshold": float(effective.pixel),
                "pixel_rule": effective.pixel_rule,
                "reference_scores": effective.reference_scores,
            }
        return self._model

    def __call__(self, data: Mapping[Any, Any]) -> dict:
        d = dict(data)
        if not self.enabled:
            return d
        from medad.io.transforms import image_source
        from medad.model.decision import conformal_p_values

        model = self._decisions()
        source = image_source(d[self.image_key])
        score = float(np.asarray(_plain(d[self.score_key])).reshape(-1)[0])
        p_value = float(conformal_p_values([score], model["reference_scores"])[0]) if model["reference_scores"] else None
        sources, folder, two_d = read_sources(source), self.output_dir / output_stem(source), False
        for key in self.key_iterator(d):
            anomaly_map = d[key]
            values, affine, space = _array_and_affine(anomaly_map, None, None)
            two_d = values.ndim == 3 and values.shape[0] == 1 and d[key].dim() == 3
            if two_d:
                values, affine = values[0].T, None  # a 2D image's map (1, columns, rows): (rows, columns)
            write_results(
                folder, sources, values, affine, space=space,
                score=score, anomalous=score >= model["threshold"], threshold=model["threshold"], rule=model["rule"],
                pixel_threshold=model["pixel_threshold"], pixel_rule=model["pixel_rule"], model=model["model"],
                model_key=model["model_key"], p_value=p_value,
            )
        if self.secondary_capture:
            self._write_overlay(folder, sources, source, None if two_d else self.strip_orientation)
        return d

    def _write_overlay(self, folder: Path, sources: Sequence[Any], source: str, orientation: tuple[str, str] | None) -> None:
        """The case's PNG overlay as ``folder/overlay.dcm`` (``orientation``: ``None``, the sources')."""
        path = self.overlay_dir / f"{output_stem(source)}_overlay.png"  # SaveOverlayd's file name
        if not path.is_file():
            raise DicomResultError(f"{path}: no overlay to store as a Secondary Capture (SaveOverlayd writes it first)")
        with Image.open(path) as picture:
            rgb = np.asarray(picture.convert("RGB"))
        model = self._decisions()
        sc = secondary_capture(
            sources, rgb, model=model["model"], patient_orientation=orientation,
            **result_uids(sources, model["model_key"], "secondary_capture"),
        )
        write_dataset(sc, folder / OVERLAY_FILE)


def _plain(value: Any) -> Any:
    return value.detach().cpu().numpy() if hasattr(value, "detach") else value
