"""Clinical inputs read as they are meant, and bad inputs refused before any scoring, naming the
file: colour and MONOCHROME1 DICOM, NaN and truncated NIfTI, duplicate datalist entries, images
too large for the anomaly map or for memory, and test splits without one of the two classes."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import medad.io.transforms
from medad.io.checks import DataCheckError, check_items, check_volume, read_array
from medad.io.data import target_datalist
from medad.io.discovery import input_kind, list_inputs
from medad.io.outputs import MapToInputGridd, input_size
from medad.surfaces.predict import predict_input
from medad.io.transforms import MAX_SIDE, UnsupportedInputError, mvfa_preprocessing, shrink_for_resize

from synthetic import write_dataset

pydicom = pytest.importorskip("pydicom")


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    photometric: str,
    bits: int | None = None,
    signed: bool = False,
    rescale: tuple[float, float] | None = None,
    frames: int = 1,
    series: str | None = None,
) -> Path:
    """A secondary-capture DICOM file of ``pixels``: (rows, columns) gray, (rows, columns, 3) colour
    (interleaved), with ``frames`` stacked in front for multi-frame files."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    colour = photometric.startswith(("RGB", "YBR"))
    shape = pixels.shape[1:] if frames > 1 else pixels.shape
    instance = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, instance
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), series or generate_uid()
    ds.Modality, ds.PatientID, ds.InstanceNumber = "OT", "PHANTOM", 1
    ds.Rows, ds.Columns = shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = (3 if colour else 1), photometric
    if colour:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    allocated = pixels.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored = allocated, bits or allocated
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, int(signed)
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def colour_picture(rows: int = 40, columns: int = 52) -> np.ndarray:
    """A smooth 8-bit RGB picture with a bright blob (YBR round trips keep it within 1 level)."""
    y, x = np.mgrid[:rows, :columns] / np.array([rows, columns])[:, None, None]
    blob = np.exp(-((y - 0.4) ** 2 + (x - 0.6) ** 2) / 0.02)
    channels = [0.2 + 0.6 * x, 0.3 + 0.4 * y, 0.1 + 0.8 * blob]
    return np.rint(np.stack(channels, axis=-1) * 255).astype(np.uint8)


def refusal(preprocess, path: Path) -> UnsupportedInputError:
    """The error ``preprocess`` refuses ``path`` with (MONAI's ``Compose`` wraps it)."""
    with pytest.raises(RuntimeError) as raised:
        preprocess({"image": str(path)})
    error: BaseException | None = raised.value
    while error is not None and not isinstance(error, UnsupportedInputError):
        error = error.__cause__
    assert error is not None, raised.value
    return error


def problems_of(items: list[dict], **kwargs) -> list[str]:
    """The report lines of a refused data list (``check_items`` must refuse it)."""
    with pytest.raises(DataCheckError) as raised:
        check_items(items, **kwargs)
    return str(raised.value).splitlines()


# ----------------------------------------------------------------------------- colour DICOM


@pytest.mark.parametrize("photometric", ["RGB", "YBR_FULL"])
def test_single_frame_colour_dicom_is_scored_as_a_2d_colour_image(tmp_path, tiny_detector, photometric):
    picture = colour_picture()
    stored = picture
    if photometric != "RGB":
        from pydicom.pixels import convert_color_space

        stored = convert_color_space(picture, "RGB", photometric)
    (tmp_path / "dicom").mkdir()
    dicom = write_dicom(tmp_path / "dicom" / "photo.dcm", stored, photometric)
    png = tmp_path / "png" / "photo.png"
    png.parent.mkdir()
    Image.fromarray(picture).save(png)

    assert input_kind(dicom) == "image"
    assert list_inputs(dicom) == ("image", [str(dicom)])
    assert list_inputs(dicom.parent).kind == "image"  # a folder of colour frames is not a series
    pixels = read_array(dicom)
    assert pixels.shape == picture.shape and pixels.dtype == np.uint8
    assert np.abs(pixels.astype(int) - picture).max() <= (0 if photometric == "RGB" else 2)
    assert check_items([{"image": str(dicom)}], volumes=True) == [{"image": str(dicom)}]

    size = tiny_detector.image_size
    from_dicom = mvfa_preprocessing(size, mask_key=None)({"image": str(dicom)})["image"]
    from_png = mvfa_preprocessing(size, mask_key=None)({"image": str(png)})["image"]
    assert from_dicom.shape == (3, size, size)
    assert not torch.equal(from_dicom[0], from_dicom[2])  # colour kept, not one gray channel
    torch.testing.assert_close(from_dicom.as_tensor(), from_png.as_tensor(), atol=0.01 if photometric != "RGB" else 0, rtol=0)

    prediction = predict_input(tiny_detector, dicom)
    assert prediction.kind == "image"
    assert prediction.anomaly_map.shape == picture.shape[:2]  # (rows, columns), not 3 slices
    reference = predict_input(tiny_detector, png)
    np.testing.assert_allclose(prediction.score, reference.score, rtol=0.02, atol=1e-3)


