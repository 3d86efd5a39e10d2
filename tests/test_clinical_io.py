"""Clinical inputs and outputs: NIfTI and DICOM volumes slice by slice, 16-bit images, aligned maps.

One few-shot detector is built and calibrated in-process on generated head phantoms and saved as
the bundle's ``models/model.pt``; `python -m monai.bundle run inferring` then runs on volumes
(NIfTI with an oblique affine, the same image flipped and with permuted axes, a DICOM series, a
single DICOM frame) and on a 16-bit PNG.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial.transform import Rotation
from sklearn.metrics import roc_auc_score

import medad
from medad.io.discovery import list_inputs
from medad.io.transforms import CT_WINDOWS, UnitIntensityd, mvfa_preprocessing, window_range
from medad.engine.volumes import iter_slice_batches, prepare_slices

from helpers import CONFIGS, IMAGE_SIZE, run_bundle
from synthetic import head_phantom, write_dicom_series

PHANTOM = (48, 56, 16)  # (x, y, z): two empty slices at each z end
# An oblique acquisition: rotated, anisotropic voxels, offset origin.
OBLIQUE = np.eye(4)
OBLIQUE[:3, :3] = Rotation.from_euler("xyz", [20, -15, 30], degrees=True).as_matrix() @ np.diag([0.9, 1.3, 2.5])
OBLIQUE[:3, 3] = [-40.0, 12.0, 7.0]
# DICOM series geometry (LPS): axial tilted by 30 degrees about the patient's x axis.
ROW_DIRECTION = (1.0, 0.0, 0.0)
COLUMN_DIRECTION = (0.0, float(np.cos(np.pi / 6)), -float(np.sin(np.pi / 6)))
PIXEL_SPACING = (0.7, 0.9)  # between rows, between columns
SLICE_SPACING = 3.0
ORIGIN = (-50.0, 20.0, 100.0)


def windowed_slices(volume: np.ndarray) -> torch.Tensor:
    """Model inputs of a phantom's non-empty slices, prepared as the volume pipeline does."""
    unit = UnitIntensityd("image")({"image": torch.from_numpy(volume)[None]})["image"]
    return torch.cat([prepare_slices(slices, IMAGE_SIZE) for _, slices in iter_slice_batches(unit, 8)])


@pytest.fixture(scope="module")
def bundle_root(tmp_path_factory, tiny_weights) -> Path:
    """A bundle root whose ``models/model.pt`` is a few-shot detector (the golden fixture's CLIP
    and adapters): memory bank from normal phantoms, calibration on other normal and abnormal
    ones (as the few-shot workflow does)."""
    detector = medad.build_detector(
        ["Phantom"], "Phantom", model_name=medad.TINY_MODEL_NAME, image_size=IMAGE_SIZE,
        pretrained=tiny_weights["clip"], levels=(1, 2, 3, 4), checkpoint=tiny_weights["adapters"],
    ).eval()
    normal = [windowed_slices(head_phantom(PHANTOM, seed, lesion=False)[0]) for seed in (1, 2, 3)]
    detector.build_memory(torch.cat(normal[:2]))
    detector.calibrate(torch.cat([normal[2], windowed_slices(head_phantom(PHANTOM, 4)[0])]))
    root = tmp_path_factory.mktemp("bundle")
    (root / "models").mkdir()
    torch.save(detector.state_dict(), root / "models" / "model.pt")
    return root


def inference(bundle_root: Path, backbone: dict, dataset_dir: Path, output_dir: Path) -> str:
    return run_bundle(
        "inferring", ("inference",), bundle_root, dataset_dir=dataset_dir, output_dir=output_dir,
        num_workers=0, batch_size=4, **backbone,
    )


