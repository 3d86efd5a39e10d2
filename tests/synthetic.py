"""Small synthetic data sets in the BMAD layout for end-to-end tests (fast to make, easy lesions)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    texture = gaussian_filter(rng.normal(size=(size, size)), sigma=6)
    texture = (texture - texture.min()) / (np.ptp(texture) + 1e-8)
    return 0.25 + 0.3 * texture


def _lesion(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(0.25, 0.75, size=2) * size
    ry, rx = rng.uniform(0.06, 0.12, size=2) * size
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def write_dataset(root: Path, name: str, masks: bool, seed: int, size: int = 64, counts: dict | None = None) -> None:
    """Write ``<name>_AD`` with valid/test splits of gray textures; abnormal images get a bright
    ellipse (and its mask where ``masks``)."""
    counts = counts or {"valid": (4, 4), "test": (8, 8)}
    rng = np.random.default_rng(seed)
    for split, (n_good, n_bad) in counts.items():
        for cls, n in (("good", n_good), ("Ungood", n_bad)):
            folder = root / f"{name}_AD" / split / cls / "img"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                image = _background(rng, size)
                if cls == "Ungood":
                    lesion = _lesion(rng, size)
                    image[lesion] = 0.95
                    if masks:
                        mask_dir = root / f"{name}_AD" / split / cls / "anomaly_mask"
                        mask_dir.mkdir(exist_ok=True)
                        Image.fromarray(lesion.astype(np.uint8) * 255).save(mask_dir / f"{i:03d}.png")
                Image.fromarray((image * 255).astype(np.uint8)).save(folder / f"{i:03d}.png")


def write_benchmark(root: Path, seed: int = 0, size: int = 64) -> Path:
    """Three data sets: two with masks (``Alpha``, ``Beta``) and one without (``Gamma``)."""
    for offset, (name, masks) in enumerate((("Alpha", True), ("Beta", True), ("Gamma", False))):
        write_dataset(root, name, masks, seed + offset, size)
    return root


def head_phantom(shape: tuple[int, int, int], seed: int, lesion: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A head-like volume ``shape`` (x, y, z) in [0, 1] and its lesion mask: a bright skull (1.0)
    around a textured interior (0.25-0.55) in air (0), a bright ellipsoid lesion (0.85) inside
    where ``lesion``, and two empty (all-air) slices at each end of the z axis.

    The skull keeps the per-volume percentile window the same with and without a lesion."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    x, y, z = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    radius = np.hypot((x - (nx - 1) / 2) / (0.45 * nx), (y - (ny - 1) / 2) / (0.45 * ny))
    texture = gaussian_filter(rng.normal(size=shape), sigma=(3, 3, 2))
    texture = 0.25 + 0.3 * (texture - texture.min()) / (np.ptp(texture) + 1e-8)
    volume = np.where(radius < 0.85, texture, 0.0)
    volume[(radius >= 0.85) & (radius < 1.0)] = 1.0
    mask = np.zeros(shape, dtype=bool)
    if lesion:
        centre = rng.uniform(0.4, 0.6, size=3) * np.array(shape)
        radii = np.array([0.13 * nx, 0.13 * ny, max(2.0, 0.15 * nz)])
        mask = sum(((c - m) / r) ** 2 for c, m, r in zip((x, y, z), centre, radii)) <= 1.0
        volume[mask] = 0.85
    volume[:, :, :2] = 0.0
    volume[:, :, -2:] = 0.0
    mask[:, :, :2] = mask[:, :, -2:] = False
    return volume.astype(np.float32), mask


def write_dicom_series(
    folder: Path,
    volume: np.ndarray,
    origin: tuple[float, float, float],
    row_direction: tuple[float, float, float],
    column_direction: tuple[float, float, float],
    pixel_spacing: tuple[float, float],
    slice_spacing: float,
    intercept: float = -1024.0,
) -> None:
    """Write ``volume`` (rows, columns, slices) of non-negative integers as a 16-bit CT series, one
    file per slice, with the geometry tags (LPS, mm): slice k at ``origin + k * slice_spacing *
    (row_direction x column_direction)``; ``pixel_spacing`` is (between rows, between columns)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
    from pydicom.valuerep import DSfloat

    def decimal_strings(values) -> list:  # DICOM decimal strings hold at most 16 characters
        return [DSfloat(float(v), auto_format=True) for v in values]

    folder.mkdir(parents=True, exist_ok=True)
    normal = np.cross(row_direction, column_direction)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for k in range(volume.shape[2]):
        instance = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, instance
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, instance
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientID, ds.InstanceNumber = "CT", "PHANTOM", k + 1
        ds.ImagePositionPatient = decimal_strings(np.asarray(origin) + k * slice_spacing * normal)
        ds.ImageOrientationPatient = decimal_strings((*row_direction, *column_direction))
        ds.PixelSpacing = decimal_strings(pixel_spacing)
        ds.SliceThickness = DSfloat(float(slice_spacing), auto_format=True)
        ds.Rows, ds.Columns = volume.shape[:2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1.0, intercept
        ds.PixelData = np.ascontiguousarray(volume[:, :, k], dtype=np.uint16).tobytes()
        ds.save_as(folder / f"slice_{k:03d}.dcm", enforce_file_format=True)
