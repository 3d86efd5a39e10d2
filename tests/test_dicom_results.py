"""DICOM result objects for DICOM inputs (medad.io.dicom_results): Parametric Map, SEG, TID 1500
SR and Secondary Capture built on synthetic sources (a CT-like series, a 2D grayscale and a 2D
colour secondary capture, a legacy converted enhanced CT), written, checked with dciodvfy where it
is installed (dicom3tools), read back; and the geometry from MONAI's grid of the input (medad's
real reading path) to DICOM frames, checked with pixel values that name their instance, row and
column."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

import pydicom  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402
from pydicom.valuerep import DSfloat  # noqa: E402

import medad  # noqa: E402
from medad.io import dicom_results as dr  # noqa: E402
from medad.io.outputs import MapToInputGridd  # noqa: E402
from medad.io.transforms import mvfa_preprocessing  # noqa: E402

ROWS, COLUMNS, SLICES = 32, 28, 8
MODEL = {"method": "mvfa", "backbone": {"model_name": "ViT-L-14-336", "image_size": 240}, "target": "Liver"}
# the CT window that maps every code (stored value) linearly into [0, 1] without clipping
WINDOW = (4000.0, 12000.0)


def _ds(values) -> list:
    return [DSfloat(float(v), auto_format=True) for v in values]


def _patient_and_study(ds: Dataset, study: str) -> None:
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Test", "PHANTOM-1", "19700101", "O"
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = study, "20260101", "120000"
    ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = "ACC1", "STUDY1", ""


def codes_of(k: int) -> np.ndarray:
    """Pixel codes of slice ``k``: every pixel of the series has its own value (1 + index), so a
    value read anywhere names its instance, row and column."""
    return (1 + k * ROWS * COLUMNS + np.arange(ROWS * COLUMNS).reshape(ROWS, COLUMNS)).astype(np.uint16)


def ct_series(folder: Path, row_direction=(0.0, 1.0, 0.0), column_direction=(0.0, 0.0, -1.0)) -> list[Dataset]:
    """A CT series of SLICES slices of ROWS x COLUMNS (one file each, written to ``folder``) with an
    unusual orientation (sagittal by default), anisotropic spacing, descending positions along the
    normal for increasing instance numbers and file names that do not follow either."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    normal = np.cross(row_direction, column_direction)
    sources = []
    for k in range(SLICES):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        _patient_and_study(ds, study)
        ds.SeriesInstanceUID, ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = series, frame, ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.AcquisitionNumber = "CT", 1, k + 1, 1
        ds.Manufacturer, ds.KVP = "Synthetic", 120
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = _ds((*row_direction, *column_direction))
        ds.ImagePositionPatient = _ds(np.array([12.5, -40.0, 75.0]) - k * 2.5 * normal)
        ds.PixelSpacing, ds.SliceThickness = _ds((0.7, 0.9)), DSfloat(2.5, auto_format=True)
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = ROWS, COLUMNS, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, -1024, "HU"
        ds.PixelData = codes_of(k).tobytes()
        ds.save_as(folder / f"{(k * 5) % SLICES:02d}_{ds.SOPInstanceUID[-6:]}.dcm", enforce_file_format=True)
        sources.append(ds)
    return sources


