"""The MONAI Label app (``bundle/monailabel``) against a real MONAI Label server.

MONAI Label pins numpy<2 and pydicom<3, so it runs from its own environment, ``.venv-monailabel``
(``scripts/monailabel_env.sh``); without it the server test is skipped. The server is started on
127.0.0.1 with the tiny fixture CLIP, a bundle holding a zero-shot ``model.pt`` and a generated
studies folder; the test talks to it over HTTP, as a viewer does, and only reads the bundle's
``models/`` after the adaptations and the restore to check what the server saved.

A second server runs on a DICOMweb datastore, the Orthanc of tests/orthanc.py (skipped without
it): ``/infer`` on a CT series from the PACS, and a saved label stored there as a DICOM SEG.

The app's model store (``lib/store.py``: versions, restore, reloading) needs monai and medad but
not monailabel, so its unit test runs in this environment, without a server.
"""

from __future__ import annotations

import csv
import email.parser
import email.policy
import gzip
import importlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.uid import generate_uid

import medad
from medad.model.checkpoint import describe, read_checkpoint, restore_model_version, save_model
from medad.model.decision import Thresholds
from monai.data.utils import to_affine_nd

from helpers import IMAGE_SIZE, ROOT, run_bundle
from orthanc import COLUMNS, PASSWORD, ROWS, SLICES, USER, client, ct_series, orthanc  # noqa: F401 (orthanc: the fixture)
from test_dicom_results import validate
from synthetic import head_phantom, write_dataset

APP = ROOT / "bundle" / "monailabel"
PYTHON = ROOT / ".venv-monailabel" / "bin" / "python"
MODEL = "mvfa"
RESTORE = "mvfa_restore"  # the restore task: POST /train/mvfa_restore
# An oblique-free but permuted and flipped affine: the label must come back with it, not RAS.
VOLUME_AFFINE = np.array([[0.0, -1.2, 0.0, 10.0], [1.5, 0.0, 0.0, -20.0], [0.0, 0.0, 3.0, 5.0], [0.0, 0.0, 0.0, 1.0]])
VOLUME_SHAPE = (48, 40, 8)
CASE_SIZE = (150, 130)  # width, height of the 2D case: not square, not the model's size

needs_monailabel = pytest.mark.skipif(
    not PYTHON.exists(),
    reason=f"no MONAI Label environment at {PYTHON.parent.parent}: create it with scripts/monailabel_env.sh",
)


# ----------------------------------------------------------------------------- HTTP


def _call(method: str, url: str, data: bytes | None = None, content_type: str | None = None, timeout: float = 300) -> tuple[bytes, str]:
    """Body and content type of an HTTP call; an error status fails with the server's message."""
    request = urllib.request.Request(url, data=data, method=method)
    if content_type:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as error:
        raise AssertionError(f"{method} {url}: HTTP {error.code}: {error.read().decode(errors='replace')[-3000:]}") from None


def _form(**fields: str) -> dict[str, Any]:
    """Form fields (MONAI Label's ``params``/``info``) as a urlencoded body."""
    return {"data": urllib.parse.urlencode(fields).encode(), "content_type": "application/x-www-form-urlencoded"}


def _get_json(url: str) -> Any:
    return json.loads(_call("GET", url)[0])


def train_sync(url: str, task: str, **options: Any) -> dict:
    """``POST /train/<task>?run_sync=true``: the task runs in the server's process; its result."""
    body, _ = _call("POST", f"{url}/train/{task}?run_sync=true", data=json.dumps(options).encode(), content_type="application/json")
    return json.loads(body)