def expected_dicom_affine() -> np.ndarray:
    """The RAS affine of the series for an array indexed (column, row, slice), as MONAI's
    PydicomReader (and ITK) build it from the geometry tags."""
    normal = np.cross(ROW_DIRECTION, COLUMN_DIRECTION)
    lps = np.eye(4)
    lps[:3, 0] = np.multiply(ROW_DIRECTION, PIXEL_SPACING[1])
    lps[:3, 1] = np.multiply(COLUMN_DIRECTION, PIXEL_SPACING[0])
    lps[:3, 2] = normal * SLICE_SPACING
    lps[:3, 3] = ORIGIN
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def volume_run(tmp_path_factory, bundle_root, bundle_backbone) -> dict:
    """One inference run over a folder of volumes; returns inputs, lesion masks and outputs."""
    inputs = tmp_path_factory.mktemp("volumes")
    volume, lesion = head_phantom(PHANTOM, 10)
    stored = np.rint(volume * 1000).astype(np.int16)
    nib.save(nib.Nifti1Image(stored, OBLIQUE), inputs / "case.nii.gz")
    # The same physical image with voxel axis 0 reversed, and with axes permuted (z, x, y).
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, PHANTOM[0] - 1
    nib.save(nib.Nifti1Image(stored[::-1].copy(), OBLIQUE @ flip), inputs / "flipped.nii.gz")
    permute = np.eye(4)[:, [2, 0, 1, 3]]  # new voxel (k, i, j) is old voxel (i, j, k)
    nib.save(nib.Nifti1Image(stored.transpose(2, 0, 1).copy(), OBLIQUE @ permute), inputs / "permuted.nii.gz")

    # rows x columns 56 x 48: MONAI's (column, row) array has the NIfTI phantom's in-plane shape
    series_volume, series_lesion = head_phantom((56, 48, 14), 11)
    pixels = np.rint(series_volume * 2000).astype(np.uint16)
    write_dicom_series(inputs / "series", pixels, ORIGIN, ROW_DIRECTION, COLUMN_DIRECTION, PIXEL_SPACING, SLICE_SPACING)
    single = tmp_path_factory.mktemp("frame")
    write_dicom_series(single, pixels[:, :, 6:7], ORIGIN, ROW_DIRECTION, COLUMN_DIRECTION, PIXEL_SPACING, SLICE_SPACING)
    shutil.move(single / "slice_000.dcm", inputs / "frame.dcm")
    for plane in ("sagittal", "coronal"):  # the same frame stored as a sagittal and a coronal slice
        geometry = (ORIGIN, *PLANE_DIRECTIONS[plane], PIXEL_SPACING, SLICE_SPACING)
        write_dicom_series(single / plane, pixels[:, :, 6:7], *geometry)
        shutil.move(single / plane / "slice_000.dcm", inputs / f"{plane}.dcm")

    output = tmp_path_factory.mktemp("outputs") / "run"
    inference(bundle_root, bundle_backbone, inputs, output)
    return {
        "inputs": inputs, "output": output, "lesion": lesion,
        "series_lesion": series_lesion.transpose(1, 0, 2),  # MONAI indexes DICOM (column, row, slice)
        "series_pixels": pixels,
    }


def load_map(run: dict, case: str) -> nib.Nifti1Image:
    return nib.load(run["output"] / f"{case}_anomaly_map.nii.gz")


def test_nifti_map_keeps_the_oblique_geometry_and_finds_the_lesion(volume_run):
    source = nib.load(volume_run["inputs"] / "case.nii.gz")
    anomaly = load_map(volume_run, "case")
    assert anomaly.shape == source.shape == PHANTOM
    np.testing.assert_allclose(anomaly.affine, source.affine, atol=1e-4)
    values, lesion = anomaly.get_fdata(), volume_run["lesion"]
    assert values[lesion].mean() > 1.5 * values[~lesion].mean()
    head = np.zeros(PHANTOM, dtype=bool)
    head[:, :, 2:-2] = True  # the non-empty slices
    assert roc_auc_score(lesion[head], values[head]) > 0.9
    assert np.all(values[:, :, :2] == 0) and np.all(values[:, :, -2:] == 0)  # empty slices score 0


def test_flipped_and_permuted_inputs_give_the_same_physical_map(volume_run):
    reference = load_map(volume_run, "case").get_fdata()
    flipped, permuted = load_map(volume_run, "flipped"), load_map(volume_run, "permuted")
    np.testing.assert_allclose(flipped.affine, nib.load(volume_run["inputs"] / "flipped.nii.gz").affine, atol=1e-4)
    np.testing.assert_allclose(permuted.affine, nib.load(volume_run["inputs"] / "permuted.nii.gz").affine, atol=1e-4)
    # Slicing follows the anatomy (the voxel axis nearest to S), not the storage order.
    np.testing.assert_allclose(flipped.get_fdata(), reference[::-1], atol=1e-5)
    np.testing.assert_allclose(permuted.get_fdata(), reference.transpose(2, 0, 1), atol=1e-5)
    # The per-slice tables index slices along each file's own voxel axis.
    rows = read_csv(volume_run["output"] / "slices" / "permuted_slice_scores.csv")
    assert {row["axis"] for row in rows} == {"0"} and [int(row["slice"]) for row in rows] == list(range(PHANTOM[2]))