def sc_image(path: Path, colour: bool = False) -> Dataset:
    """A 2D secondary capture (no plane geometry, no frame of reference), grayscale or RGB."""
    rng = np.random.default_rng(3)
    study = generate_uid()
    ref = Dataset()
    _patient_and_study(ref, study)
    pixels = rng.integers(0, 256, (ROWS, COLUMNS, 3) if colour else (ROWS, COLUMNS), dtype=np.uint8)
    if not colour:
        pixels = (1 + np.arange(ROWS * COLUMNS).reshape(ROWS, COLUMNS) % 250).astype(np.uint8)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref, pixel_array=pixels, photometric_interpretation="RGB" if colour else "MONOCHROME2",
        bits_allocated=8, coordinate_system="PATIENT", series_instance_uid=generate_uid(), series_number=1,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="Synthetic", patient_orientation=("L", "F"),
    )
    sc.Modality = "OT"
    sc.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def validate(path: Path) -> list[str]:
    """dciodvfy's report on ``path``: fails on any line starting with "Error"; skips without it."""
    binary = shutil.which("dciodvfy")
    if binary is None:
        pytest.skip("dciodvfy (dicom3tools: apt-get install dicom3tools) is not installed")
    result = subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=120)
    lines = (result.stdout + result.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    assert not errors, f"dciodvfy {path.name}:\n" + "\n".join(lines)
    return lines


def preprocessed(path: Path):
    """The input as the bundle reads volumes (mvfa_preprocessing(volume=True), a fixed window) and
    the preprocessing (to put maps back on the input's grid as predict_input does)."""
    preprocessing = mvfa_preprocessing(240, mask_key=None, volume=True, window=list(WINDOW))
    return preprocessing({"image": str(path)})["image"], preprocessing


def decoded(values) -> np.ndarray:
    """Codes back from windowed intensities (value * width + low = code + intercept)."""
    low = WINDOW[0] - WINDOW[1] / 2
    return np.rint(np.asarray(values, dtype=np.float64) * WINDOW[1] + low).astype(np.int64)


def on_input_grid(image, preprocessing, values: np.ndarray):
    """``values`` on the preprocessed grid put back on the input's own grid, as predict_input does
    (MapToInputGridd): the map on MONAI's grid of the input, with its affine."""
    from monai.utils import convert_to_dst_type
    import torch

    pred = convert_to_dst_type(torch.as_tensor(values, dtype=torch.float32)[None], image)[0]
    restored = MapToInputGridd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=True)(
        {"image": image, "pred": pred}
    )["pred"]
    return restored


def walk(items):
    for item in items:
        yield item
        yield from walk(item.get("ContentSequence", []))


def sr_items(ds) -> dict[str, list]:
    """The report's content items by concept name code value: numbers, codes and texts."""
    found: dict[str, list] = {}
    for item in walk(ds.ContentSequence):
        if "ConceptNameCodeSequence" not in item:
            continue
        code = item.ConceptNameCodeSequence[0].CodeValue
        if item.ValueType == "NUM":
            value = float(item.MeasuredValueSequence[0].NumericValue)
        elif item.ValueType == "CODE":
            value = (item.ConceptCodeSequence[0].CodeValue, item.ConceptCodeSequence[0].CodingSchemeDesignator)
        elif item.ValueType == "TEXT":
            value = item.TextValue
        else:
            value = item.ValueType
        found.setdefault(code, []).append(value)
    return found