def test_colour_dicom_that_is_no_single_frame_image_is_refused_with_the_reason(tmp_path):
    frames = np.stack([colour_picture(20, 24)] * 4)
    multi = write_dicom(tmp_path / "cine.dcm", frames, "RGB", frames=4)
    series = tmp_path / "series"
    series.mkdir()
    uid = pydicom.uid.generate_uid()
    for k in range(2):
        write_dicom(series / f"frame_{k}.dcm", colour_picture(20, 24), "RGB", series=uid)
    assert input_kind(multi) == "volume" and input_kind(series) == "volume"
    lines = problems_of([{"image": str(multi)}, {"image": str(series)}], volumes=True)
    assert any("cine.dcm" in line and "colour DICOM (RGB, 4 frame(s))" in line for line in lines)
    assert any("series" in line and "colour DICOM" in line for line in lines)
    assert lines[-1].startswith("2 problem(s) in 2 of 2 items")
    error = refusal(mvfa_preprocessing(32, mask_key=None, volume=True), multi)
    assert str(error).startswith(f"{multi}: colour DICOM (RGB, 4 frame(s)) in a volume") and "single-frame" in str(error)


# ----------------------------------------------------------------------------- MONOCHROME1


@pytest.mark.parametrize(
    ("dtype", "bits", "signed", "rescale"),
    [
        (np.uint16, 12, False, None),  # stored values, 0..4095
        (np.uint8, 8, False, None),  # 8-bit: divided by 255, so the inversion must use 255
        (np.int16, 16, True, (2.0, -1024.0)),  # signed, rescaled to modality values
    ],
)
def test_monochrome1_reads_as_the_inverted_monochrome2(tmp_path, tiny_detector, dtype, bits, signed, rescale):
    rng = np.random.default_rng(0)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    y, x = np.mgrid[:36, :44]
    smooth = 0.2 + 0.5 * np.exp(-((y - 15) ** 2 + (x - 25) ** 2) / 60.0) + 0.1 * rng.random((36, 44))
    stored = np.rint(lo + smooth * (hi - lo)).astype(dtype)
    mono1 = write_dicom(tmp_path / "mono1.dcm", stored, "MONOCHROME1", bits, signed, rescale)
    mono2 = write_dicom(tmp_path / "mono2.dcm", (lo + hi - stored.astype(np.int64)).astype(dtype), "MONOCHROME2", bits, signed, rescale)
    as_stored = write_dicom(tmp_path / "same_values.dcm", stored, "MONOCHROME2", bits, signed, rescale)

    preprocess = mvfa_preprocessing(tiny_detector.image_size, mask_key=None, volume=True)
    inverted, expected, plain = (preprocess({"image": str(path)})["image"] for path in (mono1, mono2, as_stored))
    assert torch.equal(inverted.as_tensor(), expected.as_tensor())
    # the same stored values read as MONOCHROME2 are the negative picture
    torch.testing.assert_close(inverted.as_tensor(), 1 - plain.as_tensor(), atol=1e-5, rtol=0)

    first, second = predict_input(tiny_detector, mono1), predict_input(tiny_detector, mono2)
    assert first.score == second.score
    np.testing.assert_array_equal(first.anomaly_map, second.anomaly_map)


# ----------------------------------------------------------------------------- NIfTI data


