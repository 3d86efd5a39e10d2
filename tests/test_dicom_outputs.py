"""DICOM outputs for DICOM inputs (issue 28): the bundle's inference with ``output_format``
``both`` and ``dicom`` on a synthetic CT-like series and a 2D DICOM image (a single axial slice),
run in this process with the shared tiny few-shot model; and :func:`medad.surfaces.predict.dicom_results`
on the same inputs. Each case gets a Parametric Map, a Segmentation and a TID 1500 SR that
dciodvfy accepts (where dicom3tools is installed), whose values are those of the NIfTI map and
scores.csv written beside them, with the same UIDs on a rerun; non-DICOM inputs and misspelt
values are refused before anything is scored."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pydicom")
pytest.importorskip("highdicom")

import nibabel as nib  # noqa: E402
import pydicom  # noqa: E402
from PIL import Image  # noqa: E402

import medad  # noqa: E402
from medad.io import dicom_results as dr  # noqa: E402
from medad.io.files import OUTPUT_MARKER  # noqa: E402
from medad.io.ledger import LEDGER_DIR  # noqa: E402
from medad.surfaces.predict import dicom_results, predict_input  # noqa: E402

from helpers import copy_bundle, run_bundle_here, run_bundle_in_process  # noqa: E402
from test_dicom_results import ct_series, frame_sources, sr_items, validate  # noqa: E402

OBJECTS = ("parametric_map", "segmentation", "report")
CASES = ("series", "slice")


def dicom_inputs(folder: Path) -> Path:
    """A folder of two DICOM cases: ``series/`` (a sagittal CT-like series, 8 slices) and
    ``slice.dcm`` (one axial CT slice of another series: a 2D DICOM image)."""
    ct_series(folder / "series")
    ct_series(folder / "other", row_direction=(1.0, 0.0, 0.0), column_direction=(0.0, 1.0, 0.0))
    shutil.move(sorted((folder / "other").iterdir())[3], folder / "slice.dcm")
    shutil.rmtree(folder / "other")
    return folder


def _infer(root: Path, inputs: Path, weights, **overrides) -> str:
    return run_bundle_here("inferring", ("inference",), root, dataset_dir=inputs, num_workers=0,
                           clip_weights=weights, **overrides)


def _scores(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as handle:
        return {medad.io.files.output_stem(row["image"]): row for row in csv.DictReader(handle)}


def _uids(folder: Path) -> dict[str, str]:
    return {f"{case}/{name}": str(pydicom.dcmread(folder / case / dr.RESULT_FILES[name]).SOPInstanceUID)
            for case in CASES for name in OBJECTS}


@pytest.fixture(scope="module")
def both_run(fewshot_bundle, bundle_backbone, tmp_path_factory):
    """The shared few-shot model's inference on the DICOM cases with ``output_format`` ``both``,
    then again with ``overwrite``: the bundle root, the inputs, the first run's outputs (a copy)
    and its UIDs."""
    base = tmp_path_factory.mktemp("dicom_outputs")
    root = copy_bundle(fewshot_bundle, base / "bundle")
    inputs = dicom_inputs(base / "inputs")
    weights = bundle_backbone["clip_weights"]
    _infer(root, inputs, weights, output_format="both")
    first = shutil.copytree(root / "outputs", base / "first_outputs")
    _infer(root, inputs, weights, output_format="both", overwrite=True)
    return {"root": root, "inputs": inputs, "outputs": first, "rerun": root / "outputs", "weights": weights}


def test_both_writes_three_valid_objects_per_case(both_run):
    outputs = both_run["outputs"]
    for case in CASES:
        assert (outputs / f"{case}_anomaly_map.nii.gz").is_file() and (outputs / "overlays" / f"{case}_overlay.png").is_file()
        for name in OBJECTS:
            path = outputs / "dicom" / case / dr.RESULT_FILES[name]
            assert path.is_file(), path
            validate(path)
    # the run's marker and its ledger (medad.io.ledger); no temporary file left
    assert sorted(p.name for p in outputs.rglob(".*")) == sorted([OUTPUT_MARKER, LEDGER_DIR])


@pytest.mark.parametrize("case", CASES)
def test_objects_hold_the_nifti_map_and_the_scores(both_run, case):
    outputs, inputs = both_run["outputs"], both_run["inputs"]
    source = inputs / ("series" if case == "series" else "slice.dcm")
    sources = dr.read_sources(source)
    nifti = nib.load(outputs / f"{case}_anomaly_map.nii.gz")
    values = np.asarray(nifti.dataobj, dtype=np.float32)
    expected, ordered = dr.map_to_frames(sources, values, nifti.affine)
    by_uid = {str(ds.SOPInstanceUID): frame for ds, frame in zip(ordered, expected)}
    folder = outputs / "dicom" / case

    pm = pydicom.dcmread(folder / "parametric_map.dcm")
    frames = pm.pixel_array.reshape(-1, *expected.shape[1:])
    assert sorted(frame_sources(pm)) == sorted(by_uid)  # one frame per source frame (in highdicom's order)
    for frame, uid in zip(frames, frame_sources(pm)):
        np.testing.assert_array_equal(frame, by_uid[uid])

    detector = medad.load_detector(both_run["root"] / "models" / "model.pt", both_run["weights"])
    thresholds = detector.effective_thresholds()
    label = {uid: frame >= thresholds.pixel for uid, frame in by_uid.items()}
    seg = pydicom.dcmread(folder / "segmentation.dcm")
    kept = frame_sources(seg)
    pixels = seg.pixel_array.reshape(len(kept), *expected.shape[1:])
    if any(frame.any() for frame in label.values()):
        assert set(kept) == {uid for uid, frame in label.items() if frame.any()}
    for frame, uid in zip(pixels, kept):
        np.testing.assert_array_equal(frame.astype(bool), label[uid])
    assert repr(float(thresholds.pixel)) in seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters

    row = _scores(outputs / "scores.csv")[case]
    items = sr_items(pydicom.dcmread(folder / "report.dcm"))
    assert items[dr.ANOMALY_SCORE[0]] == [pytest.approx(float(row["score"]), rel=1e-5, abs=1e-6)]
    assert items[dr.ANOMALY_THRESHOLD[0]] == [pytest.approx(float(row["threshold"]), rel=1e-5)]
    decision = ("263654008", "SCT") if int(row["anomalous"]) else ("17621005", "SCT")
    assert items[dr.ANOMALY_DECISION[0]] == [decision]
    texts = [text for found in items.values() for text in found if isinstance(text, str)]
    assert f"image threshold rule: {row['threshold_rule']}" in texts


def test_rerun_gives_the_same_uids(both_run):
    first, again = _uids(both_run["outputs"] / "dicom"), _uids(both_run["rerun"] / "dicom")
    assert first == again and len(set(first.values())) == len(first)


def test_given_threshold_has_the_given_rule_and_dicom_overlay_stores_the_overlays(both_run, tmp_path):
    root = copy_bundle(both_run["root"], tmp_path / "bundle")
    _infer(root, both_run["inputs"], both_run["weights"], output_format="dicom", threshold=0.25, overwrite=True,
           dicom_overlay=True)
    items = sr_items(pydicom.dcmread(root / "outputs" / "dicom" / "series" / "report.dcm"))
    assert items[dr.ANOMALY_THRESHOLD[0]] == [pytest.approx(0.25)]
    texts = [text for found in items.values() for text in found if isinstance(text, str)]
    assert "image threshold rule: given" in texts
    # dicom: the DICOM objects instead of the map files; scores and overlays stay
    outputs = root / "outputs"
    assert not list(outputs.rglob("*.nii*")) and (outputs / "scores.csv").is_file()
    assert sorted(p.name for p in (outputs / "overlays").iterdir()) == ["series_overlay.png", "slice_overlay.png"]
    for case in CASES:  # the key dicom_overlay: each case's overlay picture as a Secondary Capture too
        folder = outputs / "dicom" / case
        assert sorted(p.name for p in folder.iterdir()) == sorted([*dr.RESULT_FILES.values(), dr.OVERLAY_FILE])
        validate(folder / dr.OVERLAY_FILE)
        with Image.open(outputs / "overlays" / f"{case}_overlay.png") as picture:
            np.testing.assert_array_equal(pydicom.dcmread(folder / dr.OVERLAY_FILE).pixel_array, np.asarray(picture.convert("RGB")))


def test_python_writes_the_bundles_objects(both_run, tmp_path):
    model = both_run["root"] / "models" / "model.pt"
    detector = medad.load_detector(model, both_run["weights"])
    for case, source in (("series", both_run["inputs"] / "series"), ("slice", both_run["inputs"] / "slice.dcm")):
        prediction = predict_input(detector, source)
        written = dicom_results(prediction, source, detector, tmp_path / case, model_file=model)
        assert sorted(written) == sorted(OBJECTS)
        bundle = both_run["outputs"] / "dicom" / case
        for name in OBJECTS:
            ours, theirs = pydicom.dcmread(written[name]), pydicom.dcmread(bundle / dr.RESULT_FILES[name])
            assert (ours.SOPInstanceUID, ours.SeriesInstanceUID) == (theirs.SOPInstanceUID, theirs.SeriesInstanceUID)
            if name == "report":
                _same_report(ours, theirs)
            else:
                assert frame_sources(ours) == frame_sources(theirs)
                np.testing.assert_allclose(ours.pixel_array, theirs.pixel_array, atol=1e-5)


def _same_report(ours, theirs) -> None:
    a, b = sr_items(ours), sr_items(theirs)
    assert a.keys() == b.keys()
    for key in a:
        for x, y in zip(a[key], b[key]):
            assert x == (pytest.approx(y, rel=1e-5, abs=1e-6) if isinstance(y, float) else y), key


def test_non_dicom_input_and_misspelt_value_are_refused(fewshot_bundle, bundle_backbone, synthetic_bmad, tmp_path):
    root = copy_bundle(fewshot_bundle, tmp_path / "bundle")
    images = tmp_path / "images"
    images.mkdir()
    png = sorted((synthetic_bmad / "Alpha_AD" / "test" / "good" / "img").glob("*.png"))[0]
    shutil.copy(png, images / "case.png")
    weights = {"clip_weights": bundle_backbone["clip_weights"], "num_workers": 0}
    status, stderr = run_bundle_in_process("inferring", ("inference",), root, dataset_dir=images, output_format="dicom", **weights)
    assert status != 0 and "case.png: not a DICOM file or series folder" in stderr[-1] and "output_format" in stderr[-1]
    status, stderr = run_bundle_in_process("inferring", ("inference",), root, dataset_dir=images, output_format="dicm", **weights)
    assert status != 0
    assert "output_format must be one of ['nifti', 'dicom', 'both'], got 'dicm'" in stderr[-1]
    status, stderr = run_bundle_in_process("inferring", ("inference",), root, dataset_dir=images, dicom_overlay=True, **weights)
    assert status != 0 and "dicom_overlay" in stderr[-1] and "output_format dicom or both" in stderr[-1]
    assert not (root / "outputs").exists() and not list(root.glob(".outputs*partial*"))


def test_colour_dicom_image_gets_seg_and_report(fewshot_bundle, bundle_backbone, tmp_path):
    """A single-frame colour DICOM runs as a 2D image (its map (columns, rows) on MONAI's grid); a
    secondary capture has no frame of reference, so highdicom builds no Parametric Map of it: the
    SEG (the NIfTI map, transposed to rows and columns, at the pixel threshold) and the SR are
    written all the same."""
    from test_dicom_results import sc_image

    root = copy_bundle(fewshot_bundle, tmp_path / "bundle")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    source = sc_image(inputs / "photo.dcm", colour=True)
    _infer(root, inputs, bundle_backbone["clip_weights"], output_format="both")
    folder = root / "outputs" / "dicom" / "photo"
    assert sorted(p.name for p in folder.iterdir()) == ["report.dcm", "segmentation.dcm"]
    for path in folder.iterdir():
        validate(path)
    values = np.asarray(nib.load(root / "outputs" / "photo_anomaly_map.nii.gz").dataobj, dtype=np.float32).T
    assert values.shape == (source.Rows, source.Columns)
    pixel = medad.load_detector(root / "models" / "model.pt", bundle_backbone["clip_weights"]).effective_thresholds().pixel
    seg = pydicom.dcmread(folder / "segmentation.dcm")
    np.testing.assert_array_equal(seg.pixel_array.reshape(values.shape).astype(bool), values >= pixel)
