"""Clinical inputs: finding the cases in a folder, and scoring 3D volumes slice by slice.

A volume (NIfTI, a DICOM file or a DICOM series folder) is prepared by
``medad.transforms.mvfa_preprocessing(volume=True)``: kept at its voxel grid, windowed per volume
to [0, 1], and reoriented so that its slices lie along the last axis. :func:`score_volumes` then
streams the slices through the detector in batches of ``batch_size`` (memory bounded by the
batch, not the volume), resizes each to the model's size as the 2D pipeline does, and puts the
maps, resized back, into a map with the volume's voxel grid.

Rules:

- Empty slices (:func:`empty_slices`, on the windowed intensities): a slice that is constant,
  or in which fewer than ``min_foreground`` (1 %) of the voxels are brighter than
  ``foreground_level`` (5 % of the intensity window), is background only: it is not run
  through the network, and its map and score are 0, so that air above a head or padding
  cannot dominate a volume. (With a CT window whose lower end lies below air, such as
  ``lung``, air is not background: only constant slices are skipped.)
- Blank 2D images follow the same rule (:func:`predict_images`): map and score 0, reported as
  blank, so that a constant image is not flagged.
- Volume scores: ``score`` is the maximum of the non-empty slices' scores (as an image's score
  is the maximum of its map); ``score_p95`` is the 95th percentile (linear interpolation) of the
  scores of the non-empty slices, which one odd slice cannot raise. Both are 0 for a volume
  without any non-empty slice.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from monai.transforms import Resize

from medad.data import IMAGE_SUFFIXES
from medad.detector import AnomalyScores, MVFADetector
from medad.io import output_stem
from medad.transforms import is_colour_dicom_image, is_dicom_file, plain_tensor, shrink_for_resize, to_rgb

__all__ = [
    "DEFAULT_SLICE_BATCH",
    "INPUT_KINDS",
    "NIFTI_SUFFIXES",
    "ROBUST_PERCENTILE",
    "ClinicalInputs",
    "VolumeScores",
    "empty_slices",
    "input_kind",
    "iter_slice_batches",
    "list_inputs",
    "predict_images",
    "prepare_slices",
    "score_volumes",
]

#: Slices per forward pass when an inferer is given no batch size.
DEFAULT_SLICE_BATCH = 8
#: ``input_kind`` values: decide from the files, or keep only 2D images or only volumes.
INPUT_KINDS = ("auto", "image", "volume")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: The percentile of slice scores reported as a volume's robust score (``score_p95``).
ROBUST_PERCENTILE = 95.0


# ----------------------------------------------------------------------------- finding cases


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def input_kind(path: str | os.PathLike) -> str | None:
    """``"image"`` (PNG, JPEG, BMP, TIFF, single-frame colour DICOM), ``"volume"`` (NIfTI, any other
    DICOM file, folder holding DICOM files) or ``None`` (anything else).

    A single-frame colour DICOM (``SamplesPerPixel`` 3 or PALETTE COLOR: photographs,
    dermoscopy, endoscopy, secondary captures) is a 2D colour image, as a PNG of it would be
    (:func:`medad.transforms.is_colour_dicom_image`, from its header); multi-frame colour DICOM
    files are volumes, which the checks refuse with the reason."""
    path = Path(path)
    if path.is_dir():
        return "volume" if any(p.is_file() and is_dicom_file(p) for p in _visible(path)) else None
    name = path.name.lower()
    if name.endswith(IMAGE_SUFFIXES):
        return "image"
    if name.endswith(NIFTI_SUFFIXES):
        return "volume"
    if is_dicom_file(path):
        return "image" if is_colour_dicom_image(path) else "volume"
    return None


def _series_groups(files: Sequence[Path]) -> dict[str, list[Path]]:
    """DICOM files grouped by ``SeriesInstanceUID`` (headers only)."""
    try:
        import pydicom
    except ImportError as error:
        raise ImportError("reading DICOM needs pydicom: pip install pydicom") from error
    groups: dict[str, list[Path]] = defaultdict(list)
    for path in files:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        except Exception as error:  # pydicom raises several types for broken files
            raise ValueError(f"{path}: not a readable DICOM file ({type(error).__name__}: {error})") from error
        groups[str(getattr(header, "SeriesInstanceUID", path))].append(path)
    return groups


def _check_one_series(folder: Path) -> None:
    groups = _series_groups([p for p in _visible(folder) if p.is_file() and is_dicom_file(p)])
    if len(groups) > 1:
        raise ValueError(
            f"{folder}: holds {len(groups)} DICOM series (SeriesInstanceUID {sorted(groups)}); "
            "a series folder must hold one: move each series into its own folder"
        )


def _check_unique_outputs(paths: Sequence[str]) -> None:
    by_stem: dict[str, list[str]] = defaultdict(list)
    for path in paths:
        by_stem[output_stem(path)].append(Path(path).name)
    clashes = {stem: names for stem, names in by_stem.items() if len(names) > 1}
    if clashes:
        listed = "; ".join(f"{' and '.join(names)} -> {stem}_*" for stem, names in sorted(clashes.items()))
        raise ValueError(f"inputs whose outputs would overwrite each other ({listed}): rename them apart")


class ClinicalInputs(NamedTuple):
    """The cases found for inference and their kind (``"image"`` or ``"volume"``)."""

    kind: str
    paths: list[str]


def list_inputs(path: str | os.PathLike, kind: str = "auto") -> ClinicalInputs:
    """The cases to run inference on, sorted.

    ``path`` is one file (one case) or a folder holding cases: 2D images (``.png``, ``.jpg``,
    ``.jpeg``, ``.bmp``, ``.tif``, ``.tiff``), NIfTI files (``.nii``, ``.nii.gz``), DICOM files
    (``.dcm`` or any name with the DICOM prefix; single- or multi-frame) and DICOM series
    (subfolders of DICOM files of one series each). A folder whose files are all DICOM files of
    one series is itself one series. A single-frame colour DICOM file is a 2D image
    (:func:`input_kind`). Other files are ignored.

    ``kind``: ``"auto"`` takes the kind of all the cases found and refuses a mix of 2D images and
    volumes (they run through different pipelines); ``"image"`` or ``"volume"`` keeps that kind.
    """
    if kind not in INPUT_KINDS:
        raise ValueError(f"input_kind must be one of {INPUT_KINDS}, got {kind!r}")
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"input not found: {root}")
    if root.is_file():
        found = {root: input_kind(root)}
        if found[root] is None:
            raise ValueError(f"{root}: not a supported input (2D image, NIfTI or DICOM)")
    else:
        found = {p: input_kind(p) for p in _visible(root)}
        found = {p: k for p, k in found.items() if k is not None}
        for folder in [p for p in found if p.is_dir()]:
            _check_one_series(folder)
        # DICOM files that may be slices of a series (single-frame colour DICOM files are 2D images)
        loose = [p for p, k in found.items() if k == "volume" and p.is_file() and is_dicom_file(p)]
        if loose:
            groups = _series_groups(loose)
            series = {uid: files for uid, files in groups.items() if len(files) > 1}
            if series and len(groups) == 1 and len(loose) == len(found):
                found = {root: "volume"}  # the folder is one series
            elif series:
                raise ValueError(
                    f"{root}: holds the DICOM series {sorted(series)} as loose files beside other inputs: "
                    "move each series into its own folder"
                )
    kinds = set(found.values())
    if kind == "auto" and len(kinds) > 1:
        counts = {k: sum(v == k for v in found.values()) for k in sorted(kinds)}
        raise ValueError(
            f"{root} mixes 2D images and volumes ({counts}), which run through different pipelines: "
            "set input_kind to 'image' or 'volume' to run one kind"
        )
    chosen = kinds.pop() if kind == "auto" and kinds else kind
    paths = [str(p) for p, k in found.items() if k == chosen]
    _check_unique_outputs(paths)
    if not paths:
        raise FileNotFoundError(
            f"no {'inputs' if kind == 'auto' else kind + 's'} in {root} (2D images: {', '.join(IMAGE_SUFFIXES)}; "
            f"volumes: {', '.join(NIFTI_SUFFIXES)}, DICOM files and DICOM series folders)"
        )
    return ClinicalInputs(chosen, paths)


# ----------------------------------------------------------------------------- slice by slice


class VolumeScores(NamedTuple):
    """Final anomaly scores of a batch of volumes ``(B, C, H, W, D)`` (slices along ``D``):
    already fused slice by slice with the detector's stored calibration."""

    anomaly_map: torch.Tensor  # (B, H, W, D), 0 on empty slices
    score: torch.Tensor  # (B,) maximum of the non-empty slices' scores
    score_p95: torch.Tensor  # (B,) 95th percentile of the non-empty slices' scores
    slice_scores: torch.Tensor  # (B, D), 0 on empty slices
    empty_slices: torch.Tensor  # (B, D) bool