def _multipart(body: bytes, content_type: str) -> dict[str, bytes]:
    """The parts of a ``multipart/form-data`` answer (MONAI Label's ``output=all``) by field name."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    return {part.get_param("name", header="content-disposition"): part.get_payload(decode=True) for part in message.iter_parts()}


def infer(url: str, image: str, **params: Any) -> tuple[dict, bytes]:
    """``POST /infer/mvfa?image=<id>&output=all``: the result JSON and the returned file."""
    body, content_type = _call("POST", f"{url}/infer/{MODEL}?image={image}&output=all", **_form(params=json.dumps(params)))
    parts = _multipart(body, content_type)
    assert set(parts) == {"params", "image"}, f"unexpected answer parts {sorted(parts)}"
    return json.loads(parts["params"]), parts["image"]


def _nifti(data: bytes) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(data))


# ----------------------------------------------------------------------------- server


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    """Stop the server's process group (the server and any training subprocess of it)."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def monailabel_server(
    app: Path, studies: Path | str, conf: dict[str, str], workdir: Path, env: dict[str, str] | None = None
) -> Iterator[str]:
    """Run ``monailabel start_server`` on a free port of 127.0.0.1 (studies: a folder or a DICOMweb
    URL; ``env``: more settings, e.g. the DICOMweb credentials) and yield its URL once ``/info/``
    answers; the server is stopped on leaving, whatever happened."""
    port = _free_port()
    command = [str(PYTHON), "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies)]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    for key, value in conf.items():
        command += ["--conf", key, value]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",  # tiny model on a shared CPU: extra threads only wait
        "PYTHONUNBUFFERED": "1",
        "MONAI_LABEL_SESSION_PATH": str(workdir / "sessions"),
        **(env or {}),
    }
    log = workdir / "server.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(command, cwd=workdir, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                raise AssertionError(f"the server exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            try:
                urllib.request.urlopen(f"{url}/info/", timeout=5).read()
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise AssertionError(f"the server did not answer within 180 s:\n{log.read_text()[-4000:]}") from None
                time.sleep(0.5)
        yield url
    finally:
        _stop(process)


def wait_for_training(url: str, timeout: float = 600) -> dict:
    """Poll ``GET /train/`` until the last training task is done; fail with its log on error."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task = _get_json(f"{url}/train/")
        if task["status"] == "DONE":
            return task
        assert task["status"] in ("SUBMITTED", "RUNNING"), "training failed:\n" + "\n".join(task.get("details", []))
        time.sleep(1)
    raise AssertionError(f"training did not finish within {timeout} s")


# ----------------------------------------------------------------------------- data


def _write_bundle(folder: Path, tiny_weights: dict) -> Path:
    """A bundle with a zero-shot ``models/model.pt``: the fixture's CLIP and adapters, target Brain."""
    detector = medad.build_detector(
        ["Brain"], "Brain", model_name=medad.TINY_MODEL_NAME, image_size=IMAGE_SIZE,
        pretrained=tiny_weights["clip"], levels=(1, 2, 3, 4), checkpoint=tiny_weights["adapters"],
    )
    (folder / "models").mkdir(parents=True)
    torch.save(detector.state_dict(), folder / "models" / "model.pt")
    (folder / "configs").mkdir()
    shutil.copy(ROOT / "configs" / "metadata.json", folder / "configs")
    return folder


def _write_studies(folder: Path, scratch: Path) -> Path:
    """Normal references by name (``normal_*``) and one to be marked by its info (``reference``),
    a 2D case with a lesion and a NIfTI volume with a lesion."""
    write_dataset(scratch, "Alpha", masks=True, seed=0, size=IMAGE_SIZE, counts={"test": (4, 1)})
    good = sorted((scratch / "Alpha_AD" / "test" / "good" / "img").glob("*.png"))
    folder.mkdir()
    for i, path in enumerate(good[:3]):
        shutil.copy(path, folder / f"normal_{i:03d}.png")
    shutil.copy(good[3], folder / "reference.png")
    lesion = next((scratch / "Alpha_AD" / "test" / "Ungood" / "img").glob("*.png"))
    Image.open(lesion).convert("RGB").resize(CASE_SIZE).save(folder / "case.png")  # RGB, as real data
    volume, _ = head_phantom(VOLUME_SHAPE, seed=1)
    nib.save(nib.Nifti1Image(volume, VOLUME_AFFINE), folder / "volume.nii.gz")
    volume, _ = head_phantom(VOLUME_SHAPE, seed=2, lesion=False)
    nib.save(nib.Nifti1Image(volume, VOLUME_AFFINE), folder / "normal_volume.nii.gz")
    return folder