def frame_sources(ds) -> list[str]:
    """The source SOP instance each frame of a PM or SEG was derived from."""
    return [
        str(group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        for group in ds.PerFrameFunctionalGroupsSequence
    ]


def assert_common(ds, sources, derived: bool = True) -> None:
    """References to the sources' study, series, patient and frame of reference, the algorithm and the
    research-only markers."""
    first = sources[0]
    assert ds.StudyInstanceUID == first.StudyInstanceUID and ds.PatientID == first.PatientID
    assert ds.SeriesInstanceUID != first.SeriesInstanceUID and ds.SOPInstanceUID not in {s.SOPInstanceUID for s in sources}
    if "FrameOfReferenceUID" in first and derived:
        assert ds.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert medad.__version__ in list(np.atleast_1d(ds.SoftwareVersions))
    assert dr.RESEARCH_ONLY in ds.SeriesDescription or "research" in ds.SeriesDescription
    if derived:
        assert ds.ImageType[0] == "DERIVED"
        referenced = {str(item.SeriesInstanceUID) for item in ds.ReferencedSeriesSequence}
        assert referenced == {str(first.SeriesInstanceUID)}
        instances = {str(i.ReferencedSOPInstanceUID) for item in ds.ReferencedSeriesSequence for i in item.ReferencedInstanceSequence}
        assert instances == {str(s.SOPInstanceUID) for s in sources}


# --------------------------------------------------------------------------------------------
# geometry


def test_series_geometry_from_monai_grid(tmp_path):
    """Every pixel of the series read through medad's volume path comes back to its own instance,
    row and column, from the input's grid (as saved maps are) and from the reoriented grid."""
    sources = ct_series(tmp_path / "series")
    image, preprocessing = preprocessed(tmp_path / "series")
    assert image.shape[1:] != (ROWS, COLUMNS, SLICES)  # reoriented: a sagittal series sliced axially
    codes = {str(ds.SOPInstanceUID): codes_of(ds.InstanceNumber - 1).astype(np.int64) for ds in sources}
    restored = on_input_grid(image, preprocessing, image[0].numpy())
    for grid in (restored[0], image[0]):  # the input's grid (MapToInputGridd) and the preprocessed one
        frames, ordered = dr.map_to_frames(list(reversed(sources)), grid.numpy(), grid.affine.numpy())
        assert frames.shape == (SLICES, ROWS, COLUMNS)
        for frame, ds in zip(frames, ordered):
            np.testing.assert_array_equal(decoded(frame) + 1024, codes[str(ds.SOPInstanceUID)])
        positions = [np.dot(np.cross([0, 1, 0], [0, 0, -1]), np.asarray(ds.ImagePositionPatient, float)) for ds in ordered]
        assert positions == sorted(positions)  # frames sorted along the slice normal
    # a MetaTensor carries its own affine and space
    frames, _ = dr.map_to_frames(sources, restored[0])
    assert frames.shape == (SLICES, ROWS, COLUMNS)


def test_marker_lands_on_its_instance_row_and_column(tmp_path):
    sources = ct_series(tmp_path / "series", row_direction=(1.0, 0.0, 0.0), column_direction=(0.0, 1.0, 0.0))
    image, preprocessing = preprocessed(tmp_path / "series")
    marker = np.zeros(image.shape[1:], dtype=np.float32)
    voxel = (5, 20, 6)
    marker[voxel] = 1.0
    code = int(decoded(image[0][voxel]) + 1024)  # which source pixel the voxel holds
    k, rest = divmod(code - 1, ROWS * COLUMNS)
    row, column = divmod(rest, COLUMNS)
    restored = on_input_grid(image, preprocessing, marker)[0]
    frames, ordered = dr.map_to_frames(sources, restored.numpy(), restored.affine.numpy(), space="RAS")
    (f,), (r,), (c,) = np.nonzero(frames)
    assert (ordered[f].InstanceNumber - 1, r, c) == (k, row, column)


def test_two_dimensional_sources(tmp_path):
    """A grayscale SC runs as a one-slice volume (its 2D map with an affine over pixel indices); a
    colour SC as a 2D image whose Prediction map is (rows, columns) without an affine."""
    gray = sc_image(tmp_path / "gray.dcm")
    image, preprocessing = preprocessed(tmp_path / "gray.dcm")
    restored = on_input_grid(image, preprocessing, image[0].numpy())[0]
    two_d = restored.numpy()[..., 0]  # as Prediction drops a one-slice input's slice axis
    frames, _ = dr.map_to_frames([gray], two_d, restored.affine.numpy())
    np.testing.assert_array_equal(decoded(frames[0]), gray.pixel_array.astype(np.int64))
    colour = sc_image(tmp_path / "colour.dcm", colour=True)
    values = np.random.default_rng(0).random((ROWS, COLUMNS)).astype(np.float32)
    frames, _ = dr.map_to_frames([colour], values)
    np.testing.assert_array_equal(frames[0], values)
    with pytest.raises(dr.DicomResultError, match="colour.dcm.*expected"):
        dr.map_to_frames([colour], values.T)


def test_multiframe_geometry(tmp_path):
    sources = ct_series(tmp_path / "series")
    multi = hd.legacy.LegacyConvertedEnhancedCTImage(
        sources, series_instance_uid=generate_uid(), series_number=2, sop_instance_uid=generate_uid(), instance_number=1
    )
    multi.save_as(tmp_path / "multi.dcm", enforce_file_format=True)
    multi = pydicom.dcmread(tmp_path / "multi.dcm")
    image, preprocessing = preprocessed(tmp_path / "multi.dcm")
    restored = on_input_grid(image, preprocessing, image[0].numpy())[0]
    frames, (source,) = dr.map_to_frames([multi], restored.numpy(), restored.affine.numpy())
    # MONAI's reader applies no rescale from the functional groups: the stored codes come back as they are
    np.testing.assert_array_equal(decoded(frames), multi.pixel_array.astype(np.int64))
    # without an affine the map is taken in frame order
    frames, _ = dr.map_to_frames([multi], multi.pixel_array.astype(np.float32))
    np.testing.assert_array_equal(frames, multi.pixel_array)


def test_refusals_name_the_file(tmp_path):
    sources = ct_series(tmp_path / "series")
    read = dr.read_sources(tmp_path / "series")
    image, _ = preprocessed(tmp_path / "series")
    with pytest.raises(dr.DicomResultError, match="needs its affine"):
        dr.map_to_frames(read, image[0].numpy())
    shifted = image.affine.numpy().copy()
    shifted[:3, 3] += 0.4 * shifted[:3, 0]
    with pytest.raises(dr.DicomResultError, match=r"\.dcm: its pixels do not fall on the map's voxel centres"):
        dr.map_to_frames(read, image[0].numpy(), shifted)
    with pytest.raises(dr.DicomResultError, match="outside the map"):
        dr.map_to_frames(read, image[0].numpy()[:, :, :-1], image.affine.numpy())
    other = ct_series(tmp_path / "other")
    with pytest.raises(dr.DicomResultError, match="(Study|Series)InstanceUID .* differs from"):
        dr.map_to_frames([*sources[:2], other[0]], image[0].numpy(), image.affine.numpy())
    gray = sc_image(tmp_path / "gray.dcm")
    second = sc_image(tmp_path / "gray2.dcm")
    second.StudyInstanceUID, second.SeriesInstanceUID = gray.StudyInstanceUID, gray.SeriesInstanceUID
    with pytest.raises(dr.DicomResultError, match=r"gray2?\.dcm: a series of 2 images without ImagePositionPatient"):
        dr.map_to_frames([gray, second], np.zeros((ROWS, COLUMNS, 2)), np.eye(4))


# --------------------------------------------------------------------------------------------
# the objects, written, validated and read back


@pytest.fixture()
def series(tmp_path):
    ct_series(tmp_path / "series")
    sources = dr.read_sources(tmp_path / "series")
    image, preprocessing = preprocessed(tmp_path / "series")
    rng = np.random.default_rng(1)
    values = rng.random(image.shape[1:]).astype(np.float32) * 0.8 + 0.1
    anomaly_map = on_input_grid(image, preprocessing, values)[0]
    return sources, anomaly_map


def test_parametric_map(series, tmp_path):
    sources, anomaly_map = series
    pm = dr.parametric_map(sources, anomaly_map, model=MODEL)
    path = dr.write_dataset(pm, tmp_path / "out" / "map.dcm")
    validate(path)
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary file left
    ds = pydicom.dcmread(path)
    expected, ordered = dr.map_to_frames(sources, anomaly_map)
    by_uid = {str(s.SOPInstanceUID): frame for s, frame in zip(ordered, expected)}
    pixels = ds.pixel_array
    assert pixels.dtype == np.float32 and pixels.shape == expected.shape and "FloatPixelData" in ds
    for frame, uid in zip(pixels, frame_sources(ds)):
        np.testing.assert_array_equal(frame, by_uid[uid])  # float32: exact
    mapping = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == "1"
    assert mapping.MeasurementUnitsCodeSequence[0].CodingSchemeDesignator == "UCUM"
    assert float(mapping.RealWorldValueSlope) == 1.0 and float(mapping.RealWorldValueIntercept) == 0.0
    low = mapping.get("DoubleFloatRealWorldValueFirstValueMapped", mapping.get("RealWorldValueFirstValueMapped"))
    high = mapping.get("DoubleFloatRealWorldValueLastValueMapped", mapping.get("RealWorldValueLastValueMapped"))
    assert float(low) == pytest.approx(float(expected.min())) and float(high) == pytest.approx(float(expected.max()))
    assert ds.ContentQualification == "RESEARCH" and ds.ContentLabel == "ANOMALY"
    assert_common(ds, sources)


def test_segmentation(series, tmp_path):
    sources, anomaly_map = series
    label = (anomaly_map.numpy() > 0.85).astype(np.uint8)
    frames, ordered = dr.map_to_frames(sources, label, anomaly_map.affine.numpy())
    frames[[1, 4]] = 0  # two slices without anomaly, which the SEG leaves out
    label = on_input_grid_of(anomaly_map, frames, sources)
    seg = dr.segmentation(sources, label, anomaly_map.affine.numpy(), model=MODEL, threshold=0.85, rule="given")
    path = dr.write_dataset(seg, tmp_path / "seg.dcm")
    validate(path)
    ds = pydicom.dcmread(path)
    by_uid = {str(s.SOPInstanceUID): frame for s, frame in zip(ordered, frames)}
    kept = frame_sources(ds)
    assert set(kept) == {uid for uid, frame in by_uid.items() if frame.any()}
    assert {str(ordered[1].SOPInstanceUID), str(ordered[4].SOPInstanceUID)}.isdisjoint(kept) and len(kept) == SLICES - 2
    read = hd.seg.segread(path)
    for frame, uid in zip(read.pixel_array if read.pixel_array.ndim == 3 else read.pixel_array[None], kept):
        np.testing.assert_array_equal(frame, by_uid[uid])
    segment = ds.SegmentSequence[0]
    assert segment.SegmentLabel == "anomaly" and segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmVersion == medad.__version__ and algorithm.AlgorithmName == "medad mvfa"
    parameters = algorithm.AlgorithmParameters
    assert "ViT-L-14-336" in parameters and "Liver" in parameters and "given" in parameters and "0.85" in parameters
    assert ds.SegmentationType == "BINARY"
    assert_common(ds, sources)


def on_input_grid_of(anomaly_map, frames: np.ndarray, sources) -> np.ndarray:
    """``frames`` (in map_to_frames' order) written back onto the map's grid: the inverse lookup,
    to build a label with chosen empty slices."""
    label = np.zeros(anomaly_map.shape, dtype=np.uint8)
    index = np.arange(label.size, dtype=np.float64).reshape(label.shape)
    where, _ = dr.map_to_frames(sources, index, anomaly_map.affine.numpy())
    label.reshape(-1)[where.astype(np.int64).reshape(-1)] = frames.reshape(-1)
    return label


def test_empty_segmentation_keeps_one_frame(series, tmp_path):
    sources, anomaly_map = series
    seg = dr.segmentation(sources, np.zeros(anomaly_map.shape, np.uint8), anomaly_map.affine.numpy(), model=MODEL)
    path = dr.write_dataset(seg, tmp_path / "seg.dcm")
    validate(path)
    ds = pydicom.dcmread(path)
    assert int(ds.NumberOfFrames) >= 1 and not ds.pixel_array.any()


def test_structured_report(series, tmp_path):
    sources, anomaly_map = series
    pm = dr.parametric_map(sources, anomaly_map, model=MODEL)
    report = dr.structured_report(
        sources, score=0.734, anomalous=True, threshold=0.5, rule="support_f1", model=MODEL, p_value=0.02, evidence=[pm]
    )
    path = dr.write_dataset(report, tmp_path / "report.dcm")
    validate(path)
    ds = pydicom.dcmread(path)
    items = sr_items(ds)
    assert items[dr.ANOMALY_SCORE[0]] == [pytest.approx(0.734)]
    assert items[dr.ANOMALY_THRESHOLD[0]] == [pytest.approx(0.5)]
    assert items["ANOM_P_VALUE"] == [pytest.approx(0.02)]
    assert items[dr.ANOMALY_DECISION[0]] == [("263654008", "SCT")]  # SNOMED CT "Abnormal"
    texts = [text for values in items.values() for text in values if isinstance(text, str)]
    assert "image threshold rule: support_f1" in texts and f"intended use: {dr.RESEARCH_ONLY}" in texts
    assert "method: mvfa" in texts and "target: Liver" in texts
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert ds.StudyInstanceUID == sources[0].StudyInstanceUID and ds.PatientID == sources[0].PatientID
    evidence = {
        str(series.SeriesInstanceUID): {str(i.ReferencedSOPInstanceUID) for i in series.ReferencedSOPSequence}
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
    }
    assert evidence[str(sources[0].SeriesInstanceUID)] == {str(s.SOPInstanceUID) for s in sources}
    assert evidence[str(pm.SeriesInstanceUID)] == {str(pm.SOPInstanceUID)}
    assert ds.VerificationFlag == "UNVERIFIED" and medad.__version__ in ds.SoftwareVersions
    assert dr.RESEARCH_ONLY.split(",")[0] in ds.SeriesDescription
    normal = dr.structured_report(sources, 0.1, False, 0.5, "given", model=MODEL)
    assert sr_items(normal)[dr.ANOMALY_DECISION[0]] == [("17621005", "SCT")]  # "Normal"
    parsed = hd.sr.srread(path)  # highdicom parses it as a measurement report
    groups = parsed.content.get_image_measurement_groups()
    assert len(groups) == 1 and groups[0].get_measurements()[0].value == pytest.approx(0.734)


def test_secondary_capture(series, tmp_path):
    sources, _ = series
    overlay = np.random.default_rng(2).random((40, 60, 3))
    sc = dr.secondary_capture(sources, overlay, model=MODEL)
    path = dr.write_dataset(sc, tmp_path / "overlay.dcm")
    validate(path)
    ds = pydicom.dcmread(path)
    np.testing.assert_array_equal(ds.pixel_array, (overlay * 255).round().astype(np.uint8))
    assert ds.PhotometricInterpretation == "RGB" and ds.BurnedInAnnotation == "YES"
    assert {str(i.ReferencedSOPInstanceUID) for i in ds.SourceImageSequence} == {str(s.SOPInstanceUID) for s in sources}
    assert_common(ds, sources, derived=False)
    assert ds.ImageType[0] == "DERIVED"


@pytest.mark.parametrize("plane, orientation", [("axial", ["L", "P"]), ("sagittal", ["P", "F"])])
def test_bundle_stores_its_overlay_as_secondary_capture(tiny_detector, tmp_path, plane, orientation):
    """SaveDicomResultsd(secondary_capture=True) chained as configs/inference.json chains it, after
    SaveOverlayd and MapToInputGridd: the overlay PNG's pixels as a Secondary Capture beside the
    other objects, valid (dciodvfy), with the result UIDs of its kind and the orientation of the
    strip's panels; refused without the overlay folder or the overlay."""
    import torch
    from monai.utils import convert_to_dst_type
    from PIL import Image

    from medad.io.files import content_sha256
    from medad.io.outputs import SaveOverlayd

    ct_series(tmp_path / "series")
    sources = dr.read_sources(tmp_path / "series")
    preprocessing = mvfa_preprocessing(240, mask_key=None, volume=True, window=list(WINDOW), slice_plane=plane)
    image = preprocessing({"image": str(tmp_path / "series")})["image"]
    values = np.random.default_rng(5).random(image.shape[1:]).astype(np.float32)
    data = {"image": image, "pred": convert_to_dst_type(torch.as_tensor(values)[None], image)[0], "score": torch.tensor([0.7])}
    data = SaveOverlayd("pred", tmp_path / "overlays", value_range=(0.0, 1.0), threshold=0.5, pixel_threshold=0.6)(data)
    data = MapToInputGridd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=False)(data)
    model = tmp_path / "model.pt"
    model.write_bytes(b"a model file")  # only its SHA-256 keys the UIDs
    save = dr.SaveDicomResultsd("pred", tmp_path / "dicom", tiny_detector, model, output_format="dicom",
                                secondary_capture=True, overlay_dir=tmp_path / "overlays", slice_plane=plane)
    save(data)

    folder = tmp_path / "dicom" / "series"
    assert sorted(p.name for p in folder.iterdir()) == sorted([*dr.RESULT_FILES.values(), dr.OVERLAY_FILE])
    validate(folder / dr.OVERLAY_FILE)
    ds = pydicom.dcmread(folder / dr.OVERLAY_FILE)
    with Image.open(tmp_path / "overlays" / "series_overlay.png") as png:
        np.testing.assert_array_equal(ds.pixel_array, np.asarray(png.convert("RGB")))
    assert list(ds.PatientOrientation) == orientation
    uids = dr.result_uids(sources, content_sha256(model), "secondary_capture")
    assert (ds.SeriesInstanceUID, ds.SOPInstanceUID) == (uids["series_instance_uid"], uids["sop_instance_uid"])
    assert ds.StudyInstanceUID == sources[0].StudyInstanceUID and ds.BurnedInAnnotation == "YES"
    assert {str(i.ReferencedSOPInstanceUID) for i in ds.SourceImageSequence} == {str(s.SOPInstanceUID) for s in sources}

    with pytest.raises(ValueError, match="secondary_capture needs overlay_dir"):
        dr.SaveDicomResultsd("pred", tmp_path / "dicom", tiny_detector, model, output_format="dicom", secondary_capture=True)
    (tmp_path / "overlays" / "series_overlay.png").unlink()
    with pytest.raises(dr.DicomResultError, match=r"series_overlay\.png: no overlay to store as a Secondary Capture"):
        save(data)


