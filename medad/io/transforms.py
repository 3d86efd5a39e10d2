"""MONAI dictionary transforms that read and prepare images and masks for MVFA (the input side;
what is written from the model's maps is :mod:`medad.io.outputs`).

MVFA's input is RGB in [0, 1] at 240 x 240 (bicubic; masks nearest), without CLIP's mean/std
normalisation. The pipeline is MONAI's (``LoadImaged``, ``EnsureChannelFirstd``, ``Resized``,
``Orientationd``, ...); the few transforms here fill gaps MONAI does not cover, each said where
it is defined.

Intensity policy (:class:`UnitIntensityd`): 8-bit data is divided by 255 (as MVFA); any other
data (16-bit PNG/TIFF, CT, MR, float) is windowed per image, or per volume, between its 0.5th
and 99.5th percentiles; a CT window (a preset of :data:`CT_WINDOWS` or ``[center, width]`` in
HU) replaces that for CT. Volumes keep their voxel grid here; :mod:`medad.engine.volumes` cuts them into
slices and resizes those to the model's size batch by batch.

DICOM (:func:`read_dicom_image`, :class:`DicomVolumeReader`): a single-frame colour DICOM
(``SamplesPerPixel`` 3: RGB, YBR_FULL, YBR_FULL_422, ...; or PALETTE COLOR) is a 2D colour
image, read as 8-bit RGB as PNG colour images are; multi-frame colour DICOM and series of
colour images are refused. MONOCHROME1 pixel data (the lowest value displayed white) is
inverted to MONOCHROME2 over the value range of the file's bit depth
(:func:`monochrome1_to_monochrome2`), so that the same picture stored either way scores the same.

Size limits (:func:`size_problem`): no side over :data:`MAX_SIDE` (the anomaly map's NIfTI
header stores each dimension as a 16-bit integer), no 2D image over :data:`MAX_IMAGE_PIXELS`;
readers refuse such files before decoding them. Images much larger than the model's input are
first shrunk by block averaging (:func:`shrink_for_resize`), which bounds the memory and time of
the anti-aliased resize.
"""

from __future__ import annotations

import math
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import ImageReader, MetaTensor, PILReader, PydicomReader
from monai.data.utils import to_affine_nd
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    InvertibleTransform,
    LoadImaged,
    MapTransform,
    Orientation,
    Resized,
    ScaleIntensityRanged,
    Transposed,
)
from monai.utils import MetaKeys, SpaceKeys, TraceKeys, convert_to_dst_type, ensure_tuple
from PIL import Image

__all__ = [
    "CT_WINDOWS",
    "MAX_IMAGE_PIXELS",
    "MAX_SIDE",
    "SLICE_PLANES",
    "BinarizeMaskd",
    "DicomImageReader",
    "DicomVolumeReader",
    "EnsureSliceAxisd",
    "FillMissingMaskd",
    "LoadInputd",
    "ShrinkResized",
    "SliceOrientationd",
    "ToRGBd",
    "UnsupportedInputError",
    "UnitIntensityd",
    "image_source",
    "input_slice_indices",
    "is_colour_dicom_image",
    "is_dicom_file",
    "monochrome1_to_monochrome2",
    "mvfa_preprocessing",
    "normalise_pil_mode",
    "plain_tensor",
    "read_dicom_image",
    "shrink_for_resize",
    "size_problem",
    "to_rgb",
    "window_range",
]

#: CT display windows ``(center, width)`` in Hounsfield units (the usual radiology presets).
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "abdomen": (50.0, 400.0),
    "liver": (30.0, 150.0),
    "mediastinum": (50.0, 350.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
}

#: Orientation (MONAI/nibabel axis codes) a volume is brought to before it is cut into slices:
#: the slices of each plane lie along the last axis, and every axis points to R, A or S.
SLICE_PLANES: dict[str, str] = {"axial": "RAS", "coronal": "RSA", "sagittal": "ASR"}

# PIL modes whose pixel values are not intensities (palette indices, alpha, CMYK, 1-bit).
_CONVERT_TO_RGB = {"P", "PA", "RGBA", "LA", "CMYK", "YCbCr", "LAB", "HSV", "1", "RGBX", "RGBa", "La"}


def plain_tensor(data: Any, device: torch.device | str | None = None, non_blocking: bool = False) -> torch.Tensor:
    """``data`` as a plain ``torch.Tensor`` (on ``device`` if given): a MONAI ``MetaTensor``
    without its meta data (its public ``as_tensor()``, a view, no copy), a tensor itself, anything
    else through ``torch.as_tensor``. Where medad strips meta data (model inputs: MetaTensors only
    slow the network down), it does so here."""
    tensor = data.as_tensor() if isinstance(data, MetaTensor) else torch.as_tensor(data)
    return tensor if device is None else tensor.to(device, non_blocking=non_blocking)


def normalise_pil_mode(image: Image.Image) -> Image.Image:
    """PIL ``converter`` for MONAI's ``PILReader``: palette, alpha and other non-intensity modes
    become RGB, while grayscale, RGB and 16-bit images keep their values and bit depth."""
    return image.convert("RGB") if image.mode in _CONVERT_TO_RGB else image