def test_dicom_series_map_is_aligned_with_the_series(volume_run):
    anomaly = load_map(volume_run, "series")
    pixels = volume_run["series_pixels"]
    assert anomaly.shape == (pixels.shape[1], pixels.shape[0], pixels.shape[2])
    np.testing.assert_allclose(anomaly.affine, expected_dicom_affine(), atol=1e-4)
    values, lesion = anomaly.get_fdata(), volume_run["series_lesion"]
    head = np.zeros(values.shape, dtype=bool)
    head[:, :, 2:-2] = True
    assert roc_auc_score(lesion[head], values[head]) > 0.9

    # A single DICOM frame is a one-slice volume: its map is 2D with the frame's position.
    frame = load_map(volume_run, "frame")
    assert frame.shape == (pixels.shape[1], pixels.shape[0])
    # its slice axis is the frame's normal times its thickness (MONAI's reader leaves a unit z axis)
    np.testing.assert_allclose(frame.affine, expected_dicom_affine(), atol=1e-4)

    # The same frame stored as a sagittal and a coronal slice: the map has the file's (columns,
    # rows) grid, its affine places each pixel where the file's tags do, and the values are those
    # of the same pixels scored as the (tilted) axial frame above (a 2D frame is oriented as its
    # own plane's slices, which flips both in-plane axes alike for these three storages).
    rows, columns = pixels.shape[:2]
    r, c = np.array([0, 0, rows - 1, 30, 7]), np.array([0, columns - 1, 0, 11, 40])
    scored = {}
    for plane in ("sagittal", "coronal"):
        anomaly = load_map(volume_run, plane)
        assert anomaly.shape == (columns, rows)
        placed = nib.affines.apply_affine(anomaly.affine, np.stack([c, r, np.zeros_like(r)], axis=1)).T
        np.testing.assert_allclose(placed, patient_ras(volume_run["inputs"] / f"{plane}.dcm", r, c), atol=1e-3)
        scored[plane] = anomaly.get_fdata()
        np.testing.assert_allclose(scored[plane], frame.get_fdata(), rtol=0, atol=1e-5)
        assert scored[plane].max() > 0


def test_scores_table_slice_tables_and_overlays(volume_run):
    output = volume_run["output"]
    rows = {Path(row["image"]).name: row for row in read_csv(output / "scores.csv")}
    assert set(rows) == {
        "case.nii.gz", "flipped.nii.gz", "permuted.nii.gz", "series", "frame.dcm", "sagittal.dcm", "coronal.dcm"
    }
    for plane in ("sagittal.dcm", "coronal.dcm"):
        assert float(rows[plane]["score"]) == pytest.approx(float(rows["frame.dcm"]["score"]), abs=1e-5)
    slices = read_csv(output / "slices" / "case_slice_scores.csv")
    assert [int(row["slice"]) for row in slices] == list(range(PHANTOM[2]))
    assert [int(row["empty"]) for row in slices] == [1, 1] + [0] * (PHANTOM[2] - 4) + [1, 1]
    scores = np.array([float(row["score"]) for row in slices])
    assert float(rows["case.nii.gz"]["score"]) == pytest.approx(scores.max(), rel=1e-5)
    assert float(rows["flipped.nii.gz"]["score"]) == pytest.approx(scores.max(), rel=1e-5)
    # The most anomalous slices are those through the lesion.
    lesion_slices = set(np.flatnonzero(volume_run["lesion"].any(axis=(0, 1))))
    assert int(np.argmax(scores)) in lesion_slices
    strip = Image.open(output / "overlays" / "case_overlay.png")
    assert strip.width > 3 * strip.height // 2 and strip.mode == "RGB"  # three slices side by side
    assert all((output / "overlays" / f"{case}_overlay.png").is_file() for case in ("series", "frame"))