@pytest.mark.parametrize("case", ["no_orientation", "oblique"])
def test_secondary_capture_of_sources_highdicom_cannot_orient(tmp_path, case):
    """PatientOrientation values highdicom's single-letter enumeration refuses but DICOM allows:
    empty (type 2) for a source that has none, and an oblique slice's letter pairs, derived here by
    hand from a 30 degree rotation in the axial plane (rows towards left and posterior, columns
    towards posterior and right)."""
    if case == "no_orientation":
        source = sc_image(tmp_path / "input.dcm")
        del source.PatientOrientation
        expected = ""
    else:
        ct_series(tmp_path / "series")
        source = dr.read_sources(sorted((tmp_path / "series").iterdir())[:1])[0]
        c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
        source.ImageOrientationPatient = [DSfloat(v, auto_format=True) for v in (c, s, 0.0, -s, c, 0.0)]
        expected = ["LP", "PR"]
    sc = dr.secondary_capture([source], np.zeros((ROWS, COLUMNS, 3), np.uint8), model=MODEL)
    path = dr.write_dataset(sc, tmp_path / "sc.dcm")
    validate(path)
    ds = pydicom.dcmread(path)
    assert (ds.PatientOrientation if expected == "" else list(ds.PatientOrientation)) == expected


@pytest.mark.parametrize("kind", ["gray", "colour", "ct_slice"])
def test_two_dimensional_objects(tmp_path, kind):
    """2D sources: a grayscale and a colour secondary capture (no frame of reference) and a single
    CT slice; their maps (rows, columns) as Prediction gives a 2D image's."""
    if kind == "ct_slice":
        ct_series(tmp_path / "series")
        source = dr.read_sources(sorted((tmp_path / "series").iterdir())[:1])[0]
    else:
        source = sc_image(tmp_path / "input.dcm", colour=kind == "colour")
    values = np.random.default_rng(4).random((ROWS, COLUMNS)).astype(np.float32)
    values[:10] = 0.0  # rows without anomaly
    label = (values > 0.5).astype(np.uint8)
    objects = {
        "seg": dr.segmentation([source], label, model=MODEL, threshold=0.5, rule="given"),
        "sr": dr.structured_report([source], 0.9, True, 0.5, "given", model=MODEL),
        "sc": dr.secondary_capture([source], np.zeros((ROWS, COLUMNS, 3), np.uint8), model=MODEL),
    }
    if kind == "ct_slice":
        objects["pm"] = dr.parametric_map([source], values, model=MODEL)
    else:  # highdicom 0.28 builds no Parametric Map of an image without a frame of reference
        with pytest.raises(dr.DicomResultError, match=r"input\.dcm: highdicom .* Parametric Map .*frame of reference"):
            dr.parametric_map([source], values, model=MODEL)
    for name, dataset in objects.items():
        path = dr.write_dataset(dataset, tmp_path / f"{name}.dcm")
        validate(path)
        ds = pydicom.dcmread(path)
        assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.PatientID
        if name == "pm":
            np.testing.assert_array_equal(ds.pixel_array.reshape(ROWS, COLUMNS), values)
            assert frame_sources(ds) == [str(source.SOPInstanceUID)]
            assert_common(ds, [source])
        if name == "seg":
            np.testing.assert_array_equal(ds.pixel_array.reshape(ROWS, COLUMNS), label)
            assert frame_sources(ds) == [str(source.SOPInstanceUID)]
            assert_common(ds, [source])


