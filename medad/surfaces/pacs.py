"""A PACS round trip over DICOMweb: find a study (by StudyInstanceUID or a QIDO-RS query such as
``PatientID``, ``AccessionNumber``, ``StudyDate``), retrieve each of its image series (WADO-RS),
score it with a medad model (:func:`medad.surfaces.predict.predict_input`: a series of slices or a
multi-frame image as a volume, a single-frame image alone) and store the results back under the
same study (STOW-RS): the anomaly map as a Parametric Map, the thresholded region as a binary
Segmentation and the score and decision as a TID 1500 Structured Report
(:mod:`medad.io.dicom_results`).

Idempotent: every result object has UIDs derived from its source series' instances, the model
file's SHA-256 and the object's kind (:func:`medad.io.dicom_results.result_uids`), and an object
whose SOP Instance UID the PACS already finds (QIDO-RS) is not stored again; a series whose
objects are all there is not even retrieved. Series that are not images to score (SEG, SR,
Parametric Maps, presentation states, key objects, RT, documents, medad's own results) are left
alone. highdicom 0.28 builds no Parametric Map of an image without a frame of reference and
plane geometry (secondary captures, radiographs): such an image gets its Segmentation and report
only, and the summary says so.

Credentials never come from the command line (:func:`resolve_credentials`): the environment
(``MEDAD_DICOMWEB_TOKEN`` for a bearer token, or ``MEDAD_DICOMWEB_USER`` and
``MEDAD_DICOMWEB_PASSWORD`` for HTTP basic authentication) or a file that only its owner can read
(:func:`read_credentials`: JSON or netrc-like). They are never printed or logged, and every error
message is stripped of them.

``dicomweb-client`` is an optional dependency (``pip install medad[dicom]``), imported only here
when a client is made. The command line: ``scripts/pacs_infer.py``.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from medad.io.files import content_sha256

__all__ = [
    "Credentials",
    "PacsError",
    "PacsSummary",
    "RESULT_KINDS",
    "pacs_round_trip",
    "read_credentials",
    "resolve_credentials",
]

logger = logging.getLogger(__name__)

#: Why an image without a frame of reference or plane geometry gets no Parametric Map.
NO_MAP = "not built: no frame of reference and plane geometry (highdicom 0.28 builds no Parametric Map without)"

#: The result objects stored for each source series, in the order they are stored (the report
#: lists the map and the segmentation as its evidence): the kinds (and so the UIDs) of the bundle's
#: DICOM output (:func:`medad.io.dicom_results.write_results`), so that a PACS holds one copy of
#: each whichever way it came.
RESULT_KINDS = ("parametric_map", "segmentation", "report")

ENV_USER, ENV_PASSWORD, ENV_TOKEN = "MEDAD_DICOMWEB_USER", "MEDAD_DICOMWEB_PASSWORD", "MEDAD_DICOMWEB_TOKEN"

# SOP classes that are no images to score: results (Parametric Map, SEG, every SR, key objects),
# presentation states, RT objects, encapsulated documents, raw data, registrations, surfaces.
_NOT_SOURCE_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.30",  # Parametric Map
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, registrations, fiducials, segmentation (66.x)
    "1.2.840.10008.5.1.4.1.1.67",  # real world value mapping
    "1.2.840.10008.5.1.4.1.1.88",  # structured reports, key object selection
    "1.2.840.10008.5.1.4.1.1.11",  # presentation states
    "1.2.840.10008.5.1.4.1.1.481",  # RT objects
    "1.2.840.10008.5.1.4.1.1.104",  # encapsulated PDF, CDA, STL
    "1.2.840.10008.5.1.4.1.1.68",  # surface segmentation, point clouds
)
_NOT_SOURCE_MODALITIES = {"SEG", "SR", "KO", "PR", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "DOC", "REG", "FID", "RWV"}

# DICOM JSON tags (PS3.18 F.2)
_STUDY, _SERIES, _SOP, _SOP_CLASS = "0020000D", "0020000E", "00080018", "00080016"
_MODALITY, _MANUFACTURER, _FRAME_OF_REFERENCE, _FRAMES = "00080060", "00080070", "00200052", "00280008"
_POSITION, _ORIENTATION = "00200032", "00200037"
_PIXEL_DATA = ("7FE00010", "7FE00008", "7FE00009")


class PacsError(RuntimeError):
    """A round trip that cannot go on: the one-line message names the endpoint and, where it
    applies, the study; it never holds a credential. ``status``: the HTTP status, where one came."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------------------------