# ----------------------------------------------------------------------------- reading files

#: The largest side (rows, columns or slices) of an input medad scores: the anomaly map is
#: written as NIfTI-1, whose header stores each dimension as a 16-bit signed integer.
MAX_SIDE = 32767
#: The most pixels of a 2D image medad reads: 2**26 (67,108,864, e.g. 8192 x 8192). Inference
#: holds a few float32 copies of the image at its own size (intensities, the overlay, the map
#: resampled back to the image's grid), about 60 bytes per pixel, 4 GB at this limit.
#: Larger images are refused before they are decoded: downsample them (the model sees
#: 240 x 240 pixels).
MAX_IMAGE_PIXELS = 2**26
#: Downscale factor from which :func:`shrink_for_resize` first averages blocks of pixels.
SHRINK_FACTOR = 8

# DICOM Photometric Interpretations of colour pixel data (SamplesPerPixel 3, or a palette).
_DICOM_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "PALETTE COLOR")


class UnsupportedInputError(ValueError):
    """A file medad can read but does not score as it is (too large, multi-frame or colour DICOM
    where a volume is expected); the message says why and what to do."""


def size_problem(shape: Sequence[int], image: bool = True) -> str | None:
    """Why an input of ``shape`` (rows, columns[, slices]) cannot be scored, or ``None``: a side
    over :data:`MAX_SIDE`, or, for a 2D ``image``, more than :data:`MAX_IMAGE_PIXELS` pixels."""
    size = " x ".join(str(int(n)) for n in shape)
    if any(int(n) > MAX_SIDE for n in shape):
        return (
            f"size {size} has a side over {MAX_SIDE} pixels, the most an anomaly map (NIfTI, 16-bit dimensions) "
            "can hold: crop or downsample it"
        )
    if image and math.prod(int(n) for n in shape[:2]) > MAX_IMAGE_PIXELS:
        return (
            f"size {size} is {math.prod(int(n) for n in shape[:2]):,} pixels, over medad's limit of "
            f"{MAX_IMAGE_PIXELS:,} (medad.io.transforms.MAX_IMAGE_PIXELS, 8192 x 8192): downsample it"
        )
    return None


def _checked_pil_mode(image: Image.Image) -> Image.Image:
    """PIL ``converter`` of the 2D pipeline: :func:`size_problem` refuses too large images before
    they are decoded, then :func:`normalise_pil_mode`."""
    problem = size_problem((image.height, image.width))
    if problem is not None:
        raise UnsupportedInputError(problem)
    return normalise_pil_mode(image)


def is_dicom_file(path: str | os.PathLike) -> bool:
    """``.dcm`` files, and files of any name with DICOM's 128-byte preamble and ``DICM`` prefix."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.name.lower().endswith(".dcm"):
        return True
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def import_pydicom() -> Any:
    """pydicom, imported where DICOM is read (medad reads DICOM only when given DICOM)."""
    try:
        import pydicom
    except ImportError as error:
        raise ImportError("reading DICOM needs pydicom: pip install pydicom") from error
    return pydicom


def _photometric(ds: Any) -> str:
    return str(ds.get("PhotometricInterpretation", "")).strip().upper()


def number_of_frames(ds: Any) -> int:
    """A DICOM data set's frames (``NumberOfFrames``, 1 where absent or empty)."""
    return int(ds.get("NumberOfFrames", 1) or 1)


def _is_colour(ds: Any) -> bool:
    return int(ds.get("SamplesPerPixel", 1) or 1) > 1 or _photometric(ds) in _DICOM_COLOUR