def test_sixteen_bit_png(bundle_root, bundle_backbone, tmp_path):
    volume, lesion = head_phantom(PHANTOM, 12)
    k = int(np.flatnonzero(lesion.any(axis=(0, 1))).mean())  # a slice through the lesion's middle
    inputs = tmp_path / "images"
    inputs.mkdir()
    Image.fromarray(np.rint(volume[:, :, k] * 60000).astype(np.uint16)).save(inputs / "slice.png")
    assert Image.open(inputs / "slice.png").mode == "I;16"
    inference(bundle_root, bundle_backbone, inputs, tmp_path / "outputs")
    anomaly = nib.load(tmp_path / "outputs" / "slice_anomaly_map.nii.gz").get_fdata()
    assert anomaly.shape == PHANTOM[1::-1]  # (columns, rows) of the PNG, as MONAI's LoadImage reads it
    assert roc_auc_score(lesion[:, :, k].ravel(), anomaly.T.ravel()) > 0.8
    rows = read_csv(tmp_path / "outputs" / "scores.csv")
    assert [Path(row["image"]).name for row in rows] == ["slice.png"]
    assert (tmp_path / "outputs" / "overlays" / "slice_overlay.png").is_file()
    assert not (tmp_path / "outputs" / "slices").exists()  # per-slice tables are for volumes


