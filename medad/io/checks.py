"""Data checks before any training or evaluation starts: one report of every problem.

A data set with a truncated file, a mask of the wrong size or a non-binary mask should stop a
run at once with a list of every such file, not crash hours later in a DataLoader worker or,
worse, train on a wrong mask. :func:`check_items` opens every image and mask of a data list
once and either raises :class:`DataCheckError` with the full report, or (``on_error="skip"``)
drops the bad items and writes the report beside the outputs.
"""

from __future__ import annotations

import csv
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from medad.io.data import IMAGE_SUFFIXES
from medad.io.discovery import input_kind
from medad.io.files import atomic_write
from medad.io.transforms import (
    MAX_IMAGE_PIXELS,
    MAX_SIDE,
    DicomVolumeReader,
    UnsupportedInputError,
    is_dicom_file,
    normalise_pil_mode,
    read_dicom_image,
    size_problem,
)

__all__ = ["MAX_IMAGE_PIXELS", "MAX_SIDE", "DataCheckError", "Problem", "check_items", "check_volume", "read_array"]

logger = logging.getLogger(__name__)

# Mask values farther than this from {0, 1} or {0, 255} (after scaling) are "not binary-like";
# a few anti-aliased border values are tolerated by the fraction below.
_NON_BINARY_FRACTION = 0.01
_CHANNELS = (1, 2, 3, 4)


class DataCheckError(ValueError):
    """The data failed its checks; the message lists every problem found."""


class Problem(NamedTuple):
    """One problem of one file."""

    file: str
    reason: str


