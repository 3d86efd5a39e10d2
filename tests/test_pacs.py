"""The PACS round trip (medad.surfaces.pacs, scripts/pacs_infer.py) against a real PACS: Orthanc
with its DICOMweb plugin, started by the ``orthanc`` fixture of tests/orthanc.py on free loopback
ports with a temporary storage folder and HTTP basic authentication.

A synthetic CT series (8 axial slices of 32 x 32 with plane geometry) and a single-frame 2D
radiograph are uploaded with STOW-RS; the round trip with the shared tiny few-shot model stores
a Parametric Map, a Segmentation and a TID 1500 report per source series under the same study; a
rerun stores nothing (same UIDs, found by QIDO-RS); wrong credentials give one line without the
password; credentials never reach a log or the output; the command runs once end to end."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("highdicom")

import pydicom  # noqa: E402
import requests  # noqa: E402  (a dependency of dicomweb-client)
from orthanc import (  # noqa: E402
    COLUMNS, DX_CLASS, MR_CLASS, PASSWORD, ROWS, SLICES, USER, client, ct_series, orthanc, upload_study,  # noqa: F401 (orthanc: the fixture)
)
from pydicom.uid import CTImageStorage, generate_uid  # noqa: E402

import medad  # noqa: E402
from medad.io import dicom_results as dr  # noqa: E402
from medad.surfaces import pacs  # noqa: E402
from medad.surfaces.predict import dicom_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PM_CLASS, SEG_CLASS, SR_CLASS = "1.2.840.10008.5.1.4.1.1.30", "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34"


def instances(url: str, study: str) -> list[dict]:
    return client(url).search_for_instances(study_instance_uid=study, fields=["00080016", "0020000E"])


def report_score(report) -> float:
    """The anomaly score item of a TID 1500 report."""
    items = list(report.ContentSequence)
    while items:
        item = items.pop()
        items.extend(item.get("ContentSequence", []))
        if item.get("ValueType") == "NUM" and item.ConceptNameCodeSequence[0].CodeValue == dr.ANOMALY_SCORE[0]:
            return float(item.MeasuredValueSequence[0].NumericValue)
    raise AssertionError("no anomaly score in the report")


def value(item: dict, tag: str) -> str:
    return str(item[tag]["Value"][0])


# --------------------------------------------------------------------------------------------
# the model


@pytest.fixture(scope="module")
def model(fewshot_bundle, tiny_clip_path):
    """The shared tiny few-shot model (models/model.pt) and its detector, loaded once."""
    path = fewshot_bundle / "models" / "model.pt"
    return path, medad.load_detector(path, tiny_clip_path)


# --------------------------------------------------------------------------------------------
# credentials (no PACS needed)


def test_credentials_from_environment_and_files(tmp_path):
    env = {pacs.ENV_USER: "reader", pacs.ENV_PASSWORD: "pw-1"}
    assert pacs.resolve_credentials(environ=env) == pacs.Credentials("reader", "pw-1")
    assert pacs.resolve_credentials(environ={pacs.ENV_TOKEN: "tok-1", **env}).token == "tok-1"
    assert "pw-1" not in repr(pacs.resolve_credentials(environ=env)) and "pw-1" not in str(pacs.resolve_credentials(environ=env))
    with pytest.raises(pacs.PacsError, match=pacs.ENV_PASSWORD):
        pacs.resolve_credentials(environ={pacs.ENV_USER: "reader"})
    assert pacs.resolve_credentials(environ={}) is None

    as_json = tmp_path / "dicomweb.json"
    as_json.write_text(json.dumps({"user": "reader", "password": "pw-2"}))
    as_json.chmod(0o600)
    assert pacs.read_credentials(as_json) == pacs.Credentials("reader", "pw-2")
    token = tmp_path / "token.json"
    token.write_text(json.dumps({"token": "tok-2"}))
    token.chmod(0o400)
    assert pacs.resolve_credentials(token, environ=env).token == "tok-2"  # the file wins over the environment

    netrc = tmp_path / "netrc"
    netrc.write_text("machine other.example login x password pw-x\nmachine pacs.example login reader password pw-3\n"
                     "default login anyone password pw-4\n")
    netrc.chmod(0o600)
    assert pacs.read_credentials(netrc, "pacs.example") == pacs.Credentials("reader", "pw-3")
    assert pacs.read_credentials(netrc, "elsewhere.example") == pacs.Credentials("anyone", "pw-4")

    # refused as ssh refuses a private key: readable by others (or the group)
    for mode in (0o644, 0o640, 0o604):
        as_json.chmod(mode)
        with pytest.raises(pacs.PacsError, match=rf"dicomweb\.json: permissions 0{mode:o} are too open.*chmod 600") as refused:
            pacs.read_credentials(as_json)
        assert "pw-2" not in str(refused.value)
    # malformed files are refused without echoing a value
    broken = tmp_path / "broken"
    broken.write_text("machine pacs.example login reader pw-5 secret\n")
    broken.chmod(0o600)
    with pytest.raises(pacs.PacsError, match="malformed") as refused:
        pacs.read_credentials(broken, "pacs.example")
    assert "pw-5" not in str(refused.value) and "secret" not in str(refused.value)
    incomplete = tmp_path / "incomplete.json"
    incomplete.write_text(json.dumps({"user": "reader"}))
    incomplete.chmod(0o600)
    with pytest.raises(pacs.PacsError, match="incomplete.json: give a token, or a user and a password"):
        pacs.read_credentials(incomplete)


def test_credentials_in_the_url_are_refused(tmp_path):
    with pytest.raises(pacs.PacsError, match="credentials in the URL are refused") as refused:
        pacs.pacs_round_trip("http://reader:pw-6@127.0.0.1:1/dicom-web", tmp_path / "model.pt", study="1.2.3")
    assert "pw-6" not in str(refused.value)
    with pytest.raises(pacs.PacsError, match="credentials in the URL are refused") as refused:
        pacs.pacs_round_trip("ftp://reader:pw-6@127.0.0.1/dicom-web", tmp_path / "model.pt", study="1.2.3")
    assert "pw-6" not in str(refused.value)
    with pytest.raises(pacs.PacsError, match="not an http"):
        pacs.pacs_round_trip("pacs.example/dicom-web", tmp_path / "model.pt", study="1.2.3")


def test_missing_dicomweb_client(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "dicomweb_client", None)
    with pytest.raises(ImportError, match=r"pip install medad\[dicom\]"):
        pacs.pacs_round_trip("http://127.0.0.1:1/dicom-web", tmp_path / "model.pt", study="1.2.3", credentials=None)


# --------------------------------------------------------------------------------------------
# against Orthanc


def test_round_trip_stores_once(orthanc, model, monkeypatch, caplog, tmp_path):
    """PM, SEG and SR per source series under the same study, with the deterministic UIDs (the
    radiograph, without plane geometry, gets no PM); a rerun stores nothing and scores nothing; a
    lost object is stored again alone; credentials from the environment never logged."""
    path, detector = model
    study, sources = upload_study(orthanc, "P-ROUND")
    other, _ = upload_study(orthanc, "P-OTHER")  # a study the round trip must leave alone
    monkeypatch.setenv(pacs.ENV_USER, USER)
    monkeypatch.setenv(pacs.ENV_PASSWORD, PASSWORD)
    monkeypatch.delenv(pacs.ENV_TOKEN, raising=False)
    caplog.set_level(logging.DEBUG)

    summary = pacs.pacs_round_trip(orthanc, path, study=study, detector=detector)
    assert summary.ok, summary.failed
    assert (summary.series_scored, summary.objects_stored, summary.objects_present, summary.maps_not_built) == (3, 8, 0, 1)
    assert summary.studies == [study] and not summary.skipped
    records = {record["series"]: record for record in summary.series}
    assert records[sources[0][0].SeriesInstanceUID]["instances"] == SLICES
    assert records[sources[2][0].SeriesInstanceUID]["objects"]["parametric_map"] == {"status": pacs.NO_MAP}

    found = instances(orthanc, study)
    by_class: dict[str, int] = {}
    for item in found:
        by_class[value(item, "00080016")] = by_class.get(value(item, "00080016"), 0) + 1
    assert by_class == {CTImageStorage: SLICES, MR_CLASS: 1, DX_CLASS: 1, PM_CLASS: 2, SEG_CLASS: 3, SR_CLASS: 3}
    key = hashlib.sha256(Path(path).read_bytes()).hexdigest()  # the model's SHA-256 keys the results' UIDs
    web = client(orthanc)
    for n, series in enumerate(sources):
        for kind, sop_class in (("parametric_map", PM_CLASS), ("segmentation", SEG_CLASS), ("report", SR_CLASS)):
            uids = dr.result_uids(series, key, kind)
            if kind == "parametric_map" and n == 2:
                assert not web.search_for_instances(study, search_filters={"SOPInstanceUID": uids["sop_instance_uid"]})
                continue
            stored = web.retrieve_instance(study, uids["series_instance_uid"], uids["sop_instance_uid"])
            assert stored.SOPClassUID == sop_class and stored.StudyInstanceUID == study
            assert stored.PatientID == series[0].PatientID and stored.AccessionNumber == series[0].AccessionNumber
            if kind != "report":
                referenced = {str(item.SeriesInstanceUID) for item in stored.ReferencedSeriesSequence}
                assert referenced == {str(series[0].SeriesInstanceUID)}
                assert stored.FrameOfReferenceUID == series[0].FrameOfReferenceUID
            else:
                evidence = {str(s.SeriesInstanceUID) for item in stored.CurrentRequestedProcedureEvidenceSequence
                            for s in item.ReferencedSeriesSequence}
                assert str(series[0].SeriesInstanceUID) in evidence
                record = records[series[0].SeriesInstanceUID]
                assert report_score(stored) == pytest.approx(record["score"], rel=1e-5)
    pm = web.retrieve_instance(study, *dr.result_uids(sources[0], key, "parametric_map").values())
    assert pm.pixel_array.shape == (SLICES, ROWS, COLUMNS) and np.isfinite(pm.pixel_array).all()
    # the objects the bundle's DICOM output (and predict.dicom_results) writes for the same series
    (tmp_path / "series").mkdir()
    for k, ds in enumerate(sources[0]):
        ds.save_as(tmp_path / "series" / f"{k}.dcm", enforce_file_format=True)
    prediction = medad.predict_input(detector, tmp_path / "series")
    written = dicom_results(prediction, tmp_path / "series", detector, tmp_path / "out", model_file=path)
    local = pydicom.dcmread(written["parametric_map"])
    assert local.SOPInstanceUID == pm.SOPInstanceUID
    np.testing.assert_array_equal(local.pixel_array, pm.pixel_array)
    assert pydicom.dcmread(written["report"]).SOPInstanceUID == dr.result_uids(sources[0], key, "report")["sop_instance_uid"]
    assert len(instances(orthanc, other)) == SLICES + 2  # untouched

    # the rerun: nothing scored, nothing stored, the counts unchanged
    again = pacs.pacs_round_trip(orthanc, path, study=study, detector=detector)
    assert again.ok and (again.series_scored, again.objects_stored, again.objects_present) == (0, 0, 8)
    assert not again.skipped  # its own results are no series to skip
    assert "0 series scored, 0 objects stored, 8 objects already present" in again.line()
    assert len(instances(orthanc, study)) == len(found)
    # a lost object is stored again, alone
    lost = dr.result_uids(sources[1], key, "report")
    rest = orthanc.removesuffix("/dicom-web")
    orthanc_id = requests.post(f"{rest}/tools/lookup", data=lost["sop_instance_uid"], auth=(USER, PASSWORD), timeout=10).json()[0]["ID"]
    requests.delete(f"{rest}/instances/{orthanc_id}", auth=(USER, PASSWORD), timeout=10).raise_for_status()
    assert len(instances(orthanc, study)) == len(found) - 1
    third = pacs.pacs_round_trip(orthanc, path, study=study, detector=detector)
    assert (third.series_scored, third.objects_stored, third.objects_present) == (1, 1, 7)
    assert len(instances(orthanc, study)) == len(found)
    assert PASSWORD not in caplog.text and PASSWORD not in repr(summary)


def test_wrong_credentials_give_one_line(orthanc, model, monkeypatch, caplog, tmp_path):
    path, detector = model
    wrong = "wrong-Secret-91b2"
    monkeypatch.setenv(pacs.ENV_USER, USER)
    monkeypatch.setenv(pacs.ENV_PASSWORD, wrong)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(pacs.PacsError) as refused:
        pacs.pacs_round_trip(orthanc, path, study="1.2.3.4", detector=detector)
    message = str(refused.value)
    assert "\n" not in message and orthanc in message and "1.2.3.4" in message and "HTTP 401" in message
    assert wrong not in message and wrong not in caplog.text
    # a token, as a bearer: Orthanc's basic authentication refuses it
    monkeypatch.setenv(pacs.ENV_TOKEN, wrong)
    with pytest.raises(pacs.PacsError, match="HTTP 401") as refused:
        pacs.pacs_round_trip(orthanc, path, study="1.2.3.4", detector=detector)
    assert wrong not in str(refused.value) and wrong not in caplog.text
    # an unknown study and no server at all: one line naming the endpoint and study
    monkeypatch.delenv(pacs.ENV_TOKEN)
    monkeypatch.setenv(pacs.ENV_PASSWORD, PASSWORD)
    with pytest.raises(pacs.PacsError, match=r"study 1\.2\.3\.4: no such study"):
        pacs.pacs_round_trip(orthanc, path, study="1.2.3.4", detector=detector)
    with pytest.raises(pacs.PacsError, match=r"127\.0\.0\.1:9/dicom-web study 1\.2\.3\.4: cannot connect"):
        pacs.pacs_round_trip("http://127.0.0.1:9/dicom-web", path, study="1.2.3.4", detector=detector)
    with pytest.raises(pacs.PacsError, match="no study matches PatientID=NOBODY"):
        pacs.pacs_round_trip(orthanc, path, query={"PatientID": "NOBODY"}, detector=detector)
    assert PASSWORD not in caplog.text


def test_command_end_to_end(orthanc, model, tiny_clip_path, tmp_path, capsys):
    """scripts/pacs_infer.py with a query and a credentials file: stores, then finds them present;
    a world-readable credentials file and wrong credentials are refused in one line."""
    path, _ = model
    study, _ = upload_study(orthanc, "P-COMMAND")
    credentials = tmp_path / "dicomweb.json"
    credentials.write_text(json.dumps({"user": USER, "password": PASSWORD}))
    credentials.chmod(0o600)
    env = {key: value for key, value in os.environ.items() if not key.startswith("MEDAD_DICOMWEB_")}
    command = [sys.executable, str(ROOT / "scripts" / "pacs_infer.py"), "--url", orthanc, "--query", "PatientID=P-COMMAND",
               "--model", str(path), "--clip-weights", str(tiny_clip_path), "--credentials", str(credentials),
               "--json", str(tmp_path / "summary.json"), "-v"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert result.stdout.strip().splitlines()[-1] == (
        f"{orthanc}: 1 study, 3 series scored, 8 objects stored, 0 objects already present, 1 without a Parametric Map (no plane geometry)"
    )
    assert PASSWORD not in output
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["studies"] == [study] and len(written["series"]) == 3
    assert PASSWORD not in (tmp_path / "summary.json").read_text()
    assert len(instances(orthanc, study)) == SLICES + 2 + 8

    # the rest runs in this process: main() as the command line calls it (scripts/ is on the path)
    from pacs_infer import main

    arguments = command[2:]
    assert main(arguments) == 0
    out, err = capsys.readouterr()
    assert out.strip().splitlines()[-1].endswith("0 series scored, 0 objects stored, 8 objects already present, 1 without a Parametric Map (no plane geometry)")
    credentials.chmod(0o644)
    assert main(arguments) == 1
    out, err = capsys.readouterr()
    assert err.strip().splitlines() == [
        f"pacs_infer: error: {credentials}: permissions 0644 are too open: a credentials file must be readable by "
        f"its owner only (chmod 600 {credentials})"
    ]
    credentials.write_text(json.dumps({"user": USER, "password": "wrong-Secret-3c4d"}))
    credentials.chmod(0o600)
    assert main(arguments) == 1
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pacs_infer: error: {orthanc}: access refused (HTTP 401)")
    assert "wrong-Secret-3c4d" not in out + err and PASSWORD not in out + err
    with pytest.raises(SystemExit) as usage:
        main(["--url", orthanc, "--study", "1.2", "--query", "PatientID=x", "--model", "m"])
    assert usage.value.code == 2
    assert len(instances(orthanc, study)) == SLICES + 2 + 8


def test_a_failing_series_does_not_stop_the_others(orthanc, model):
    """A series medad refuses (slices of two sizes) is reported with the endpoint, study and
    series; the study's other series are scored and stored."""
    path, detector = model
    study = generate_uid()
    good = ct_series(study, "P-FAIL", "AFAIL")
    bad = ct_series(study, "P-FAIL", "AFAIL")
    series = generate_uid()
    for k, ds in enumerate(bad[:3]):
        ds.SeriesInstanceUID = series
        if k == 2:
            ds.Rows = ds.Columns = 16
            ds.PixelData = ds.PixelData[: 16 * 16 * 2]
    client(orthanc).store_instances(good + bad[:3], study_instance_uid=study)
    summary = pacs.pacs_round_trip(orthanc, path, study=study, detector=detector,
                                   credentials=pacs.Credentials(USER, PASSWORD))
    assert not summary.ok and summary.series_scored == 1 and summary.objects_stored == 3
    assert [uid for uid, _ in summary.failed] == [series]
    message = summary.failed[0][1]
    assert "\n" not in message and message.startswith(f"{orthanc} study {study} series {series}: ")
    assert "applying transform" not in message and "shape" in message  # the reason, not MONAI's wrapper
    assert "1 series failed" in summary.line()