def _copy_app(folder: Path) -> Path:
    """A copy of the app: MONAI Label writes logs/, model/ and bin/ into the app folder."""
    app = folder / "app"
    shutil.copytree(APP, app, ignore=shutil.ignore_patterns("logs", "model", "bin", "__pycache__"))
    return app


# ----------------------------------------------------------------------------- test


def _check_common(result: dict, kind: str, mode: str) -> None:
    assert result["kind"] == kind and result["mode"] == mode and result["target"] == "Brain"
    assert isinstance(result["score"], float) and np.isfinite(result["score"])
    assert result["abnormal"] == (result["score"] >= result["score_threshold"])
    assert result["decision"] == ("abnormal" if result["abnormal"] else "normal")
    assert result["label_names"] == {"anomaly": 1}


def _same_state(a: dict, b: dict) -> bool:
    """The same tensors under the same keys (NaN equal to NaN: an uncalibrated model's calibration)."""

    def same(x: torch.Tensor, y: torch.Tensor) -> bool:
        return x.dtype == y.dtype and x.shape == y.shape and (torch.equal(x, y) or torch.allclose(x, y, rtol=0, atol=0, equal_nan=True))

    return a.keys() == b.keys() and all(same(a[key], b[key]) for key in a)


@pytest.mark.slow
@needs_monailabel
def test_server_infers_2d_and_volumes_and_adapts_to_normal_studies(tiny_weights, tmp_path):
    bundle = _write_bundle(tmp_path / "bundle", tiny_weights)
    studies = _write_studies(tmp_path / "studies", tmp_path / "scratch")
    app = _copy_app(tmp_path)
    conf = {"bundle_path": str(bundle), "clip_weights": str(tiny_weights["clip"]), "device": "cpu"}

    with monailabel_server(app, studies, conf, tmp_path) as url:
        info = _get_json(f"{url}/info/")
        assert info["name"] == json.loads((ROOT / "configs" / "metadata.json").read_text())["name"]
        assert info["models"][MODEL]["labels"] == {"anomaly": 1}
        assert set(info["models"][MODEL]["config"]) == {"result", "threshold", "score_threshold"}
        assert set(info["trainers"]) == {MODEL}  # the restore task is not listed: "train all" must not run it
        assert info["train_stats"] == {MODEL: {"versions": []}}
        assert info["datastore"]["total"] == 7
        models = bundle / "models"
        zero_shot = (models / "model.pt").read_bytes()

        # 2D: a PNG label at the image's own size (rows, columns), and the score in the JSON.
        result, label = infer(url, "case")
        _check_common(result, "image", "zero-shot")
        assert result["threshold_source"] == {"threshold": "zero_shot_prior", "score_threshold": "zero_shot_prior"}
        label = np.asarray(Image.open(io.BytesIO(label)))
        assert label.shape == (CASE_SIZE[1], CASE_SIZE[0]) and label.dtype == np.uint8
        assert set(np.unique(label)) <= {0, 1}
        assert label.mean() == pytest.approx(result["anomalous_fraction"])
        # the 2D map: NIfTI on the grid MONAI's LoadImage reads the PNG on, (columns, rows), as the bundle's
        result, anomaly_map = infer(url, "case", result="map")
        anomaly_map = _nifti(anomaly_map)
        assert anomaly_map.shape == CASE_SIZE and np.allclose(anomaly_map.affine, np.eye(4))
        assert np.array_equal(anomaly_map.get_fdata(dtype=np.float32).T >= result["threshold"], label.astype(bool))

        # A bad request is answered with HTTP 400 and the reason.
        with pytest.raises(AssertionError, match="HTTP 400: .*result must be one of"):
            infer(url, "case", result="heat")
        with pytest.raises(AssertionError, match="HTTP 400: .*not in the datastore"):
            infer(url, "no_such_study")

        # Volume: a NIfTI label with the input's shape and affine; slice scores in file order.
        result, label = infer(url, "volume")
        _check_common(result, "volume", "zero-shot")
        label = _nifti(label)
        assert label.shape == VOLUME_SHAPE and np.allclose(label.affine, VOLUME_AFFINE, atol=1e-5)
        assert len(result["slice_scores"]) == VOLUME_SHAPE[2]
        assert result["empty_slices"] == [0, 1, VOLUME_SHAPE[2] - 2, VOLUME_SHAPE[2] - 1]  # the phantom's air
        assert result["score"] == pytest.approx(max(result["slice_scores"]))

        # The continuous map on the same grid; a requested threshold gives exactly map >= threshold.
        result, anomaly_map = infer(url, "volume", result="map")
        anomaly_map = _nifti(anomaly_map)
        assert anomaly_map.shape == VOLUME_SHAPE and np.allclose(anomaly_map.affine, VOLUME_AFFINE, atol=1e-5)
        values = anomaly_map.get_fdata(dtype=np.float32)
        assert [values.min(), values.max()] == pytest.approx(result["map_range"])
        threshold = float(np.quantile(values[values > 0], 0.9))
        result, label = infer(url, "volume", threshold=str(threshold))  # viewers send strings
        assert result["threshold_source"]["threshold"] == "request" and result["threshold"] == threshold
        assert np.array_equal(np.asarray(_nifti(label).dataobj), (values >= threshold).astype(np.uint8))

        # Few-shot adaptation: mark one more study normal through the datastore, then train.
        _call("PUT", f"{url}/datastore/image/info?image=reference", **_form(info=json.dumps({"normal": True})))
        _call("POST", f"{url}/train/{MODEL}", data=json.dumps({"slices_per_volume": 2}).encode(), content_type="application/json")
        wait_for_training(url)
        stats = _get_json(f"{url}/info/")["train_stats"][MODEL]
        assert stats["normal_studies"] == ["normal_000", "normal_001", "normal_002", "normal_volume", "reference"]
        assert stats["support_images"] == 4 + 2
        # The zero-shot model it replaced is kept, unchanged, and the record names its file.
        assert stats["action"] == "adaptation" and stats["versions"] == [stats["replaced_version"]]
        assert (models / "versions" / stats["replaced_version"]).read_bytes() == zero_shot
        first_bytes, first_state = (models / "model.pt").read_bytes(), read_checkpoint(models / "model.pt")

        adapted = medad.build_detector(
            [], None, model_name=medad.TINY_MODEL_NAME, image_size=IMAGE_SIZE, pretrained=tiny_weights["clip"],
            levels=(1, 2, 3, 4), checkpoint=bundle / "models" / "model.pt",
        )
        assert adapted.has_memory and adapted.is_calibrated and adapted.target == "Brain"

        # The server reloads model.pt: few-shot scores with the adaptation's thresholds.
        result, label = infer(url, "case")
        _check_common(result, "image", "few-shot")
        assert result["threshold_source"] == {"threshold": "normal_heldout_max", "score_threshold": "normal_heldout_max"}
        assert result["threshold"] == pytest.approx(stats["threshold"])
        assert result["score_threshold"] == pytest.approx(adapted.effective_thresholds().image)
        server_case, server_label = result, np.asarray(Image.open(io.BytesIO(label)))
        assert server_label.shape == (CASE_SIZE[1], CASE_SIZE[0])
        result, label = infer(url, "volume")
        _check_common(result, "volume", "few-shot")
        assert np.allclose(_nifti(label).affine, VOLUME_AFFINE, atol=1e-5)
        # Each normal study set the thresholds scored without its own images in the memory; with
        # them its distances can only shrink, so it stays below them.
        for study in (s for s in stats["normal_studies"] if s.startswith("normal_0")):
            result, _ = infer(url, study)
            assert result["decision"] == "normal" and result["score"] <= stats["score_threshold"] + 1e-5

        # A second adaptation (run in the server's process) keeps the first adapted model, intact.
        second = train_sync(url, MODEL, augment=False, slices_per_volume=1)
        assert second["support_images"] == 4 + 1
        versions = _get_json(f"{url}/info/")["train_stats"][MODEL]["versions"]
        assert versions == [stats["replaced_version"], second["replaced_version"]]
        kept = models / "versions" / second["replaced_version"]
        assert kept.read_bytes() == first_bytes
        kept_detector = medad.load_detector(kept, tiny_weights["clip"])
        assert kept_detector.effective_thresholds() == adapted.effective_thresholds()
        assert kept_detector.memory_seg.shape == adapted.memory_seg.shape  # 6 x 11 augmented images
        assert read_checkpoint(models / "model.pt")["memory_seg"].shape[1] < adapted.memory_seg.shape[1]  # 5 images
        result, _ = infer(url, "case")
        assert result["threshold"] == pytest.approx(second["threshold"])

        # Going back: the newest version, the first adaptation's model, is model.pt again, the
        # second one is kept in its place, and the server serves the first one's answers.
        restored = train_sync(url, RESTORE)
        assert restored["action"] == "restore" and restored["restored_version"] == second["replaced_version"]
        assert restored["versions"] == [stats["replaced_version"], restored["replaced_version"]]
        assert not kept.exists() and restored["score_threshold"] == pytest.approx(stats["score_threshold"])
        assert _same_state(read_checkpoint(models / "model.pt"), first_state)
        assert (models / "versions" / restored["replaced_version"]).is_file()
        assert _get_json(f"{url}/info/")["train_stats"][MODEL] == restored
        result, label = infer(url, "case")
        assert result["threshold"] == pytest.approx(stats["threshold"])
        assert result["score"] == pytest.approx(server_case["score"], abs=1e-6)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(label))), server_label)
        with pytest.raises(AssertionError, match="HTTP 400: .*no kept version model-none.pt"):
            train_sync(url, RESTORE, version="model-none.pt")

        # A site threshold set in Python (conformal, on the normal studies) is what the server applies.
        site = medad.load_detector(models / "model.pt", tiny_weights["clip"])
        normals = [{"image": str(path), "label": 0} for path in sorted(studies.glob("normal_0*.png"))]
        medad.set_site_threshold(site, normals, "conformal_fpr", 0.5, data=str(studies))
        save_model(site, models / "model.pt", keep_previous=True)
        result, _ = infer(url, "case")
        python = medad.predict_input(site, studies / "case.png")
        assert result["threshold_source"]["score_threshold"] == "conformal_fpr"
        assert result["score_threshold"] == site.effective_thresholds().image
        assert result["p_value"] == pytest.approx(python.p_value) and result["abnormal"] == python.anomalous
        assert result["threshold_provenance"]["normal"] == len(normals)
        restore_model_version(models / "model.pt")  # the adapted model again, for the surfaces below

    # The same model gives the same answer through Python and the bundle's inferring.
    python = medad.predict_input(medad.load_detector(bundle / "models" / "model.pt", tiny_weights["clip"]), studies / "case.png")
    assert python.score == pytest.approx(server_case["score"], abs=1e-5)
    assert python.anomalous == server_case["abnormal"] and np.array_equal(python.label, server_label)
    cases = tmp_path / "cases"
    cases.mkdir()
    shutil.copy(studies / "case.png", cases)
    run_bundle("inferring", ("inference",), bundle, dataset_dir=cases, clip_weights=tiny_weights["clip"], num_workers=0)
    with open(bundle / "outputs" / "scores.csv") as handle:
        (row,) = list(csv.DictReader(handle))
    assert float(row["score"]) == pytest.approx(server_case["score"], abs=1e-5)
    assert int(row["anomalous"]) == int(server_case["abnormal"])