def is_colour_dicom_image(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a single-frame colour DICOM file (read as a 2D colour image, not a
    volume; headers only). Unreadable files are not: the volume checks report them."""
    if not is_dicom_file(path):
        return False
    try:
        header = import_pydicom().dcmread(
            path, stop_before_pixels=True,
            specific_tags=["SamplesPerPixel", "PhotometricInterpretation", "NumberOfFrames"],
        )
    except Exception:  # pydicom raises several types for broken files
        return False
    return _is_colour(header) and number_of_frames(header) == 1


def _rescale(ds: Any) -> tuple[float, float]:
    """``(RescaleSlope, RescaleIntercept)`` of a DICOM data set, 1 and 0 where absent or empty."""
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    return (float(slope) if slope not in (None, "") else 1.0, float(intercept) if intercept not in (None, "") else 0.0)


def monochrome1_to_monochrome2(data: np.ndarray, ds: Any, rescaled: bool) -> np.ndarray:
    """MONOCHROME1 pixel data (the lowest value displayed white) as MONOCHROME2: ``lo + hi - v``.

    ``[lo, hi]`` is the range of stored values the file's bit depth allows (``BitsStored``,
    ``PixelRepresentation``: 0 to 4095 for unsigned 12-bit), mapped through ``RescaleSlope`` and
    ``RescaleIntercept`` where ``rescaled`` (``data`` holds modality values). This is the DICOM
    definition of the two interpretations and does not depend on the values a file happens to
    hold, so a MONOCHROME1 file and its MONOCHROME2 counterpart (``hi - v`` stored) read alike,
    an 8-bit one keeps 8-bit scaling (divided by 255), and the slices of a series are inverted
    alike. Float pixel data (no bit depth) is inverted over its own minimum and maximum."""
    bits = ds.get("BitsStored")
    if bits is None or np.issubdtype(data.dtype, np.floating) and not rescaled:
        finite = data[np.isfinite(data)] if np.issubdtype(data.dtype, np.floating) else data
        if finite.size == 0:
            return data
        return (finite.min() + finite.max()) - data
    bits = int(bits)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if int(ds.get("PixelRepresentation", 0) or 0) else (0, 2**bits - 1)
    if rescaled:
        slope, intercept = _rescale(ds)
        return (np.float32((lo + hi) * slope + 2 * intercept) - data).astype(data.dtype, copy=False)
    inverted = (lo + hi) - np.clip(data.astype(np.int64), lo, hi)
    return inverted.astype(data.dtype)


def _rgb8(ds: Any, pixels: np.ndarray) -> np.ndarray:
    """Colour pixel data ``(rows, columns, 3)`` (or palette indices) as 8-bit RGB."""
    pydicom = import_pydicom()
    photometric = _photometric(ds)
    if photometric == "PALETTE COLOR":
        try:
            from pydicom.pixels import apply_color_lut
        except ImportError:  # pydicom < 3
            from pydicom.pixel_data_handlers.util import apply_color_lut
        pixels = apply_color_lut(pixels, ds)
        bits = 8 if pixels.dtype == np.uint8 else 16
    else:
        compressed = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        compressed = bool(getattr(compressed, "is_compressed", False))
        if photometric.startswith("YBR_FULL") and int(pydicom.__version__.split(".")[0]) < 3 and not compressed:
            # pydicom 3 returns RGB; pydicom 2 returns uncompressed YBR data as stored
            from pydicom.pixel_data_handlers.util import convert_color_space

            pixels = convert_color_space(pixels, photometric, "RGB")
        bits = int(ds.get("BitsStored", 8) or 8)
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ValueError(f"colour DICOM ({photometric}) with pixel data of shape {pixels.shape}, expected (rows, columns, 3)")
    if pixels.dtype == np.uint8:
        return pixels
    scale = 255.0 / (2**bits - 1)
    return np.clip(np.rint(pixels.astype(np.float32) * scale), 0, 255).astype(np.uint8)


def read_dicom_image(path: str | os.PathLike) -> np.ndarray:
    """The pixels of a single-frame DICOM file as a 2D image: ``(rows, columns, 3)`` 8-bit RGB for
    colour (RGB, YBR_* converted to RGB, PALETTE COLOR through its palette; more than 8 bits per
    sample scaled to 8), ``(rows, columns)`` for gray (modality values, MONOCHROME1 inverted).

    Raises ``ValueError`` for multi-frame files and sizes over the limits (:func:`size_problem`,
    checked before the pixel data is decoded), and for files pydicom cannot read or decode."""
    pydicom = import_pydicom()
    try:
        ds = pydicom.dcmread(path)
    except Exception as error:  # pydicom raises several types for broken files
        raise ValueError(f"unreadable DICOM ({type(error).__name__}: {error})") from error
    frames, colour = number_of_frames(ds), _is_colour(ds)
    if frames > 1:
        kind = f"colour ({_photometric(ds)})" if colour else "gray"
        raise UnsupportedInputError(
            f"a multi-frame {kind} DICOM ({frames} frames): medad reads a DICOM file as a 2D image only when it has "
            "one frame; export the frame to score as a single-frame DICOM or PNG"
        )
    problem = size_problem((int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)))
    if problem is not None:
        raise UnsupportedInputError(problem)
    try:
        pixels = ds.pixel_array
    except Exception as error:  # missing, truncated or undecodable pixel data
        raise ValueError(f"unreadable DICOM pixel data ({type(error).__name__}: {error})") from error
    if colour:
        return _rgb8(ds, pixels)
    rescaled = "RescaleSlope" in ds or "RescaleIntercept" in ds  # as MONAI's PydicomReader rescales
    if rescaled:
        slope, intercept = _rescale(ds)
        pixels = pixels.astype(np.float32) * slope + intercept
    if _photometric(ds) == "MONOCHROME1":
        pixels = monochrome1_to_monochrome2(pixels, ds, rescaled)
    return pixels


class DicomImageReader(ImageReader):
    """MONAI reader of single-frame DICOM files as 2D images (:func:`read_dicom_image`), laid out
    as MONAI's readers lay out images (``PILReader`` PNG files, ``PydicomReader`` DICOM frames):
    ``(columns, rows)`` or ``(columns, rows, 3)`` with the channel last. MONAI's
    ``PydicomReader`` reads a colour frame as a volume of 3 slices."""

    def verify_suffix(self, filename: Sequence[str | os.PathLike] | str | os.PathLike) -> bool:
        return all(is_dicom_file(name) for name in ensure_tuple(filename))

    def read(self, data: Sequence[str | os.PathLike] | str | os.PathLike, **kwargs: Any) -> np.ndarray:
        names = ensure_tuple(data)
        if len(names) != 1:
            raise ValueError(f"DicomImageReader reads one file at a time, got {len(names)}")
        return read_dicom_image(names[0])

    def get_data(self, img: np.ndarray) -> tuple[np.ndarray, dict]:
        data = np.swapaxes(img, 0, 1)  # (rows, columns) to MONAI's (columns, rows)
        meta = {"spatial_shape": np.asarray(data.shape[:2]), "original_channel_dim": -1 if img.ndim == 3 else float("nan")}
        return data, meta


class DicomVolumeReader(PydicomReader):
    """MONAI's ``PydicomReader`` (DICOM files and series folders as volumes) with MONOCHROME1
    pixel data inverted to MONOCHROME2 (:func:`monochrome1_to_monochrome2`), sides checked
    (:func:`size_problem`), and colour pixel data refused: a single-frame colour DICOM is a 2D
    image (:class:`DicomImageReader`), and several colour frames are no volume medad scores."""

    def _get_array_data(self, img: Any, filename: Any) -> np.ndarray:
        if _is_colour(img):
            raise UnsupportedInputError(
                f"colour DICOM ({_photometric(img)}, {number_of_frames(img)} frame(s)) in a volume: medad reads a colour "
                "DICOM as a 2D colour image only when it is a single-frame file on its own; export each frame to "
                "score as a single-frame DICOM or PNG"
            )
        shape = (int(img.get("Rows", 0) or 0), int(img.get("Columns", 0) or 0), number_of_frames(img))
        problem = size_problem(shape, image=False)
        if problem is not None:
            raise UnsupportedInputError(problem)
        # private: MONAI's per-file step (PydicomReader._get_array_data); its public get_data returns
        # the stacked series, where each file's own tags (photometric interpretation, bit depth,
        # rescale) that the checks and MONOCHROME1's inversion read are no longer at hand
        data = super()._get_array_data(img, filename)
        if _photometric(img) == "MONOCHROME1":
            data = monochrome1_to_monochrome2(data, img, rescaled=hasattr(img, "RescaleSlope") or hasattr(img, "RescaleIntercept"))
        return data

    def get_data(self, data: Any) -> tuple[np.ndarray, dict]:
        """MONAI's ``get_data``, with the slice axis of a single slice's affine completed
        (:func:`_single_slice_affine`)."""
        array, meta = super().get_data(data)
        first = data
        while isinstance(first, (list, tuple)) and first:  # a series (folder): its slices
            first = first[0]
        if len(meta.get(MetaKeys.SPATIAL_SHAPE, ())) == 2 and not isinstance(first, (list, tuple)):
            affine = np.asarray(meta[MetaKeys.AFFINE], dtype=np.float64)
            affine = _single_slice_affine(first, affine, meta.get(MetaKeys.SPACE))
            if affine is not None:
                meta[MetaKeys.AFFINE], meta[MetaKeys.ORIGINAL_AFFINE] = affine, affine.copy()
        return array, meta


def _single_slice_affine(ds: Any, affine: np.ndarray, space: Any = None) -> np.ndarray | None:
    """The affine MONAI's ``PydicomReader`` gives a single slice (a one-file series, a single-frame
    file), with its third (slice) column set to the slice normal (row x column direction of
    ``ImageOrientationPatient``, as a series' slices are stacked) times ``SliceThickness`` (else
    ``SpacingBetweenSlices``, else 1 mm), read from the slice's data set ``ds``; ``affine`` in
    ``space`` (MONAI's RAS unless ``"LPS"``); ``None`` without ``ImageOrientationPatient``.

    MONAI builds that column only from the first and last ``ImagePositionPatient`` of a stacked
    series; a single slice keeps its placeholder, a unit vector along the patient's z axis
    whatever the orientation. For an axial slice that is the normal (at 1 mm); for a sagittal or
    coronal one it lies in the image plane, parallel to the column direction, so the affine is
    singular and ``Orientationd`` cannot place the slice axis ("Unable to find out axis ... in
    start_ornt"); for an oblique one it is tilted out of the normal."""
    orientation = ds.get("ImageOrientationPatient")
    if orientation is None or len(orientation) != 6:
        return None
    row, column = np.asarray(orientation[:3], dtype=np.float64), np.asarray(orientation[3:], dtype=np.float64)
    normal = np.cross(row, column)
    if not np.isfinite(normal).all() or np.linalg.norm(normal) < 1e-6:
        return None  # MONAI's own checks report broken orientations
    spacing = 1.0
    for keyword in ("SliceThickness", "SpacingBetweenSlices"):
        value = ds.get(keyword)
        if value not in (None, "") and np.isfinite(float(value)) and abs(float(value)) > 0:
            spacing = abs(float(value))
            break
    column_vector = normal / np.linalg.norm(normal) * spacing  # LPS, as ImageOrientationPatient
    if str(space or SpaceKeys.RAS) == str(SpaceKeys.RAS):
        column_vector = column_vector * np.array([-1.0, -1.0, 1.0])
    completed = affine.copy()
    completed[:3, 2] = column_vector  # swap_ij swaps the in-plane columns only
    return completed


def shrink_for_resize(image: torch.Tensor, size: Sequence[int]) -> tuple[torch.Tensor, list[float] | None]:
    """``image`` ``(C, H, W)`` shrunk for an anti-aliased resize to ``size``, and the Gaussian
    sigma (in the shrunk image's pixels) the resize should then smooth with.

    Each side more than :data:`SHRINK_FACTOR` times its target is first averaged over blocks of
    ``k = factor // 4`` pixels (``ceil(H / k)`` rows; the last block of a side averages the
    pixels it has), as float32; the sigma is chosen so that block mean and Gaussian together
    smooth as much (same variance) as MONAI's Gaussian of sigma ``(factor - 1) / 2`` at the full
    size does. Other images are returned as they are, with sigma ``None`` (MONAI's default).

    MONAI's anti-aliased ``Resize`` smooths at the input's size: for a 5000 x 5000 image shrunk to
    240 x 240 a 169-tap filter, about a minute and 4 GB. Images less than 8 times the target
    size (all of MVFA's data) are resized exactly as before."""
    spatial = [int(n) for n in image.shape[1:]]
    factors = [n / s for n, s in zip(spatial, size)]
    blocks = [max(1, int(f) // 4) if f > SHRINK_FACTOR else 1 for f in factors]
    if all(k == 1 for k in blocks):
        return image, None
    pixels = torch.as_tensor(image).to(torch.float32)
    pool = torch.nn.functional.avg_pool2d if len(spatial) == 2 else torch.nn.functional.avg_pool3d
    shrunk = pool(pixels[None], kernel_size=blocks, stride=blocks, ceil_mode=True)[0]
    sigma = [math.sqrt(max(((f - 1) / 2) ** 2 - (k * k - 1) / 12, 0.0)) / k for f, k in zip(factors, blocks)]
    return shrunk, sigma


class ShrinkResized(Resized):
    """MONAI's ``Resized`` that first shrinks images far larger than ``spatial_size`` by block
    averaging (:func:`shrink_for_resize`), recorded so that ``Invertd``
    (:class:`medad.io.outputs.MapToInputGridd`) and :func:`medad.io.outputs.input_size` still see the one
    resize from the file's own size: the affine is scaled by the block step, and the resize's
    ``orig_size`` is the size before shrinking."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor], lazy: bool | None = None) -> dict:
        d = dict(data)
        lazy_ = self.lazy if lazy is None else lazy
        for key, mode, align_corners, anti_aliasing, anti_aliasing_sigma, dtype in self.key_iterator(
            d, self.mode, self.align_corners, self.anti_aliasing, self.anti_aliasing_sigma, self.dtype
        ):
            image = d[key]
            shrunk, sigma = shrink_for_resize(image, ensure_tuple(self.resizer.spatial_size)) if anti_aliasing else (image, None)
            if sigma is not None and isinstance(image, MetaTensor):
                from monai.transforms.utils import scale_affine

                shrunk = convert_to_dst_type(shrunk, image, dtype=torch.float32)[0]
                step = scale_affine(tuple(image.shape[1:]), tuple(shrunk.shape[1:]))
                shrunk.affine = image.affine @ torch.as_tensor(
                    to_affine_nd(image.affine.shape[0] - 1, step), dtype=image.affine.dtype
                )
            d[key] = self.resizer(
                shrunk,
                mode=mode,
                align_corners=align_corners,
                anti_aliasing=anti_aliasing,
                anti_aliasing_sigma=anti_aliasing_sigma if sigma is None else sigma,
                dtype=dtype,
                lazy=lazy_,
            )
            operations = getattr(d[key], "applied_operations", None)
            if sigma is not None and operations and operations[-1].get(TraceKeys.CLASS_NAME) == "Resize":
                operations[-1][TraceKeys.ORIG_SIZE] = tuple(int(n) for n in image.shape[1:])
        return d


def image_source(image: object, default: str = "image") -> str:
    """The file (or DICOM series folder) an image was read from, for messages and file names."""
    return str(getattr(image, "meta", {}).get("filename_or_obj", default))


def window_range(window: str | Sequence[float]) -> tuple[float, float]:
    """The intensity range ``(low, high)`` of a CT window: a name in :data:`CT_WINDOWS` or
    ``[center, width]`` in Hounsfield units."""
    if isinstance(window, str):
        if window.lower() not in CT_WINDOWS:
            raise ValueError(f"unknown CT window {window!r}; known: {sorted(CT_WINDOWS)} or [center, width]")
        center, width = CT_WINDOWS[window.lower()]
    else:
        values = [float(v) for v in window]
        if len(values) != 2 or values[1] <= 0:
            raise ValueError(f"a CT window is [center, width] with width > 0, got {window!r}")
        center, width = values
    return center - width / 2, center + width / 2


def _to_unit(image: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``image`` scaled from [low, high] to [0, 1] and clipped, as a new float32 tensor (of the
    input's type, meta data kept); in place after one copy, so that a large volume costs one
    float32 copy (MONAI's intensity transforms make several)."""
    unit = image.to(torch.float32, copy=True)
    return unit.sub_(low).div_(max(high - low, 1e-12)).clamp_(0, 1)


class UnitIntensityd(MapTransform):
    """Scale intensities to [0, 1]: 8-bit data by 1/255 (as MVFA), anything else (16-bit PNG,
    CT, MR, float) by a percentile window over the whole image or volume (``lower`` to
    ``upper`` percentiles, linear interpolation; a constant image becomes 0), or, with
    ``window``, all data by a fixed CT window (see :func:`window_range`). Values outside the
    window are clipped; non-finite values (NaN backgrounds of some NIfTI files) count as the
    image's minimum.

    Needed because MONAI's intensity transforms pick one rule for all inputs, while a folder
    may mix 8-bit and 16-bit images; the data must be loaded with its native dtype.
    """

    def __init__(
        self,
        keys: KeysCollection,
        lower: float = 0.5,
        upper: float = 99.5,
        window: str | Sequence[float] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.lower, self.upper = lower, upper
        self.window = None if window is None else window_range(window)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if image.is_floating_point() and not bool(torch.isfinite(image).all()):
                finite = image[torch.isfinite(image)]
                if finite.numel() == 0:
                    raise ValueError(f"{image_source(image, key)}: no finite intensity values")
                low, high = float(finite.min()), float(finite.max())
                image = torch.nan_to_num(image, nan=low, posinf=high, neginf=low)
            if self.window is not None:
                low, high = self.window
            elif image.dtype == torch.uint8:
                low, high = 0.0, 255.0
            else:
                # numpy on the native dtype: torch.quantile takes floats only, and at most 2**24 values
                values = torch.as_tensor(image).detach().cpu().numpy()
                low, high = (float(v) for v in np.percentile(values, [self.lower, self.upper]))
            d[key] = _to_unit(image, low, high)
        return d


def to_rgb(image: torch.Tensor, channel_dim: int = 0) -> torch.Tensor:
    """Images with 1 (gray), 2 (gray + alpha), 3 or 4 (RGBA) channels along ``channel_dim`` to
    3 channels (RGB): gray is repeated, alpha dropped."""
    channels = image.shape[channel_dim]
    if channels in (1, 2):
        return image.narrow(channel_dim, 0, 1).repeat_interleave(3, dim=channel_dim)
    if channels in (3, 4):
        return image.narrow(channel_dim, 0, 3)
    raise ValueError(f"expected 1-4 channels (gray, gray+alpha, RGB, RGBA), got {channels}")


class ToRGBd(MapTransform):
    """Channel-first images with 1 (gray), 2 (gray + alpha), 3 or 4 (RGBA) channels to 3 (RGB).

    CLIP takes RGB; MONAI has ``RepeatChannel`` but nothing that also drops alpha channels.
    """

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            try:
                d[key] = to_rgb(d[key])
            except ValueError as error:
                raise ValueError(f"{image_source(d[key], key)}: {error}") from error
        return d


class LoadInputd(LoadImaged):
    """``LoadImaged`` whose errors name the file that could not be read and why (MONAI's name
    the transform, and pydicom's not even the file), and which reads DICOM files (and, for
    volumes, series folders) with ``dicom_reader``: :class:`DicomImageReader` in the 2D pipeline,
    :class:`DicomVolumeReader` for volumes."""

    def __init__(self, keys: KeysCollection, *args: Any, dicom_reader: ImageReader | None = None, **kwargs: Any) -> None:
        super().__init__(keys, *args, **kwargs)
        self.dicom_reader = dicom_reader
        # With a reader given, MONAI's LoadImage tries its default readers after a failure, which
        # would read what ours refuse (too large images); given at call time, it tries no other.
        given = kwargs.get("reader")
        self.file_reader = given if isinstance(given, ImageReader) and dicom_reader is not None else None

    def _is_dicom(self, data: Mapping[Hashable, object]) -> bool:
        paths = [data[key] for key in self.key_iterator(dict(data))]
        return bool(paths) and all(
            isinstance(path, (str, os.PathLike)) and (is_dicom_file(path) or Path(path).is_dir()) for path in paths
        )

    def __call__(self, data: Mapping[Hashable, object], reader: object | None = None) -> dict:
        if reader is None and self.dicom_reader is not None:
            reader = self.dicom_reader if self._is_dicom(data) else self.file_reader
        try:
            return super().__call__(data, reader)
        except Exception as error:  # each reader raises its own types
            names = ", ".join(str(data[key]) for key in self.key_iterator(dict(data)))
            if isinstance(error, UnsupportedInputError):
                raise UnsupportedInputError(f"{names}: {error}") from error
            if isinstance(error, Image.DecompressionBombError):  # PIL's own limit, above medad's
                raise UnsupportedInputError(
                    f"{names}: {error}: over medad's limit of {MAX_IMAGE_PIXELS:,} pixels (MAX_IMAGE_PIXELS): downsample it"
                ) from error
            raise ValueError(f"{names}: cannot read ({type(error).__name__}: {error})") from error


class EnsureSliceAxisd(MapTransform):
    """Give channel-first 2D images ``(C, H, W)`` a slice axis of size 1, ``(C, H, W, 1)``, so that
    a single DICOM frame or a 2D NIfTI runs as a one-slice volume (the saved map drops the axis
    again: :class:`medad.io.outputs.SaveMapd`, ``squeeze_end_dims``); 3D volumes pass unchanged.
    MONAI has no transform adding a spatial axis."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if image.dim() == 3:
                image = image.unsqueeze(-1)
                if isinstance(image, MetaTensor):
                    image.affine = to_affine_nd(3, image.affine)
            elif image.dim() != 4:
                raise ValueError(
                    f"{image_source(image, key)}: expected a 2D image or a 3D volume, got {image.dim() - 1} "
                    f"spatial dimensions (shape {tuple(image.shape)} with channels first)"
                )
            d[key] = image
        return d


class SliceOrientationd(MapTransform, InvertibleTransform):
    """MONAI's ``Orientation`` to the axis codes of a slice plane (:data:`SLICE_PLANES`): that
    plane's slices along the last axis, each axis pointing to R, A or S; exact and undone by
    ``Invertd``, as ``Orientationd``.

    A volume one voxel thick along one axis (a 2D DICOM frame or NIfTI, run as a one-slice volume,
    :class:`EnsureSliceAxisd`) is that one slice in any ``slice_plane``: it is brought to the
    codes of the plane it lies in (the anatomical direction nearest its thin axis; e.g. ``"ASR"``
    for a sagittal frame), so that it is scored as one slice and its in-plane axes point as the
    slices of that plane do. ``Orientationd`` takes one fixed set of codes, which would put an
    in-plane axis of a sagittal or coronal frame last (scored as slices one pixel wide)."""

    def __init__(self, keys: KeysCollection, slice_plane: str = "axial", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if slice_plane not in SLICE_PLANES:
            raise ValueError(f"unknown slice_plane {slice_plane!r}; expected one of {sorted(SLICE_PLANES)}")
        self.slice_plane = slice_plane
        # one instance per plane: the applied operation a MetaTensor records names the instance,
        # which inverts it (MONAI's check of a transform's id)
        self.orientations = {plane: Orientation(axcodes=codes, labels=None) for plane, codes in SLICE_PLANES.items()}

    def plane_of(self, image: torch.Tensor) -> str:
        """The plane ``image`` (channel first, 3 spatial axes) is cut in: ``slice_plane``, or for a
        volume one voxel thick along exactly one axis, the plane that axis is normal to."""
        spatial = tuple(int(n) for n in image.shape[1:])
        thin = [axis for axis, n in enumerate(spatial) if n == 1]
        if len(spatial) != 3 or len(thin) != 1 or not isinstance(image, MetaTensor):
            return self.slice_plane
        affine = to_affine_nd(3, np.asarray(image.affine, dtype=np.float64))
        code = nib.orientations.ornt2axcodes(nib.orientations.io_orientation(affine))[thin[0]]
        if code is None:  # a degenerate affine: Orientation reports it
            return self.slice_plane
        return next(plane for plane, codes in SLICE_PLANES.items() if code in (codes[-1], _OPPOSITE[codes[-1]]))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.orientations[self.plane_of(d[key])](d[key])
        return d

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            recorded = self.get_most_recent_transform(d[key], check=False)
            by_id = {id(orientation): orientation for orientation in self.orientations.values()}
            d[key] = by_id.get(recorded.get(TraceKeys.ID), self.orientations[self.slice_plane]).inverse(d[key])
        return d


_OPPOSITE = {"R": "L", "A": "P", "S": "I"}


def input_slice_indices(image: MetaTensor) -> tuple[int, list[int]]:
    """For a volume preprocessed with ``mvfa_preprocessing(volume=True)``: the voxel axis of the
    input file that its slices (its last axis) run along, and each slice's index on that axis,
    which is also its index in the saved anomaly map (same geometry as the input)."""
    affine = np.asarray(image.affine, dtype=np.float64)
    original = np.asarray(image.meta.get("original_affine", affine), dtype=np.float64)
    to_input = np.linalg.solve(original, affine)  # processing voxel -> input voxel: a signed permutation
    axis = int(np.argmax(np.abs(to_input[:3, 2])))
    depth = image.shape[-1]
    indices = np.rint(to_input[axis, 2] * np.arange(depth) + to_input[axis, 3]).astype(int)
    return axis, indices.tolist()


class BinarizeMaskd(MapTransform):
    """Binarise masks at half their value range: 127.5 for 0-255 masks (MVFA's ``> 0.5`` after
    ``ToTensor``), 0.5 for 0-1 masks. MONAI's ``AsDiscreted`` needs one fixed threshold."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            mask = d[key].float()
            d[key] = (mask > (127.5 if mask.max() > 1 else 0.5)).float()[:1]
        return d


class FillMissingMaskd(MapTransform):
    """Give items without a mask (normal images, data sets without annotations) an all-zero mask
    of the image's size, so that batches always carry one. MONAI has no such fill transform."""

    def __init__(self, keys: KeysCollection, like: str = "image") -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.like = like

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        reference = d[self.like]
        for key in self.keys:
            if d.get(key) is None:
                # zeros_like keeps the reference's type, so loaded and filled masks collate together
                d[key] = torch.zeros_like(reference[:1], dtype=torch.float32)
        return d


def mvfa_preprocessing(
    image_size: int = 240,
    image_key: str = "image",
    mask_key: str | None = "mask",
    window: str | Sequence[float] | None = None,
    volume: bool = False,
    slice_plane: str = "axial",
) -> Compose:
    """MONAI pipeline from file paths to MVFA inputs.

    2D images (PNG, JPEG, BMP, TIFF; 8- or 16-bit, gray, RGB, palette; single-frame colour DICOM,
    :class:`DicomImageReader`), read as MONAI's ``LoadImage`` reads them (``(columns, rows)``)
    and transposed to ``(rows, columns)`` for the model, a step ``Invertd``
    (:class:`medad.io.outputs.MapToInputGridd`) undoes: ``image`` (3, S, S) RGB in [0, 1] at
    ``S = image_size`` and, with ``mask_key``, ``mask`` (1, S, S) in {0, 1} (zeros where an item
    has no mask). Images over the size limits (:func:`size_problem`) are refused before they are
    decoded; images more than 8 times ``S`` are shrunk by block averaging before the resize
    (:class:`ShrinkResized`).

    ``volume=True``: NIfTI files through MONAI's default reader selection, DICOM files and DICOM
    series folders through :class:`DicomVolumeReader` (MONOCHROME1 inverted), as ``image`` (C, H, W, D) in [0, 1] at the volume's own voxel grid,
    reoriented (MONAI's ``Orientation``, exact and undone by ``Invertd``) so that the slices of
    ``slice_plane`` (``"axial"``, ``"coronal"``, ``"sagittal"``) lie along the last axis: the
    voxel axis nearest to that anatomical direction in the file's affine, so oblique and
    flipped acquisitions slice the same way. The inferer resizes the slices to ``image_size``
    batch by batch (:mod:`medad.engine.volumes`). 2D files become one-slice volumes, scored as
    that one slice in any ``slice_plane``, oriented as the slices of the plane they lie in
    (:class:`SliceOrientationd`; a single DICOM slice's affine completed along its normal,
    :class:`DicomVolumeReader`).

    ``window``: intensity policy, see :class:`UnitIntensityd`.
    """
    if volume:
        if mask_key is not None:
            raise ValueError("volume preprocessing reads images only: pass mask_key=None")
        if slice_plane not in SLICE_PLANES:
            raise ValueError(f"unknown slice_plane {slice_plane!r}; expected one of {sorted(SLICE_PLANES)}")
        return Compose([
            LoadInputd(keys=image_key, dtype=None, image_only=True, dicom_reader=DicomVolumeReader()),
            EnsureChannelFirstd(keys=image_key),
            EnsureSliceAxisd(keys=image_key),
            SliceOrientationd(keys=image_key, slice_plane=slice_plane),
            UnitIntensityd(keys=image_key, window=window),
        ])
    # MONAI's (columns, rows), as LoadImage reads the file; the recorded transposition to the
    # model's (rows, columns) is undone by Invertd, so that maps come back on LoadImage's grid
    reader = PILReader(converter=_checked_pil_mode)
    size = (image_size, image_size)
    steps: list = [
        LoadInputd(keys=image_key, reader=reader, dtype=None, image_only=True, dicom_reader=DicomImageReader()),
        EnsureChannelFirstd(keys=image_key),
        Transposed(keys=image_key, indices=(0, 2, 1)),
        UnitIntensityd(keys=image_key, window=window),
        # channel by channel: resized before gray is repeated to RGB (a third of the memory)
        ShrinkResized(keys=image_key, spatial_size=size, mode="bicubic", anti_aliasing=True),
        # bicubic overshoots: clip back into [0, 1]
        ScaleIntensityRanged(keys=image_key, a_min=0, a_max=1, b_min=0, b_max=1, clip=True),
        ToRGBd(keys=image_key),
    ]
    if mask_key is not None:
        steps += [
            LoadInputd(keys=mask_key, reader=reader, dtype=None, image_only=True, allow_missing_keys=True),
            EnsureChannelFirstd(keys=mask_key, allow_missing_keys=True),
            Transposed(keys=mask_key, indices=(0, 2, 1), allow_missing_keys=True),
            Resized(keys=mask_key, spatial_size=size, mode="nearest", allow_missing_keys=True),
            BinarizeMaskd(keys=mask_key, allow_missing_keys=True),
            FillMissingMaskd(keys=mask_key, like=image_key),
        ]
    return Compose(steps)