def read_array(path: str | os.PathLike) -> np.ndarray:
    """Pixel data of a 2D image file as an array ``(H, W)`` or ``(H, W, C)``: PNG, JPEG, BMP, TIFF
    (as the 2D pipeline reads them) and single-frame DICOM files
    (:func:`medad.io.transforms.read_dicom_image`: colour as 8-bit RGB).

    Raises ``ValueError`` for missing, empty, truncated or unreadable files, and for images over
    the size limits (:func:`medad.io.transforms.size_problem`: a side over :data:`MAX_SIDE`, more
    than :data:`MAX_IMAGE_PIXELS` pixels), which are refused before they are decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError("file not found")
    if path.stat().st_size == 0:
        raise ValueError("empty file")
    if is_dicom_file(path):
        return read_dicom_image(path)  # its ValueErrors name the reason
    if not path.name.lower().endswith(IMAGE_SUFFIXES):
        raise ValueError(f"not a 2D image file ({', '.join(IMAGE_SUFFIXES)}, or a single-frame colour DICOM)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # medad's own limit is lower
            image = Image.open(path)
    except Image.DecompressionBombError as error:
        raise ValueError(f"{error}: over medad's limit of {MAX_IMAGE_PIXELS:,} pixels (MAX_IMAGE_PIXELS): downsample it") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"unreadable image ({type(error).__name__}: {error})") from error
    with image:
        problem = size_problem((image.height, image.width))  # from the header: nothing decoded yet
        if problem is not None:
            raise ValueError(problem)
        try:
            image.load()  # decode fully: truncated files fail here, not in a worker later
            # the pixel values the pipeline sees (medad.io.transforms.normalise_pil_mode)
            return np.asarray(normalise_pil_mode(image))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise ValueError(f"unreadable image ({type(error).__name__}: {error})") from error


def _non_finite(data: np.ndarray) -> bool:
    """Whether floating ``data`` holds NaN or infinity (its minimum or maximum is not finite; no
    copy of the data)."""
    if data.size == 0 or not np.issubdtype(data.dtype, np.floating):
        return False
    return not (np.isfinite(np.min(data)) and np.isfinite(np.max(data)))


def _read_nifti(path: Path) -> tuple[tuple[int, ...], np.ndarray, np.ndarray]:
    """Shape, affine and data (as stored, unscaled) of a NIfTI file, read in full: a file cut
    short fails here, naming the reason, not in the middle of a run."""
    import nibabel as nib

    try:
        image = nib.load(path)
        header = image.header
        shape, affine = tuple(int(n) for n in header.get_data_shape()), header.get_best_affine()
    except Exception as error:  # nibabel raises several types for broken headers
        raise ValueError(f"unreadable NIfTI ({type(error).__name__}: {error})") from error
    try:
        proxy = image.dataobj
        data = proxy.get_unscaled() if hasattr(proxy, "get_unscaled") else np.asanyarray(proxy)
    except Exception as error:  # EOFError, zlib.error, OSError, ValueError ("Expected n bytes")
        raise ValueError(
            f"unreadable or truncated NIfTI data ({type(error).__name__}: {error}): the file is incomplete or "
            "corrupt; copy or export it again"
        ) from error
    return shape, affine, data


def check_volume(path: str | os.PathLike) -> list[str]:
    """Problems of a volume (NIfTI file, DICOM file or DICOM series folder) that would stop or
    silently corrupt its scoring: unreadable, truncated or empty files, non-finite values (NaN or
    infinity), 4D data with several frames (a time series or several channels: which frame to
    score is not defined), a side over :data:`MAX_SIDE` (the anomaly map's NIfTI limit), colour
    DICOM that is no single-frame image (:class:`medad.io.transforms.DicomVolumeReader`), and a
    singular affine (no voxel-to-world geometry to slice by). Every file is read in full."""
    path = Path(path)
    if not path.exists():
        return ["file not found"]
    if path.is_file() and path.stat().st_size == 0:
        return ["empty file"]
    if path.name.lower().endswith((".nii", ".nii.gz")):
        try:
            shape, affine, data = _read_nifti(path)
        except ValueError as error:
            return [str(error)]
    else:
        from monai.transforms import LoadImage

        try:
            # the reader the volume pipeline uses, given at call time: no fallback to MONAI's own
            data = LoadImage(image_only=True, dtype=None)(str(path), reader=DicomVolumeReader())
        except UnsupportedInputError as error:  # colour or too large: the reason as it is
            return [str(error)]
        except Exception as error:  # MONAI wraps each reader's own error types
            return [f"unreadable image ({type(error).__name__}: {error})"]
        shape, affine = tuple(data.shape), np.asarray(data.affine)
        data = data.numpy()
    reasons = []
    if len(shape) > 3 and any(n > 1 for n in shape[3:]):
        reasons.append(
            f"{len(shape)}D data of shape {shape}: several frames or channels per voxel (a time series?); "
            "medad scores 2D images and 3D volumes: save the frame to score as a 3D volume"
        )
    if min(shape[:2], default=0) < 2:
        reasons.append(f"image too small: {shape}")
    problem = size_problem(shape[:3], image=False)
    if problem is not None:
        reasons.append(problem)
    if _non_finite(data):
        reasons.append("non-finite values (NaN or infinity)")
    spatial = np.asarray(affine, dtype=np.float64)[:3, :3]
    if not np.isfinite(spatial).all() or abs(np.linalg.det(spatial)) < 1e-12:
        reasons.append("its affine (voxel to world) is singular or not finite: the header's qform/sform needs fixing")
    return reasons


def _check_image(path: str, volumes: bool) -> tuple[np.ndarray | None, list[str]]:
    if input_kind(path) == "volume":
        if volumes:
            return None, check_volume(path)
        return None, [
            (
                "a volume (NIfTI or DICOM): training and evaluation take 2D images (PNG, JPEG, BMP, TIFF, or "
                "single-frame colour DICOM)"
            )
        ]
    try:
        pixels = read_array(path)
    except ValueError as error:
        return None, [str(error)]
    reasons = []
    channels = 1 if pixels.ndim == 2 else pixels.shape[-1]
    if pixels.ndim not in (2, 3) or channels not in _CHANNELS:
        reasons.append(f"unsupported shape {pixels.shape} (expected gray, gray+alpha, RGB or RGBA)")
    if min(pixels.shape[:2]) < 2:
        reasons.append(f"image too small: {pixels.shape[:2]}")
    if _non_finite(pixels):
        reasons.append("non-finite values (NaN or infinity)")
    return pixels, reasons


def _check_mask(path: str, image: np.ndarray | None) -> list[str]:
    try:
        mask = read_array(path)
    except ValueError as error:
        return [f"mask: {error}"]
    reasons = []
    if mask.ndim == 3:
        mask = mask[..., 0]
    if image is not None and mask.shape[:2] != image.shape[:2]:
        reasons.append(f"mask size {mask.shape[:2]} differs from its image's {image.shape[:2]}")
    values = mask.astype(np.float64)
    scale = 255.0 if values.max(initial=0) > 1 else 1.0
    off = np.minimum(np.abs(values), np.abs(values - scale)) > 0.1 * scale
    if off.mean() > _NON_BINARY_FRACTION:
        reasons.append(f"mask is not binary-like ({off.mean():.1%} of its pixels are neither 0 nor {scale:g})")
    return reasons


def _same_file_key(path: str | os.PathLike) -> str:
    """One name per file: the absolute path with symbolic links, ``..`` and ``~`` resolved."""
    try:
        return str(Path(path).expanduser().resolve())
    except (OSError, RuntimeError):  # a symlink loop: compare as written
        return os.path.abspath(os.fspath(path))


def _entry_key(item: dict) -> tuple:
    """What makes two data list items the same entry: the image file, the mask file (or none)
    and the label. One image listed with different masks or labels is not a duplicate."""
    mask = item.get("mask")
    return (_same_file_key(item["image"]), _same_file_key(mask) if mask else None, str(item.get("label")))


def check_items(
    items: Sequence[dict],
    on_error: str = "raise",
    report_dir: str | os.PathLike | None = None,
    report_name: str = "data_problems.csv",
    remedy: str = "fix them, or set on_bad_data to 'skip' to leave those items out",
    volumes: bool = False,
) -> list[dict]:
    """Check every image (and mask) of a data list before it is used.

    Problems found: missing, empty, truncated or unreadable files; unsupported channel counts;
    non-finite values; images too small (a side under 2) or too large (a side over
    :data:`MAX_SIDE`, the anomaly map's NIfTI limit, or more than :data:`MAX_IMAGE_PIXELS`
    pixels); an image and its mask of different sizes; masks that are not binary-like; an entry
    listed twice (the same image file, after resolving the path, with the same mask and label:
    a repeated test image would count twice in the metrics, a repeated case be scored twice;
    the first is kept); an empty list.
    (An abnormal image without a mask is no problem: it counts for image-level metrics and
    trains the detection adapters only.)

    Args:
        items: data list items with ``image`` and optionally ``mask``, ``label``, ``has_mask``.
        on_error: ``"raise"``: stop with one :class:`DataCheckError` listing every problem;
            ``"skip"``: drop the bad items, log how many, and write the report.
        report_dir: where ``report_name`` (file, reason) is written when problems are found.
        remedy: what the error message tells the user to do.
        volumes: accept volumes (NIfTI, DICOM; checked by :func:`check_volume`), as inference
            does; otherwise they are a problem (the 2D pipeline cannot read them).

    Returns:
        The items that passed (all of them with ``on_error="raise"``).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if not items:
        raise DataCheckError("the data list is empty: no images to use")
    problems: list[Problem] = []
    kept = []
    first: dict[tuple, int] = {}
    for number, item in enumerate(items):
        key = _entry_key(item)
        if key in first:
            earlier = items[first[key]]["image"]
            same = "" if str(earlier) == str(item["image"]) else f", {earlier}"
            problems.append(
                Problem(str(item["image"]), f"duplicate of item {first[key]} (same file{same}): listed twice, kept once")
            )
            continue
        first[key] = number
        image, reasons = _check_image(item["image"], volumes)
        found = [Problem(item["image"], reason) for reason in reasons]
        if item.get("mask"):
            found += [Problem(item["mask"], reason) for reason in _check_mask(item["mask"], image)]
        problems += found
        if not found:
            kept.append(item)
    unmasked = sum(1 for item in kept if int(item.get("label", 0)) == 1 and not item.get("mask"))
    if unmasked and any(item.get("mask") for item in kept):
        logger.info("%d abnormal images have no mask: they count for image-level metrics only", unmasked)
    if not problems:
        return list(items)
    report = "\n".join(f"  {p.file}: {p.reason}" for p in problems)
    if report_dir is not None:
        with atomic_write(Path(report_dir) / report_name, newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["file", "reason"])
            writer.writerows(problems)
    if on_error == "raise":
        raise DataCheckError(
            f"{report}\n{len(problems)} problem(s) in {len(items) - len(kept)} of {len(items)} items, listed above: {remedy}"
        )
    if not kept:
        raise DataCheckError(f"every item failed its checks:\n{report}")
    logger.warning("left out %d of %d items with problems (report: %s):\n%s", len(items) - len(kept), len(items), report_dir, report)
    return kept