# A 512 x 512 x 200 volume through the bundle's inference config, in a subprocess that reports
# its resident memory just before the run (everything built) and its peak, and the batch sizes
# the network saw.
_MEASURE = """
import json, resource, sys
from monai.bundle import ConfigWorkflow
overrides = json.loads(sys.argv[1])
workflow = ConfigWorkflow(config_file=sys.argv[2], workflow_type="infer", **overrides)
workflow.initialize()
workflow.parser.get_parsed_content("evaluator")  # network, data loader and handlers built
batches = []
encoder = workflow.parser.get_parsed_content("network").encoder
encoder.register_forward_hook(lambda module, args, output: batches.append(args[0].shape[0]))
with open("/proc/self/statm") as statm:
    before = int(statm.read().split()[1]) * resource.getpagesize() // 1024
workflow.run()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
print(json.dumps({"before_kb": before, "peak_kb": peak, "batches": batches}))
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="measures memory through Linux's /proc")
def test_large_volume_memory_is_bounded_by_the_batch(tmp_path, bundle_backbone):
    shape = (512, 512, 200)
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    pattern = np.where(np.hypot(x - 255.5, y - 255.5) < 200, 300 + 200 * np.sin(x / 9.0) * np.cos(y / 13.0), 0)
    stored = np.zeros(shape, dtype=np.int16)
    for k in range(4, shape[2] - 4):  # four empty slices at each end
        stored[:, :, k] = np.roll(pattern, 2 * k, axis=1)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    nib.save(nib.Nifti1Image(stored, np.diag([0.5, 0.5, 1.0, 1.0])), inputs / "large.nii")
    del stored

    # A zero-shot detector (no memory bank) with the tiny backbone at 56 px keeps this fast.
    root = tmp_path / "bundle"
    (root / "models").mkdir(parents=True)
    detector = medad.build_detector(
        ["Phantom"], "Phantom", model_name=medad.TINY_MODEL_NAME, image_size=56,
        pretrained=bundle_backbone["clip_weights"], levels=(1, 2, 3, 4),
    )
    torch.save(detector.state_dict(), root / "models" / "model.pt")
    overrides = {
        "bundle_root": str(root), "dataset_dir": str(inputs), "clip_model": medad.TINY_MODEL_NAME,
        "clip_weights": str(bundle_backbone["clip_weights"]), "image_size": 56, "levels": [1, 2, 3, 4],
        "num_workers": 0, "batch_size": 8,
        "postprocessing#transforms#3#nifti_ext": ".nii",  # skip gzip: saves time, not memory
    }
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, json.dumps(overrides), str(CONFIGS / "inference.json")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert max(report["batches"]) <= 8 and sum(report["batches"]) == shape[2] - 8  # empty slices skipped
    volume_bytes = np.prod(shape) * 4  # the volume as float32: 210 MB
    growth = (report["peak_kb"] - report["before_kb"]) * 1024
    print(f"peak RSS {report['peak_kb'] / 1024:.0f} MiB, {growth / 2**20:.0f} MiB above the RSS before the run "
          f"({growth / volume_bytes:.1f} x the float32 volume)")
    # Loading (int16), windowing (float32), batching, the map and saving each hold a copy of the
    # volume, a few at a time; the network never sees more than a batch of slices (above).
    assert growth < 5 * volume_bytes
    anomaly = nib.load(root / "outputs" / "large_anomaly_map.nii")
    assert anomaly.shape == shape


def test_input_listing_and_routing(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "a.png")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3), np.float32), np.eye(4)), folder / "b.nii.gz")
    (folder / "notes.txt").write_text("ignored")
    with pytest.raises(ValueError, match="mixes 2D images and volumes"):
        list_inputs(folder)
    assert list_inputs(folder, "image") == (("image", [str(folder / "a.png")]))
    assert list_inputs(folder, "volume").paths == [str(folder / "b.nii.gz")]
    assert list_inputs(folder / "b.nii.gz") == ("volume", [str(folder / "b.nii.gz")])

    # A folder of one series is one case; a series among other inputs must have its own folder.
    series = tmp_path / "series"
    geometry = (ORIGIN, ROW_DIRECTION, COLUMN_DIRECTION, PIXEL_SPACING, 1.0)
    write_dicom_series(series, np.ones((6, 6, 3), np.uint16), *geometry)
    assert list_inputs(series) == ("volume", [str(series)])
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3), np.float32), np.eye(4)), series / "other.nii")
    with pytest.raises(ValueError, match="own folder"):
        list_inputs(series)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no inputs"):
        list_inputs(tmp_path / "empty")


def error_chain(error: BaseException) -> str:
    """The messages of an error and its causes (MONAI's Compose wraps a transform's error)."""
    messages = []
    while error is not None:
        messages.append(str(error))
        error = error.__cause__
    return " <- ".join(messages)


def test_unreadable_volumes_are_named(tmp_path):
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    with pytest.raises(Exception) as raised:
        mvfa_preprocessing(mask_key=None, volume=True)({"image": str(broken)})
    assert f"{broken}: cannot read" in error_chain(raised.value)
    five_d = tmp_path / "five_d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3, 2, 2), np.float32), np.eye(4)), five_d)
    with pytest.raises(Exception) as raised:
        mvfa_preprocessing(mask_key=None, volume=True)({"image": str(five_d)})
    assert f"{five_d}: expected a 2D image or a 3D volume" in error_chain(raised.value)


def test_ct_windows_and_the_empty_slice_rule():
    assert window_range("brain") == (0.0, 80.0) and window_range([40, 400]) == (-160.0, 240.0)
    assert set(CT_WINDOWS) >= {"brain", "lung", "abdomen", "bone"}
    with pytest.raises(ValueError, match="unknown CT window"):
        window_range("kidney")
    hu = torch.tensor([[-1000.0, 0.0, 40.0, 80.0, 3000.0]])
    windowed = UnitIntensityd("image", window="brain")({"image": hu})["image"]
    torch.testing.assert_close(windowed, torch.tensor([[0.0, 0.0, 0.5, 1.0, 1.0]]))

    volume = torch.zeros(1, 10, 10, 5)
    volume[..., 1] = 0.5  # constant: empty
    volume[0, 0, 0, 2] = 1.0  # 1 % of its voxels above the foreground level: kept
    volume[0, :5, :, 3] = torch.rand(5, 10) * 0.04 + 0.005  # below the foreground level: empty
    volume[..., 4] = torch.rand(1, 10, 10)
    batches = list(iter_slice_batches(volume, batch_size=1))
    assert [indices for indices, _ in batches] == [[2], [4]]


# A single DICOM slice in the three standard planes (LPS row and column directions as scanners
# store them: axial rows to the patient's left and columns to posterior, sagittal to posterior
# and inferior, coronal to left and inferior).
PLANE_DIRECTIONS = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
}


def frame_of(folder: Path, pixels: np.ndarray, row_direction, column_direction, origin=ORIGIN) -> Path:
    """``pixels`` (rows, columns) as a single-frame CT slice file with this geometry."""
    geometry = (origin, row_direction, column_direction, PIXEL_SPACING, SLICE_SPACING)
    write_dicom_series(folder, pixels[:, :, None], *geometry)
    return folder / "slice_000.dcm"


def patient_ras(path: Path, r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """RAS positions (3, n) of the pixels (row r, column c) of a single-frame DICOM file, from its
    own tags: ImagePositionPatient + c * column spacing * row direction + r * row spacing * column
    direction (LPS), with x and y negated."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    orientation = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
    between_rows, between_columns = (float(v) for v in ds.PixelSpacing)
    lps = (
        np.asarray(ds.ImagePositionPatient, dtype=np.float64)[:, None]
        + orientation[:3, None] * between_columns * c[None] + orientation[3:, None] * between_rows * r[None]
    )
    return lps * np.array([-1.0, -1.0, 1.0])[:, None]