# ----------------------------------------------------------------------------- a DICOMweb datastore


def _same_points(shape: tuple[int, ...], affine: np.ndarray, other_affine: np.ndarray) -> tuple[np.ndarray, ...]:
    """For every voxel of the grid ``(shape, affine)`` (C order), the index of the same point on the
    grid ``other_affine``; fails unless each is a whole index (the same grid up to axis order and flips)."""
    ijk = np.indices(shape).reshape(len(shape), -1)
    ijk = np.vstack([ijk, np.zeros((3 - len(shape), ijk.shape[1]))]) if len(shape) < 3 else ijk
    points = affine @ np.vstack([ijk, np.ones(ijk.shape[1])])
    other = (np.linalg.inv(other_affine) @ points)[:3]
    index = np.rint(other)
    assert np.abs(other - index).max() < 1e-3, "the two grids do not share their voxel centres"
    return tuple(index.astype(int))


def _instance_affine(ds) -> np.ndarray:
    """The RAS affine of a single-frame DICOM image's pixel grid, indexed (column, row, 0)."""
    row_cosines, column_cosines = np.array(ds.ImageOrientationPatient[:3], float), np.array(ds.ImageOrientationPatient[3:], float)
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)  # between rows, between columns
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1] = row_cosines * column_spacing, column_cosines * row_spacing
    affine[:3, 2] = np.cross(row_cosines, column_cosines)
    affine[:3, 3] = np.array(ds.ImagePositionPatient, float)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # DICOM's LPS to NIfTI's RAS