def test_nifti_with_nan_or_infinity_is_refused_naming_non_finite(tmp_path):
    volume = np.random.default_rng(0).random((12, 10, 6)).astype(np.float32)
    clean = tmp_path / "clean.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), clean)
    with_nan, with_inf = volume.copy(), volume.copy()
    with_nan[3, 4, 2] = np.nan
    with_inf[0, 0, 5] = -np.inf
    nib.save(nib.Nifti1Image(with_nan, np.eye(4)), tmp_path / "nan.nii.gz")
    nib.save(nib.Nifti1Image(with_inf, np.eye(4)), tmp_path / "inf.nii")
    assert check_volume(clean) == []
    lines = problems_of([{"image": str(tmp_path / name)} for name in ("clean.nii.gz", "nan.nii.gz", "inf.nii")], volumes=True)
    assert any("nan.nii.gz" in line and "non-finite values (NaN or infinity)" in line for line in lines)
    assert any("inf.nii" in line and "non-finite values (NaN or infinity)" in line for line in lines)
    assert not any("clean.nii.gz" in line for line in lines)


def test_truncated_nifti_is_refused_before_the_run_naming_the_file(tmp_path):
    volume = np.random.default_rng(0).random((32, 32, 16)).astype(np.float32)  # noise: gzip cannot shrink it
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    nib.save(nib.Nifti1Image(volume, np.eye(4)), inputs / "whole.nii.gz")
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "cut.nii.gz")
    raw = (tmp_path / "cut.nii.gz").read_bytes()
    (inputs / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "cut.nii")
    (inputs / "cut_plain.nii").write_bytes((tmp_path / "cut.nii").read_bytes()[:20000])
    # the header is intact: only reading the data finds the cut
    assert nib.load(inputs / "cut.nii.gz").shape == volume.shape
    with gzip.open(inputs / "cut.nii.gz") as handle:
        assert len(handle.read(400)) == 400

    found = list_inputs(inputs)  # what inference does first, then these checks: before any scoring
    assert found.kind == "volume" and len(found.paths) == 3
    lines = problems_of([{"image": path} for path in found.paths], volumes=True)
    assert any("cut.nii.gz" in line and "truncated" in line for line in lines)
    assert any("cut_plain.nii" in line and "truncated" in line for line in lines)
    assert not any("whole.nii.gz" in line for line in lines)
    assert lines[-1].startswith("2 problem(s) in 2 of 3 items")


# ----------------------------------------------------------------------------- datalists


def test_duplicate_datalist_entries_are_refused_or_left_out(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((8, 8), 100 if name == "a.png" else 200, np.uint8)).save(folder / name)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "mask.png")
    os.symlink(folder / "a.png", tmp_path / "link.png")
    items = [
        {"image": str(folder / "a.png"), "label": 0},
        {"image": str(folder / "b.png"), "label": 1},
        {"image": str(folder / ".." / "images" / "a.png"), "label": 0},  # the same file, spelled otherwise
        {"image": str(tmp_path / "link.png"), "label": 0},  # and through a link
        {"image": str(folder / "b.png"), "label": 1},
        {"image": str(folder / "b.png"), "mask": str(folder / "mask.png"), "label": 1},  # another entry: with a mask
    ]
    lines = problems_of(items)
    assert sum("duplicate of item 0 (same file, " in line for line in lines) == 2
    assert any(line.strip().startswith(str(folder / "b.png")) and "duplicate of item 1" in line for line in lines)
    assert lines[-1].startswith("3 problem(s) in 3 of 6 items")

    kept = check_items(items, on_error="skip", report_dir=tmp_path / "report")
    assert kept == [items[0], items[1], items[5]]  # the first of each entry kept
    assert (tmp_path / "report" / "data_problems.csv").read_text().count("duplicate of item") == 3
    assert check_items(kept) == kept


def test_bmad_test_split_without_one_class_is_refused_before_evaluation(tmp_path):
    write_dataset(tmp_path, "Alpha", masks=True, seed=0, size=16, counts={"valid": (2, 0), "test": (3, 0)})
    with pytest.raises(ValueError) as raised:
        target_datalist(tmp_path, "Alpha", "test")
    message = str(raised.value)
    assert str(tmp_path / "Alpha_AD" / "test" / "Ungood" / "img") in message
    assert "no abnormal images" in message and "both classes" in message and "\n" not in message
    assert len(target_datalist(tmp_path, "Alpha", "valid")) == 2  # normal-only support pools stay fine

    write_dataset(tmp_path, "Beta", masks=False, seed=1, size=16, counts={"test": (0, 2)})
    with pytest.raises(ValueError, match=r"Beta_AD/test/good/img: no normal images in the test split of 'Beta'"):
        target_datalist(tmp_path, "Beta", "test")
    write_dataset(tmp_path, "Gamma", masks=False, seed=2, size=16, counts={"test": (2, 2)})
    assert [item["label"] for item in target_datalist(tmp_path, "Gamma", "test")] == [0, 0, 1, 1]