def test_multiframe_objects(tmp_path):
    sources = ct_series(tmp_path / "series")
    multi = hd.legacy.LegacyConvertedEnhancedCTImage(
        sources, series_instance_uid=generate_uid(), series_number=2, sop_instance_uid=generate_uid(), instance_number=1
    )
    values = np.random.default_rng(5).random((SLICES, ROWS, COLUMNS)).astype(np.float32)
    label = (values > 0.9).astype(np.uint8)
    label[2] = 0
    pm = dr.parametric_map([multi], values, model=MODEL)
    seg = dr.segmentation([multi], label, model=MODEL)
    report = dr.structured_report([multi], 0.3, False, 0.5, "given", model=MODEL)
    for name, dataset in {"pm": pm, "seg": seg, "sr": report}.items():
        validate(dr.write_dataset(dataset, tmp_path / f"{name}.dcm"))
    ds = pydicom.dcmread(tmp_path / "pm.dcm")
    np.testing.assert_array_equal(ds.pixel_array, values)
    ds = pydicom.dcmread(tmp_path / "seg.dcm")
    numbers = [int(g.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber) for g in ds.PerFrameFunctionalGroupsSequence]
    assert numbers == [k + 1 for k in range(SLICES) if label[k].any()]
    np.testing.assert_array_equal(ds.pixel_array, label[[n - 1 for n in numbers]])