@pytest.mark.slow
@needs_monailabel
def test_server_on_dicomweb_infers_a_series_and_stores_a_label_as_seg(orthanc, tiny_weights, tmp_path):
    """``--studies <Orthanc>/dicom-web``: ``/infer`` on a CT series fetched by DICOMweb gives the
    map and score medad gives for the same series in this process; a saved label is stored in
    Orthanc as a DICOM SEG under the same study, whose pixels are the label's."""
    import highdicom as hd
    import requests

    study = generate_uid()
    series = ct_series(study, "P-LABEL", "ALABEL")
    client(orthanc).store_instances(series, study_instance_uid=study)
    uid = str(series[0].SeriesInstanceUID)
    bundle = _write_bundle(tmp_path / "bundle", tiny_weights)
    conf = {"bundle_path": str(bundle), "clip_weights": str(tiny_weights["clip"]), "device": "cpu"}
    env = {  # MONAI Label's own settings: credentials, the series to list (QIDO filter), a private cache
        "MONAI_LABEL_DICOMWEB_USERNAME": USER,
        "MONAI_LABEL_DICOMWEB_PASSWORD": PASSWORD,
        "MONAI_LABEL_DICOMWEB_SEARCH_FILTER": json.dumps({"Modality": "CT", "PatientID": "P-LABEL"}),
        "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp_path / "cache"),
    }
    with monailabel_server(_copy_app(tmp_path), orthanc, conf, tmp_path, env=env) as url:
        assert _get_json(f"{url}/datastore/?output=stats")["total"] == 1
        assert json.loads(_call("POST", f"{url}/activelearning/random", data=b"{}", content_type="application/json")[0])["id"] == uid  # "next sample"
        result, anomaly_map = infer(url, uid, result="map")
        _check_common(result, "volume", "zero-shot")
        anomaly_map = _nifti(anomaly_map)
        values, affine = anomaly_map.get_fdata(dtype=np.float32), anomaly_map.affine
        assert values.shape == (COLUMNS, ROWS, SLICES)

        # medad in this process, on the series as stored: the same map on the same points, and
        # the same score. Both read the same stored values (SimpleITK's NIfTI of the series on the
        # server, MONAI's DICOM reader here, its slices in the other order) and run the same model
        # on the same slices: equal here, up to float32 rounding elsewhere (map values of order 1).
        folder = tmp_path / "series"
        folder.mkdir()
        for k, ds in enumerate(series):
            ds.save_as(folder / f"{k}.dcm", enforce_file_format=True)
        local = medad.predict_input(medad.load_detector(bundle / "models" / "model.pt", tiny_weights["clip"]), folder)
        local_affine = to_affine_nd(3, local.meta["affine"])
        on_server_grid = local.anomaly_map[_same_points(values.shape, affine, local_affine)].reshape(values.shape)
        np.testing.assert_allclose(values, on_server_grid, rtol=0, atol=1e-5)
        assert result["score"] == pytest.approx(local.score, abs=1e-5)
        assert sorted(result["slice_scores"]) == pytest.approx(sorted(local.volume["slice_scores"]), abs=1e-5)

        # A label on the map's grid (as a viewer sends it after editing), saved as the final label.
        label = (values >= np.quantile(values[values > 0], 0.8)).astype(np.uint8)
        assert 0 < label.sum() < label.size
        upload = tmp_path / "label.nii.gz"
        nib.save(nib.Nifti1Image(label, affine), upload)
        params = {"label_info": [{"name": "anomaly", "idx": 1}]}  # as MONAI Label's viewer plugins send it
        with open(upload, "rb") as handle:
            answer = requests.put(f"{url}/datastore/label", params={"image": uid, "tag": "final"},
                                  data={"params": json.dumps(params)}, files={"label": ("label.nii.gz", handle)}, timeout=300)
        assert answer.status_code == 200, answer.text[-3000:]
    for log in (tmp_path / "server.log", *(tmp_path / "app" / "logs").iterdir()):
        assert PASSWORD not in log.read_text(errors="replace"), log

    # The SEG, found by QIDO under the study, references the series; its pixels are the label's.
    web = client(orthanc)
    found = web.search_for_series(study, search_filters={"Modality": "SEG"})
    assert len(found) == 1
    (seg,) = web.retrieve_series(study, found[0]["0020000E"]["Value"][0])  # read by pydicom
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.StudyInstanceUID == study
    assert seg.PatientID == series[0].PatientID
    assert {str(item.SeriesInstanceUID) for item in seg.ReferencedSeriesSequence} == {uid}
    assert [item.SegmentLabel for item in seg.SegmentSequence] == ["anomaly"]
    seg.save_as(tmp_path / "seg.dcm")
    validate(tmp_path / "seg.dcm")  # dciodvfy: no errors (dcmqi's SEG)
    # dcmqi does not state that spatial locations are preserved: check each frame's position against
    # its source image's, then let highdicom index the frames by source image
    positions = {str(ds.SOPInstanceUID): [float(v) for v in ds.ImagePositionPatient] for ds in series}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source = str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        assert [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient] == pytest.approx(positions[source])
    pixels = hd.seg.Segmentation.from_dataset(seg).get_pixels_by_source_instance(
        list(positions), combine_segments=True, assert_missing_frames_are_empty=True, ignore_spatial_locations=True,
    )
    for ds, frame in zip(series, pixels):
        expected = label[_same_points((COLUMNS, ROWS), _instance_affine(ds), affine)].reshape(COLUMNS, ROWS).T
        np.testing.assert_array_equal(frame, expected)