# credentials


@dataclass(frozen=True)
class Credentials:
    """HTTP basic (``user``, ``password``) or bearer (``token``) credentials for a DICOMweb
    endpoint. Their ``repr`` hides the secrets.

    >>> Credentials(user="reader", password="secret")
    Credentials(user='reader', password=***)
    >>> Credentials(token="abc")
    Credentials(token=***)
    """

    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    source: str = field(default="", repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.token is None and (self.user is None or self.password is None):
            raise ValueError(f"{self.source or 'credentials'}: give a token, or a user and a password")

    def __repr__(self) -> str:
        if self.token is not None:
            return "Credentials(token=***)"
        return f"Credentials(user={self.user!r}, password=***)"

    def secrets(self) -> list[str]:
        """What must never appear in a message."""
        return [value for value in (self.password, self.token) if value]

    def auth(self) -> Any:
        """A ``requests`` authentication object for these credentials."""
        import requests

        if self.token is not None:
            return _BearerAuth(self.token)
        return requests.auth.HTTPBasicAuth(self.user, self.password)


class _BearerAuth:
    """``Authorization: Bearer <token>`` on each request (a ``requests`` auth callable), kept out
    of the session's headers, which dicomweb-client logs at debug level."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, request: Any) -> Any:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return "_BearerAuth(***)"


def _check_private(path: Path) -> None:
    """Refuse a credentials file that others can read or write (as ssh refuses a private key)."""
    try:
        info = path.stat()
    except OSError as error:
        raise PacsError(f"{path}: cannot read the credentials file ({error.strerror or error})") from None
    if not stat.S_ISREG(info.st_mode):
        raise PacsError(f"{path}: the credentials file is not a regular file")
    if os.name == "posix" and info.st_uid not in (os.getuid(), 0):
        raise PacsError(f"{path}: the credentials file belongs to another user (uid {info.st_uid}): it must be yours")
    if os.name == "posix" and info.st_mode & 0o077:
        raise PacsError(
            f"{path}: permissions {stat.S_IMODE(info.st_mode):04o} are too open: a credentials file must be "
            f"readable by its owner only (chmod 600 {path})"
        )


def read_credentials(path: str | os.PathLike, host: str | None = None) -> Credentials:
    """Credentials from a file that only its owner can read and write (mode 600 or stricter;
    anything more open is refused, as ssh refuses a private key).

    Formats: JSON, ``{"user": ..., "password": ...}`` or ``{"token": ...}`` (``login`` and
    ``username`` are taken for ``user``); or netrc-like lines, ``machine <host> login <user>
    password <password>`` (a ``default`` entry matches any host; the entry for ``host``, the
    endpoint's host name, wins), where ``token <token>`` may stand for login and password.
    Errors name the file and never a value from it.
    """
    path = Path(path)
    _check_private(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise PacsError(f"{path}: cannot read the credentials file ({type(error).__name__})") from None
    source = str(path)
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise PacsError(f"{path}: not valid JSON (line {error.lineno})") from None
        if not isinstance(data, Mapping):
            raise PacsError(f"{path}: expected a JSON object with user and password, or token")
        user = data.get("user", data.get("login", data.get("username")))
        values = {"user": user, "password": data.get("password"), "token": data.get("token")}
        return _credentials(values, source)
    entries: dict[str | None, dict[str, str]] = {}
    current: dict[str, str] | None = None
    tokens = text.split()
    k = 0
    while k < len(tokens):
        word = tokens[k]
        if word == "default":
            current = entries.setdefault(None, {})
            k += 1
            continue
        if k + 1 >= len(tokens):
            raise PacsError(f"{path}: a netrc-like file ends after {word!r}" if word in _NETRC_WORDS else f"{path}: malformed netrc-like file")
        value = tokens[k + 1]
        if word == "machine":
            current = entries.setdefault(value, {})
        elif word in _NETRC_WORDS and current is not None:
            current[_NETRC_WORDS[word]] = value
        else:  # never echo the word: it may be a secret
            raise PacsError(f"{path}: malformed netrc-like file (expected machine, default, login, password or token)")
        k += 2
    entry = entries.get(host) if host in entries else entries.get(None)
    if entry is None:
        raise PacsError(f"{path}: no entry for {host or 'this host'} and no default entry")
    return _credentials(entry, source)


_NETRC_WORDS = {"login": "user", "user": "user", "password": "password", "token": "token", "account": "account"}


def _credentials(values: Mapping[str, Any], source: str) -> Credentials:
    for key in ("user", "password", "token"):
        if values.get(key) is not None and not isinstance(values.get(key), str):
            raise PacsError(f"{source}: {key} must be a string")
    try:
        return Credentials(values.get("user"), values.get("password"), values.get("token"), source=source)
    except ValueError as error:
        raise PacsError(str(error)) from None


def resolve_credentials(
    credentials_file: str | os.PathLike | None = None, host: str | None = None, environ: Mapping[str, str] | None = None
) -> Credentials | None:
    """The credentials for an endpoint: from ``credentials_file`` where given
    (:func:`read_credentials`), else from the environment (``MEDAD_DICOMWEB_TOKEN``, or
    ``MEDAD_DICOMWEB_USER`` with ``MEDAD_DICOMWEB_PASSWORD``), else ``None`` (no authentication).

    >>> resolve_credentials(environ={"MEDAD_DICOMWEB_USER": "reader", "MEDAD_DICOMWEB_PASSWORD": "secret"})
    Credentials(user='reader', password=***)
    >>> resolve_credentials(environ={}) is None
    True
    """
    if credentials_file is not None:
        return read_credentials(credentials_file, host)
    environ = os.environ if environ is None else environ
    token, user, password = environ.get(ENV_TOKEN), environ.get(ENV_USER), environ.get(ENV_PASSWORD)
    if token:
        return Credentials(token=token, source=ENV_TOKEN)
    if user or password:
        if not (user and password):
            missing = ENV_PASSWORD if user else ENV_USER
            raise PacsError(f"{missing} is not set: give both {ENV_USER} and {ENV_PASSWORD}, or {ENV_TOKEN}")
        return Credentials(user=user, password=password, source="environment")
    return None


# --------------------------------------------------------------------------------------------
# results


@dataclass
class PacsSummary:
    """What a round trip did.

    Attributes:
        url: the DICOMweb endpoint.
        studies: the StudyInstanceUIDs processed.
        series_scored: source series retrieved and scored (``series``: per series, its study,
            kind, instance count, score, decision and the objects' status).
        objects_stored: result objects stored (STOW-RS) by this run.
        objects_present: result objects the PACS already held (a rerun), not stored again.
        maps_not_built: series without a frame of reference and plane geometry, which get no
            Parametric Map (:data:`NO_MAP`).
        skipped: ``(series UID, reason)`` of series not scored (not images, other results); the
            results of this model are not listed.
        failed: ``(series UID, message)`` of series that could not be scored or stored.
    """

    url: str
    studies: list[str] = field(default_factory=list)
    series_scored: int = 0
    objects_stored: int = 0
    objects_present: int = 0
    maps_not_built: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    series: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def line(self) -> str:
        """One line: series scored, objects stored, objects already present (and skipped, failed)."""
        text = (
            f"{self.url}: {len(self.studies)} stud{'y' if len(self.studies) == 1 else 'ies'}, "
            f"{self.series_scored} series scored, {self.objects_stored} objects stored, "
            f"{self.objects_present} objects already present"
        )
        if self.maps_not_built:
            text += f", {self.maps_not_built} without a Parametric Map (no plane geometry)"
        if self.skipped:
            text += f", {len(self.skipped)} series skipped"
        if self.failed:
            text += f", {len(self.failed)} series failed"
        return text


# --------------------------------------------------------------------------------------------
# the round trip


def _dicomweb_client() -> Any:
    try:
        import dicomweb_client
    except ImportError as error:
        raise ImportError("the PACS round trip (DICOMweb) needs dicomweb-client: pip install medad[dicom]") from error
    return dicomweb_client


def _check_url(url: str) -> str:
    try:
        parts = urlsplit(url)
        userinfo = parts.username is not None or parts.password is not None
    except ValueError:  # an invalid port, say: never echo a URL that may hold a credential
        raise PacsError("the DICOMweb endpoint URL is not valid") from None
    if userinfo:  # never echo the URL: it holds a credential
        raise PacsError(
            f"{parts.scheme}://{parts.hostname}{parts.path}: credentials in the URL are refused: "
            f"use {ENV_USER}/{ENV_PASSWORD}, {ENV_TOKEN} or a credentials file"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PacsError(f"{url}: not an http(s) DICOMweb endpoint URL")
    return url.rstrip("/")


def _value(item: Mapping[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value")
    return values[0] if values else None


class _Client:
    """dicomweb-client calls with errors turned into one-line :class:`PacsError` messages that
    name the endpoint (and study) and hold no credential."""

    def __init__(self, url: str, credentials: Credentials | None, timeout: float) -> None:
        import requests

        web = _dicomweb_client()
        self.url = url
        self.secrets = credentials.secrets() if credentials is not None else []
        #: the HTTP session of every call (its authentication), also for the forced WADO reads
        self.session = requests.Session()
        if credentials is not None:
            self.session.auth = credentials.auth()
        self.client = web.DICOMwebClient(url=url, session=self.session, timeout=timeout)
        self.client.set_http_retry_params(retry=False)
        self.timeout = timeout

    def clean(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return " ".join(text.split())

    def call(self, what: str, study: str | None, function: Any, *args: Any, **kwargs: Any) -> Any:
        import requests

        where = f"{self.url}" + (f" study {study}" if study else "")
        try:
            return function(*args, **kwargs)
        except requests.HTTPError as error:
            status = error.response.status_code if error.response is not None else None
            if status in (401, 403):
                reason = (
                    f"access refused (HTTP {status}) while trying to {what}: check the credentials "
                    f"({ENV_USER}/{ENV_PASSWORD}, {ENV_TOKEN} or --credentials)"
                )
            elif status == 404:
                reason = f"not found (HTTP 404) while trying to {what}"
            else:
                reason = f"HTTP {status} while trying to {what}"
            raise PacsError(self.clean(f"{where}: {reason}"), status) from None
        except requests.ConnectionError:
            raise PacsError(self.clean(f"{where}: cannot connect to the DICOMweb endpoint to {what}")) from None
        except requests.Timeout:
            raise PacsError(self.clean(f"{where}: the DICOMweb endpoint did not answer in time to {what}")) from None
        except requests.RequestException as error:
            raise PacsError(self.clean(f"{where}: cannot {what} ({type(error).__name__})")) from None


def _studies(client: _Client, study: str | None, query: Mapping[str, str] | None) -> list[str]:
    if (study is None) == (not query):
        raise PacsError(f"{client.url}: give a study (StudyInstanceUID) or a query, not both and not neither")
    if study is not None:
        found = client.call(
            "find the study", study, client.client.search_for_studies, search_filters={"StudyInstanceUID": study}
        )
        if not found:
            raise PacsError(f"{client.url} study {study}: no such study")
        return [study]
    from pydicom.datadict import tag_for_keyword

    for key in query:
        if tag_for_keyword(key) is None:
            raise PacsError(f"{client.url}: {key!r} is not a DICOM keyword (e.g. PatientID, AccessionNumber, StudyDate)")
    text = ", ".join(f"{key}={value}" for key, value in query.items())
    found = client.call(f"search studies ({text})", None, client.client.search_for_studies, search_filters=dict(query))
    studies = sorted({str(_value(item, _STUDY)) for item in found if _value(item, _STUDY)})
    if not studies:
        raise PacsError(f"{client.url}: no study matches {text}")
    return studies


@dataclass
class _Source:
    """A source series as its metadata (WADO-RS) describes it."""

    study: str
    series: str
    headers: list[Any]  # pydicom data sets with the identifying attributes only
    modality: str | None
    reason: str | None = None  # why it is not scored


def _series_sources(client: _Client, study: str) -> list[_Source]:
    from pydicom import Dataset

    found = client.call("list the study's series", study, client.client.search_for_series, study_instance_uid=study)
    sources = []
    for item in sorted(found, key=lambda item: str(_value(item, _SERIES))):
        series = str(_value(item, _SERIES))
        modality = _value(item, _MODALITY)
        if modality in _NOT_SOURCE_MODALITIES:
            sources.append(_Source(study, series, [], modality, f"not an image to score (modality {modality})"))
            continue
        metadata = client.call(
            f"read the metadata of series {series}", study, client.client.retrieve_series_metadata,
            study_instance_uid=study, series_instance_uid=series,
        )
        headers = []
        reason = None
        for instance in metadata:
            ds = Dataset()
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = str(_value(instance, _SOP))
            ds.SOPClassUID = str(_value(instance, _SOP_CLASS))
            if _value(instance, _FRAME_OF_REFERENCE):
                ds.FrameOfReferenceUID = str(_value(instance, _FRAME_OF_REFERENCE))
            if _value(instance, _POSITION) is not None and _value(instance, _ORIENTATION) is not None:
                ds.ImagePositionPatient = instance[_POSITION]["Value"]
            ds.NumberOfFrames = int(_value(instance, _FRAMES) or 1)
            headers.append(ds)
            sop_class = str(ds.SOPClassUID)
            if reason is None and any(sop_class == c or sop_class.startswith(c + ".") for c in _NOT_SOURCE_CLASSES):
                reason = f"not an image to score (SOP class {sop_class})"
            elif reason is None and not any(tag in instance for tag in _PIXEL_DATA):
                reason = "no pixel data"
            elif reason is None and _value(instance, _MANUFACTURER) == "medad":
                reason = "medad's own result"
        if not headers:
            reason = "no instances"
        sources.append(_Source(study, series, headers, modality, reason))
    return sources


def _present(client: _Client, study: str, uids: Mapping[str, str]) -> bool:
    found = client.call(
        f"look for instance {uids['sop_instance_uid']}", study, client.client.search_for_instances,
        study_instance_uid=study, search_filters={"SOPInstanceUID": uids["sop_instance_uid"]},
    )
    return any(str(_value(item, _SOP)) == uids["sop_instance_uid"] for item in found)


def _retrieve_series(client: _Client, study: str, series: str) -> list[Any]:
    """The series' instances (WADO-RS). A server that returns instances without the DICOM file
    preamble (as some store what a client sent without one) is read again with pydicom's
    ``force``, which dicomweb-client does not use."""
    from pydicom.errors import InvalidDicomError

    try:
        return client.client.retrieve_series(study_instance_uid=study, series_instance_uid=series)
    except InvalidDicomError:
        logger.info("series %s: instances without the DICOM file preamble, read again", series)
    return _retrieve_forced(client, f"{client.url}/studies/{study}/series/{series}")


def _retrieve_forced(client: _Client, url: str) -> list[Any]:
    """A WADO-RS multipart/related answer's parts read with ``pydicom.dcmread(force=True)``."""
    from io import BytesIO

    import pydicom

    response = client.session.get(url, headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
                           timeout=client.timeout)
    response.raise_for_status()
    content_type = response.headers.get("Content-Type", "")
    boundary = next(
        (part.split("=", 1)[1].strip().strip('"') for part in content_type.split(";") if part.strip().lower().startswith("boundary=")),
        None,
    )
    if boundary is None:
        raise ValueError(f"{url}: a WADO-RS answer without a multipart boundary ({content_type.split(';')[0]})")
    datasets = []
    for part in response.content.split(b"--" + boundary.encode()):
        if part.strip() in (b"", b"--"):
            continue
        head, sep, body = part.partition(b"\r\n\r\n")
        if not sep:
            continue
        if body.endswith(b"\r\n"):
            body = body[:-2]
        datasets.append(pydicom.dcmread(BytesIO(body), force=True))
    return datasets


def _score(detector: Any, datasets: Sequence[Any], window: Any) -> tuple[Any, Any]:
    """``predict_input`` on the retrieved instances, written to a private temporary folder: a
    series (or a multi-frame image) as a volume, a single-frame image alone; the map and its
    affine for :mod:`medad.io.dicom_results` (``None`` for a 2D image's ``(rows, columns)`` map)."""
    from medad.surfaces.predict import predict_input

    with tempfile.TemporaryDirectory(prefix="medad-pacs-") as folder:
        for k, ds in enumerate(datasets):
            ds.save_as(os.path.join(folder, f"{k:06d}.dcm"), enforce_file_format=True)
        path = folder if len(datasets) > 1 else os.path.join(folder, "000000.dcm")
        prediction = predict_input(detector, path, window=window)
    affine = prediction.meta["affine"] if prediction.kind == "volume" else None
    return prediction, affine


def pacs_round_trip(
    url: str,
    model: str | os.PathLike,
    study: str | None = None,
    query: Mapping[str, str] | None = None,
    clip_weights: str | os.PathLike | None = None,
    credentials: Credentials | None = None,
    credentials_file: str | os.PathLike | None = None,
    detector: Any = None,
    device: str = "cpu",
    window: str | list[float] | None = None,
    timeout: float = 300.0,
) -> PacsSummary:
    """Score a study in a PACS and store the results back under it, over DICOMweb.

    Args:
        url: the DICOMweb endpoint (QIDO-RS, WADO-RS and STOW-RS under one root), e.g.
            ``https://pacs.example.org/dicom-web``; credentials in it are refused.
        model: the medad ``model.pt``; its SHA-256 is the model's part of the results' UIDs.
        study: a StudyInstanceUID; or ``query``: QIDO-RS study attributes by DICOM keyword
            (``{"PatientID": "123"}``, ``{"AccessionNumber": "A1"}``, ``{"StudyDate": "20260101"}``),
            every matching study processed.
        clip_weights: the CLIP weights (:func:`medad.load_detector`).
        credentials: given as an object; else ``credentials_file``, else the environment
            (:func:`resolve_credentials`).
        detector: an already loaded detector of ``model`` (else loaded here on ``device``).
        window: the CT window for volumes (:func:`medad.surfaces.predict.predict_input`).
        timeout: seconds to wait for each HTTP answer.

    Returns:
        a :class:`PacsSummary`. A series that cannot be scored or stored is listed in ``failed``
        and the others go on; an endpoint, credentials or study problem raises :class:`PacsError`.
    """
    from medad.io import dicom_results as dr

    url = _check_url(url)
    if credentials is None:
        credentials = resolve_credentials(credentials_file, urlsplit(url).hostname)
    client = _Client(url, credentials, timeout)
    studies = _studies(client, study, query)
    key = content_sha256(model)  # the model's part of the results' UIDs, as the bundle's
    if detector is None:
        from medad.model.factory import load_detector

        detector = load_detector(model, clip_weights, device=device)
    description = detector.description
    summary = PacsSummary(url=url, studies=studies)
    for uid in studies:
        sources = _series_sources(client, uid)
        ours = {  # this model's results of this study's series: not reported as skipped
            dr.result_uids(source.headers, key, kind)["series_instance_uid"]
            for source in sources if source.reason is None for kind in RESULT_KINDS
        }
        for source in sources:
            if source.reason is not None:
                if source.series in ours:
                    logger.debug("series %s: a result of this model", source.series)
                    continue
                logger.info("series %s: skipped, %s", source.series, source.reason)
                summary.skipped.append((source.series, source.reason))
                continue
            record: dict[str, Any] = {"study": uid, "series": source.series, "instances": len(source.headers), "objects": {}}
            summary.series.append(record)
            kinds = [kind for kind in RESULT_KINDS if kind != "parametric_map" or dr.places_a_map(source.headers)]
            if "parametric_map" not in kinds:
                record["objects"]["parametric_map"] = {"status": NO_MAP}
                summary.maps_not_built += 1
            uids = {kind: dr.result_uids(source.headers, key, kind) for kind in kinds}
            present = {kind for kind in kinds if _present(client, uid, uids[kind])}
            for kind in present:
                record["objects"][kind] = {"status": "present", **uids[kind]}
            summary.objects_present += len(present)
            if len(present) == len(kinds):
                logger.info("series %s: its %d result objects are already stored", source.series, len(kinds))
                continue
            started = time.perf_counter()
            try:
                datasets = client.call(f"retrieve series {source.series}", uid, _retrieve_series, client, uid, source.series)
                prediction, affine = _score(detector, datasets, window)
                thresholds = prediction.thresholds
                objects = dr.result_objects(
                    datasets, prediction.anomaly_map, affine, score=prediction.score, anomalous=prediction.anomalous,
                    threshold=thresholds.image, rule=thresholds.image_rule, pixel_threshold=thresholds.pixel,
                    pixel_rule=thresholds.pixel_rule, model=description, model_key=key, p_value=prediction.p_value,
                )
            except PacsError:
                raise
            except (ValueError, RuntimeError, OSError) as error:  # DicomResultError, refusals of the input
                from medad.surfaces.workflow import error_summary  # the reason at the root of MONAI's wrappers

                message = client.clean(f"{url} study {uid} series {source.series}: {error_summary(error)[0]}")
                logger.warning("%s", message)
                summary.failed.append((source.series, message))
                continue
            summary.series_scored += 1
            record.update(kind=prediction.kind, score=prediction.score, anomalous=bool(prediction.anomalous),
                          seconds=round(time.perf_counter() - started, 3))
            missing = [objects[kind] for kind in kinds if kind not in present]
            try:
                response = client.call(
                    f"store {len(missing)} result objects of series {source.series}", uid, client.client.store_instances,
                    datasets=missing, study_instance_uid=uid,
                )
            except PacsError as error:
                if error.status is None or error.status in (401, 403):
                    raise  # the endpoint or the credentials: no other series would fare better
                logger.warning("%s", error)
                summary.failed.append((source.series, str(error)))
                continue
            failed = {str(item.ReferencedSOPInstanceUID) for item in getattr(response, "FailedSOPSequence", [])}
            for kind in kinds:
                if kind in present:
                    continue
                if objects[kind].SOPInstanceUID in failed:
                    summary.failed.append((source.series, f"{url} study {uid} series {source.series}: the PACS refused the {kind}"))
                    record["objects"][kind] = {"status": "refused", **uids[kind]}
                else:
                    summary.objects_stored += 1
                    record["objects"][kind] = {"status": "stored", **uids[kind]}
            logger.info(
                "series %s: score %.4f (%s), stored %d objects",
                source.series, prediction.score, "anomalous" if prediction.anomalous else "normal", len(missing) - len(failed),
            )
    return summary