def test_write_failure_names_the_path(series, tmp_path):
    sources, anomaly_map = series
    pm = dr.parametric_map(sources, anomaly_map, model=MODEL)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match=str(blocker / "map.dcm")):
        dr.write_dataset(pm, blocker / "map.dcm")
    broken = Dataset()
    broken.file_meta = FileMetaDataset()
    with pytest.raises(dr.DicomResultError, match="broken.dcm: cannot write"):
        dr.write_dataset(broken, tmp_path / "broken.dcm")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "series") == ["file"]


def test_model_description_and_missing_highdicom(monkeypatch, series):
    sources, anomaly_map = series
    description = medad.ModelDescription(backbone=medad.model.backbone.BackboneSpec("ViT-B-16", 224), levels=(6, 12), target="Brain")
    pm = dr.parametric_map(sources, anomaly_map, model=description)
    assert pm.ManufacturerModelName == "medad mvfa"
    assert dr._model_fields(description) == {"method": "mvfa", "backbone": "ViT-B-16 at 224 px", "target": "Brain"}
    monkeypatch.setitem(sys.modules, "highdicom", None)
    with pytest.raises(ImportError, match=r"pip install medad\[dicom\]"):
        dr.parametric_map(sources, anomaly_map)


def test_blank_map_and_non_finite_values(series, tmp_path):
    """A blank input's map (all zeros) still makes a valid Parametric Map; NaN is refused."""
    sources, anomaly_map = series
    zeros = np.zeros(anomaly_map.shape, np.float32)
    path = dr.write_dataset(dr.parametric_map(sources, zeros, anomaly_map.affine.numpy(), model=MODEL), tmp_path / "pm.dcm")
    validate(path)
    assert not pydicom.dcmread(path).pixel_array.any()
    zeros[0, 0, 0] = np.nan
    with pytest.raises(dr.DicomResultError, match="NaN or infinite"):
        dr.parametric_map(sources, zeros, anomaly_map.affine.numpy())