def empty_slices(slices: torch.Tensor, foreground_level: float = 0.05, min_foreground: float = 0.01) -> torch.Tensor:
    """Which slices ``(n, ...)`` (intensities windowed to [0, 1]) are background only: constant,
    or with fewer than ``min_foreground`` of their voxels above ``foreground_level``.
    Returns ``(n,)`` bool."""
    flat = slices.reshape(slices.shape[0], -1)
    constant = (flat.amax(dim=1) - flat.amin(dim=1)) <= 1e-6
    background = (flat > foreground_level).sum(dim=1) < min_foreground * flat.shape[1]
    return constant | background


def iter_slice_batches(
    volume: torch.Tensor, batch_size: int, foreground_level: float = 0.05, min_foreground: float = 0.01
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Stream the non-empty slices of a volume ``(C, H, W, D)`` in batches of at most
    ``batch_size``: ``(slice indices, slices (n, C, H, W))``. At most two blocks of
    ``batch_size`` slices are copied at a time."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    depth = volume.shape[-1]
    indices: list[int] = []
    pending: list[torch.Tensor] = []
    for start in range(0, depth, batch_size):
        # one contiguous copy per block: the slices are strided in the volume's memory
        block = volume[..., start : start + batch_size].movedim(-1, 0).contiguous()
        keep = torch.nonzero(~empty_slices(block, foreground_level, min_foreground)).flatten()
        indices += (start + keep).tolist()
        pending.append(block[keep])
        last = start + batch_size >= depth
        while len(indices) >= batch_size or (last and indices):
            slices = torch.cat(pending)
            yield indices[:batch_size], slices[:batch_size]
            indices, pending = indices[batch_size:], [slices[batch_size:]]


def prepare_slices(slices: torch.Tensor, image_size: int) -> torch.Tensor:
    """Slices ``(n, C, H, W)`` in [0, 1] to model inputs ``(n, 3, S, S)``: resized as the 2D
    pipeline resizes images (MONAI ``Resize``, bicubic with anti-aliasing, after block averaging
    slices more than 8 times ``S``: :func:`medad.transforms.shrink_for_resize`), clipped to
    [0, 1], gray repeated to RGB."""
    n, channels, height, width = slices.shape
    resize = Resize((image_size, image_size), mode="bicubic", anti_aliasing=True)
    flat, sigma = shrink_for_resize(slices.reshape(n * channels, height, width), (image_size, image_size))
    resized = plain_tensor(resize(flat, anti_aliasing_sigma=sigma))
    return to_rgb(resized.reshape(n, channels, image_size, image_size).clamp(0, 1), channel_dim=1)


def predict_images(detector: MVFADetector, images: torch.Tensor, scores: AnomalyScores | None = None) -> tuple[AnomalyScores, torch.Tensor]:
    """Final scores of 2D model inputs ``(B, 3, S, S)`` with blank images (:func:`empty_slices`)
    set to map 0 and score 0, and which were blank ``(B,)``; ``scores``: the final scores
    already computed for ``images``."""
    blank = empty_slices(images)
    scores = detector.predict(images) if scores is None else scores
    keep = (~blank).to(scores.score.dtype)
    return AnomalyScores(scores.anomaly_map * keep[:, None, None], scores.score * keep), blank


@torch.no_grad()
def score_volumes(
    detector: MVFADetector,
    volumes: torch.Tensor,
    batch_size: int = DEFAULT_SLICE_BATCH,
    foreground_level: float = 0.05,
    min_foreground: float = 0.01,
) -> VolumeScores:
    """Score volumes ``(B, C, H, W, D)`` (intensities in [0, 1], slices along the last axis) slice
    by slice with the detector's final scores (:meth:`medad.MVFADetector.predict`: zero-shot, or
    few-shot fused with the stored calibration).

    Each batch of ``batch_size`` non-empty slices is resized to the model's size, scored, and
    its maps resized back to the slice size (bilinear, anti-aliased when shrinking) into the
    output map; empty slices (:func:`empty_slices`) score 0. See the module docstring for the
    volume scores.
    """
    if volumes.dim() != 5:
        raise ValueError(f"expected volumes (B, C, H, W, D), got shape {tuple(volumes.shape)}")
    batch, _, height, width, depth = volumes.shape
    device = volumes.device
    anomaly_map = torch.zeros((batch, height, width, depth), device=device)
    slice_scores = torch.zeros((batch, depth), device=device)
    empty = torch.ones((batch, depth), dtype=torch.bool, device=device)
    restore = Resize((height, width), mode="bilinear", anti_aliasing=True)
    for b, volume in enumerate(volumes):
        for indices, slices in iter_slice_batches(volume, batch_size, foreground_level, min_foreground):
            final = detector.predict(prepare_slices(slices, detector.image_size))
            anomaly_map[b, :, :, indices] = plain_tensor(restore(final.anomaly_map.float())).movedim(0, -1)
            slice_scores[b, indices] = final.score.float()
            empty[b, indices] = False
    scores = [slice_scores[b][~empty[b]] for b in range(batch)]
    maximum = torch.stack([s.max() if s.numel() else s.new_zeros(()) for s in scores])
    robust = torch.stack([torch.quantile(s, ROBUST_PERCENTILE / 100) if s.numel() else s.new_zeros(()) for s in scores])
    return VolumeScores(anomaly_map, maximum, robust, slice_scores, empty)