# ----------------------------------------------------------------------------- sizes


def test_image_with_a_side_over_the_nifti_limit_is_refused_before_scoring(tmp_path):
    wide = tmp_path / "wide.png"
    Image.new("L", (100000, 2), 128).save(wide)
    lines = problems_of([{"image": str(wide)}], volumes=True)
    assert any("wide.png" in line and "100000" in line and str(MAX_SIDE) in line for line in lines)
    # the pipeline refuses it too (for Python callers that skip the checks), before decoding it
    error = refusal(mvfa_preprocessing(32, mask_key=None), wide)
    assert str(error).startswith(f"{wide}: size 2 x 100000 has a side over {MAX_SIDE} pixels")
    # volumes: NIfTI-2 allows larger sides than the map's NIfTI-1 header holds
    long = tmp_path / "long.nii"
    nib.save(nib.Nifti2Image(np.ones((MAX_SIDE + 1, 2, 2), np.uint8), np.eye(4)), long)
    assert any(str(MAX_SIDE) in reason for reason in check_volume(long))


def test_images_over_the_pixel_limit_are_refused_naming_the_limit(tmp_path, monkeypatch):
    Image.new("RGB", (30, 20)).save(tmp_path / "big.png")
    write_dicom(tmp_path / "big.dcm", colour_picture(20, 30), "RGB")
    monkeypatch.setattr(medad.io.transforms, "MAX_IMAGE_PIXELS", 500)
    lines = problems_of([{"image": str(tmp_path / "big.png")}, {"image": str(tmp_path / "big.dcm")}])
    for name in ("big.png", "big.dcm"):
        assert any(name in line and "600 pixels, over medad's limit of 500" in line for line in lines), lines
    assert "MAX_IMAGE_PIXELS" in str(refusal(mvfa_preprocessing(8, mask_key=None), tmp_path / "big.png"))


def test_large_images_are_shrunk_before_the_resize_and_mapped_back_to_their_size(tmp_path):
    rows, columns, size = 600, 240, 8  # 75 and 30 times the model's size
    y, x = np.mgrid[:rows, :columns]
    picture = 0.5 + 0.3 * np.sin(x / 40.0) * np.cos(y / 70.0)
    path = tmp_path / "large.png"
    Image.fromarray(np.rint(picture * 255).astype(np.uint8)).save(path)
    shrunk, _ = shrink_for_resize(torch.rand(1, rows, columns), (size, size))
    assert shrunk.shape == (1, 34, 35)  # blocks of 18 x 7 (factor // 4), the last ones partial

    preprocess = mvfa_preprocessing(size, mask_key=None)
    image = preprocess({"image": str(path)})["image"]
    assert image.shape == (3, size, size) and input_size(image) == (rows, columns)
    # close to MONAI's anti-aliased resize of the whole image (the old, slow path), as smooth
    from monai.transforms import Resize

    stored = torch.as_tensor(np.rint(picture * 255) / 255, dtype=torch.float32)[None]
    direct = torch.as_tensor(Resize((size, size), mode="bicubic", anti_aliasing=True)(stored)[0]).clamp(0, 1)
    difference = (image[0].as_tensor() - direct).abs()
    assert float(difference.max()) < 0.05 and float(difference.mean()) < 0.015
    # the map goes back to the file's own grid, with the file's geometry
    pred = image[:1].clone()
    restored = MapToInputGridd(keys="pred", transform=preprocess, orig_keys="image", nearest_interp=False)(
        {"image": image, "pred": pred}
    )["pred"]
    assert restored.shape == (1, columns, rows)  # the grid MONAI's LoadImage reads the file on
    np.testing.assert_allclose(np.asarray(restored.affine), np.eye(restored.affine.shape[0]), atol=1e-6)