@pytest.mark.slow
@needs_monailabel
def test_app_finds_dcmqi_in_its_environment_or_names_the_fix(tmp_path):
    """A DICOMweb datastore needs dcmqi's itkimage2segimage: the app takes the one installed in its
    environment (not on PATH when started as ``python -m monailabel.main``) instead of MONAI
    Label's download from GitHub, and stops with the fix where there is none."""
    script = """
import os, shutil, sys
sys.path.insert(0, sys.argv[1])
import main
app = main.MVFAApp.__new__(main.MVFAApp)  # the method alone: no bundle, no datastore
os.environ["PATH"] = "/usr/bin:/bin"
app._download_dcmqi_tools()
print(shutil.which(main.SEG_TOOL))
shutil.which = lambda name, path=None: None
try:
    app._download_dcmqi_tools()
except RuntimeError as error:
    print(error)
"""
    result = subprocess.run([str(PYTHON), "-c", script, str(APP)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    found, refusal = result.stdout.strip().splitlines()[-2:]
    assert found == str(PYTHON.parent / "itkimage2segimage")
    assert refusal.startswith("a DICOMweb datastore stores labels as DICOM SEG with dcmqi's itkimage2segimage")
    assert refusal.endswith("pip install dcmqi (scripts/monailabel_env.sh does)")


# ----------------------------------------------------------------------------- the store, without a server


def _app_store():
    """``bundle/monailabel/lib/store.py``: it needs monai and medad, not monailabel."""
    sys.path.insert(0, str(APP))
    try:
        module = importlib.import_module("lib.store")
    finally:
        sys.path.remove(str(APP))
    assert Path(module.__file__).is_relative_to(APP), module.__file__
    return module


def test_store_keeps_each_replaced_model_and_restores_it(tiny_detector, tiny_weights, tmp_path):
    store_module = _app_store()
    models = tmp_path / "bundle" / "models"
    models.mkdir(parents=True)
    torch.save(tiny_detector.state_dict(), models / "model.pt")
    zero_shot = (models / "model.pt").read_bytes()
    settings = store_module.AppSettings.from_conf(
        {"bundle_path": str(tmp_path / "bundle"), "clip_weights": str(tiny_weights["clip"]), "device": "cpu"}
    )
    store = store_module.DetectorStore(settings)
    assert store.versions() == [] and store.adaptation_record() == {}
    with pytest.raises(FileNotFoundError, match="no earlier version"):
        store.restore()

    # Two "adaptations" (as lib.adapt does them): a memory bank and thresholds, saved by the store.
    size = tiny_detector.image_size
    records, states = [], []
    for shots, threshold in ((2, 0.5), (3, 0.7)):
        with store.detector(changes=True) as detector:
            detector.build_memory(torch.rand(shots, 3, size, size, generator=torch.Generator().manual_seed(shots)))
            detector.thresholds = Thresholds(threshold, threshold, "normal_heldout_max", "normal_heldout_max")
            records.append(store.save(detector, {"action": "adaptation", "shots": shots}))
            states.append({key: value.clone() for key, value in detector.state_dict().items()})
    versions = store.versions()
    assert [record["replaced_version"] for record in records] == versions and len(versions) == 2
    assert (models / "versions" / versions[0]).read_bytes() == zero_shot
    assert describe(models / "versions" / versions[1]).thresholds.image == 0.5
    assert store.adaptation_record() == records[1]

    # Restore (as the restore task does, in another process): the store reloads the changed file.
    with store.detector() as detector:
        assert detector.thresholds.image == 0.7 and detector.memory_seg.shape[1] == states[1]["memory_seg"].shape[1]
    restored = store.restore()
    assert restored["restored_version"] == versions[1] and restored["score_threshold"] == 0.5
    assert restored["mode"] == "few-shot" and store.adaptation_record() == restored
    assert store.versions() == [versions[0], restored["replaced_version"]] and not (models / "versions" / versions[1]).exists()
    assert _same_state(read_checkpoint(models / "model.pt"), states[0])
    with store.detector() as detector:
        assert detector.thresholds.image == 0.5 and _same_state(detector.state_dict(), states[0])

    # Back to the zero-shot model by name: the memory bank goes with it.
    restored = store.restore(versions[0])
    assert restored["mode"] == "zero-shot" and restored["score_threshold"] is None
    assert _same_state(read_checkpoint(models / "model.pt"), tiny_detector.state_dict())
    with store.detector() as detector:
        assert not detector.has_memory and detector.thresholds == Thresholds()
    with pytest.raises(FileNotFoundError, match="no kept version"):
        store.restore("model-none.pt")