def test_single_dicom_frame_in_any_plane_is_scored_as_that_slice(tiny_detector, tmp_path):
    """A sagittal or coronal single-frame DICOM (MONAI's PydicomReader gave it a singular affine,
    which Orientationd refused) is scored as that one slice: the pipeline orients a 2D frame as the
    slices of the plane it lies in (SLICE_PLANES: axial R, A; sagittal A, S; coronal R, S), which
    for the three standard storages flips both in-plane axes alike. So the same pixel data gives
    the same map, pixel for pixel, stored as an axial, a sagittal or a coronal slice, and whatever
    slice_plane is asked for; the map is on MONAI's grid of the file, (columns, rows), and its
    affine places each pixel where the file's geometry tags do."""
    from medad.io import dicom_results as dr

    volume, _ = head_phantom((40, 34, 8), 21)  # rows x columns 40 x 34: not square, so a transposition shows
    pixels = np.rint(volume[:, :, 4] * 2000).astype(np.uint16)
    rows, columns = pixels.shape
    maps = {}
    for plane, (row_direction, column_direction) in PLANE_DIRECTIONS.items():
        path = frame_of(tmp_path / plane, pixels, row_direction, column_direction)
        prediction = medad.predict_input(tiny_detector, path)
        assert prediction.kind == "volume" and prediction.anomaly_map.shape == (columns, rows)
        assert prediction.volume["slice_axis"] == 2 and len(prediction.volume["slice_scores"]) == 1
        assert prediction.anomaly_map.max() > 0
        maps[plane] = prediction

        # the map's affine: voxel (column c, row r) at the pixel's patient position
        r, c = np.array([0, 0, rows - 1, 17, 5]), np.array([0, columns - 1, 0, 9, 30])
        affine = prediction.meta["affine"]
        placed = affine[:3, :3] @ np.stack([c, r, np.zeros_like(r)]) + affine[:3, 3:]
        np.testing.assert_allclose(placed, patient_ras(path, r, c), atol=1e-4)
        normal = np.cross(row_direction, column_direction) * SLICE_SPACING * np.array([-1.0, -1.0, 1.0])
        np.testing.assert_allclose(affine[:3, 2], normal, atol=1e-6)  # the slice axis: normal x thickness

        # and the DICOM results put the map back on the source's pixels exactly
        frames, _ = dr.map_to_frames(dr.read_sources(path), prediction.anomaly_map, affine)
        np.testing.assert_array_equal(frames, prediction.anomaly_map.T[None])

        for slice_plane in ("coronal", "sagittal"):  # a 2D frame is one slice in any plane
            other = medad.predict_input(tiny_detector, path, slice_plane=slice_plane)
            np.testing.assert_array_equal(other.anomaly_map, prediction.anomaly_map)
            assert other.score == prediction.score
    for plane in ("sagittal", "coronal"):
        np.testing.assert_allclose(maps[plane].anomaly_map, maps["axial"].anomaly_map, rtol=0, atol=1e-6)
        assert maps[plane].score == pytest.approx(maps["axial"].score, abs=1e-6)

    # The same sagittal picture stored with its columns reversed (rows now run to anterior, the
    # first pixel at the other edge) is the same physical image: its map is the same map, reversed.
    row_direction, column_direction = PLANE_DIRECTIONS["sagittal"]
    reversed_row = tuple(-v for v in row_direction)
    origin = tuple(np.add(ORIGIN, np.multiply(row_direction, (columns - 1) * PIXEL_SPACING[1])))
    path = frame_of(tmp_path / "sagittal_reversed", pixels[:, ::-1].copy(), reversed_row, column_direction, origin)
    reversed_map = medad.predict_input(tiny_detector, path).anomaly_map
    np.testing.assert_allclose(reversed_map[::-1], maps["sagittal"].anomaly_map, rtol=0, atol=1e-6)
