"""The shared PACS of the tests: a private Orthanc with its DICOMweb plugin (Debian: apt-get install
orthanc orthanc-dicomweb) on free loopback ports, with a temporary storage folder and HTTP basic
authentication, and the synthetic studies the tests upload to it (a CT series with plane geometry,
a 2D MR slice, a radiograph).

Used by tests/test_pacs.py (medad's PACS round trip) and tests/test_monailabel.py (MONAI Label on
a DICOMweb datastore): ``from orthanc import orthanc`` makes the ``orthanc`` fixture available to
a test module; it skips where Orthanc or its DICOMweb plugin is not installed."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
dicomweb_client = pytest.importorskip("dicomweb_client")

import requests  # noqa: E402  (a dependency of dicomweb-client)
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402
from pydicom.valuerep import DSfloat  # noqa: E402

PLUGIN_PATHS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so",
    "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so",
)
USER, PASSWORD = "medad-test", "pacs-Secret-7f3a"
MR_CLASS = "1.2.840.10008.5.1.4.1.1.4"
DX_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
ROWS = COLUMNS = 32
SLICES = 8


# --------------------------------------------------------------------------------------------
# the PACS


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if os.access(p, os.X_OK)), None)


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    """A private Orthanc on loopback with the DICOMweb plugin and one registered user; yields
    its DICOMweb root URL. Skips where Orthanc or the plugin is not installed."""
    binary = _orthanc_binary()
    if binary is None:
        pytest.skip("Orthanc is not installed (apt-get install -y orthanc orthanc-dicomweb)")
    plugin = next((p for p in PLUGIN_PATHS if Path(p).exists()), None)
    if plugin is None:
        pytest.skip("the Orthanc DICOMweb plugin is not installed (apt-get install -y orthanc-dicomweb)")
    folder = tmp_path_factory.mktemp("orthanc")
    for attempt in range(3):  # a free port may be taken between the check and Orthanc's bind
        http_port, dicom_port = _free_port(), _free_port()
        config = {
            "Name": "medad-test",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "storage"),
            "HttpPort": http_port,
            "DicomPort": dicom_port,
            "DicomAet": "MEDADTEST",
            "RemoteAccessAllowed": False,  # loopback only
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD},
            "Plugins": [plugin],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False,
                         "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
            "StorageCompression": False,
            "HttpCompressionEnabled": False,
            "ConcurrentJobs": 1,
            "HttpThreadsCount": 8,
            "RestApiWriteToFileSystemEnabled": False,
            "ExecuteLuaEnabled": False,
        }
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        log = open(folder / f"orthanc-{attempt}.log", "wb")
        process = subprocess.Popen([binary, str(folder / "config.json")], stdout=log, stderr=subprocess.STDOUT, cwd=folder)
        base = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + 60
        ready = False
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if requests.get(f"{base}/system", auth=(USER, PASSWORD), timeout=2).status_code == 200:
                    ready = True
                    break
            except requests.RequestException:
                pass
            time.sleep(0.2)
        if ready:
            break
        process.kill()
        process.wait(timeout=10)
        log.close()
    else:
        pytest.fail("Orthanc did not start:\n" + (folder / "orthanc-2.log").read_text(errors="replace")[-3000:])
    yield f"{base}/dicom-web"
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
    log.close()


def client(url: str, user: str = USER, password: str = PASSWORD):
    session = requests.Session()
    session.auth = (user, password)
    return dicomweb_client.DICOMwebClient(url=url, session=session)


# --------------------------------------------------------------------------------------------
# synthetic sources (as tests/test_dicom_results.py builds them)


def _ds(values) -> list:
    return [DSfloat(float(v), auto_format=True) for v in values]


def _base(sop_class: str, study: str, patient: str, accession: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Pacs", patient, "19700101", "O"
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = study, "20260101", "120000"
    ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = accession, "1", ""
    ds.Manufacturer = "Synthetic"
    return ds


def ct_series(study: str, patient: str, accession: str) -> list[Dataset]:
    """An axial CT series of SLICES slices of ROWS x COLUMNS with plane geometry: a bright blob
    in the middle slices on a textured background."""
    series, frame = generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:ROWS, :COLUMNS]
    out = []
    for k in range(SLICES):
        ds = _base(CTImageStorage, study, patient, accession)
        ds.SeriesInstanceUID, ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = series, frame, ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.AcquisitionNumber, ds.KVP = "CT", 1, k + 1, 1, 120
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = _ds((1, 0, 0, 0, 1, 0))
        ds.ImagePositionPatient = _ds((-20.0, -20.0, 40.0 - 2.5 * k))
        ds.PixelSpacing, ds.SliceThickness = _ds((1.25, 1.25)), DSfloat(2.5, auto_format=True)
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = ROWS, COLUMNS, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, -1024, "HU"
        pixels = 1024 + 40 + rng.normal(0, 20, (ROWS, COLUMNS)) + 30 * np.sin(xx / 3.0)
        if 2 <= k <= 5:
            pixels += 300 * ((yy - 16) ** 2 + (xx - 12) ** 2 < 25)
        ds.PixelData = np.clip(pixels, 0, 4095).astype(np.uint16).tobytes()
        ds.preamble = b"\0" * 128  # a DICOM file as a modality sends it
        out.append(ds)
    return out


def mr_slice(study: str, patient: str, accession: str) -> Dataset:
    """A single-frame 2D MR image (one axial slice) with plane geometry, not square."""
    ds = _base(MR_CLASS, study, patient, accession)
    ds.SeriesInstanceUID, ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = generate_uid(), generate_uid(), ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", 3, 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M"]
    ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "2D"
    ds.ImageOrientationPatient = _ds((1, 0, 0, 0, 1, 0))
    ds.ImagePositionPatient = _ds((5.0, -30.0, 60.0))
    ds.PixelSpacing, ds.SliceThickness = _ds((0.9, 0.9)), DSfloat(4.0, auto_format=True)
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 36, 44, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    yy, xx = np.mgrid[:36, :44]
    pixels = 400 + 150 * np.sin(xx / 5.0) + 900 * ((yy - 18) ** 2 + (xx - 30) ** 2 < 20)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.preamble = b"\0" * 128
    return ds


def radiograph(study: str, patient: str, accession: str) -> Dataset:
    """A single-frame 2D digital radiograph (no plane geometry) with a frame of reference, without
    the DICOM file preamble: Orthanc stores and returns it so, which dicomweb-client cannot read
    (the round trip reads it with pydicom's force)."""
    ds = _base(DX_CLASS, study, patient, accession)
    ds.SeriesInstanceUID, ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = generate_uid(), generate_uid(), ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "DX", 2, 1
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType, ds.PatientOrientation = "FOR PRESENTATION", ["L", "F"]
    ds.ImagerPixelSpacing = ds.PixelSpacing = _ds((0.5, 0.5))
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 48, 40, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    yy, xx = np.mgrid[:48, :40]
    pixels = 1500 + 600 * np.cos(xx / 6.0) * np.sin(yy / 7.0) + 1200 * ((yy - 30) ** 2 + (xx - 20) ** 2 < 16)
    ds.PixelData = np.clip(pixels, 0, 4095).astype(np.uint16).tobytes()
    return ds


def upload_study(url: str, patient: str) -> tuple[str, list[list[Dataset]]]:
    """A new study with a CT series, an MR slice and a radiograph, stored with STOW-RS: its UID
    and the source series."""
    study = generate_uid()
    accession = f"A{patient}"
    sources = [ct_series(study, patient, accession), [mr_slice(study, patient, accession)], [radiograph(study, patient, accession)]]
    client(url).store_instances([ds for series in sources for ds in series], study_instance_uid=study)
    return study, sources
