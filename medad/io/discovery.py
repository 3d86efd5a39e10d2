"""Finding the cases to run inference on: which files and folders are inputs, of which kind.

:func:`list_inputs` turns the path a user gives (one file, or a folder of cases) into the sorted
cases of one kind (:class:`ClinicalInputs`): 2D images, or volumes (NIfTI files, DICOM files,
DICOM series folders), as :func:`input_kind` tells them apart from the files' names and DICOM
headers. It refuses, before anything is read or scored, a folder that mixes the two kinds (unless
``kind`` keeps one), a folder holding several DICOM series, DICOM series as loose files beside
other inputs, and inputs whose output files would overwrite each other (the same
:func:`medad.io.files.output_stem`). The input checks (:mod:`medad.io.checks`) and volume scoring
(:mod:`medad.engine.volumes`) come after it.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from medad.io.data import IMAGE_SUFFIXES
from medad.io.files import output_stem
from medad.io.transforms import import_pydicom, is_colour_dicom_image, is_dicom_file

__all__ = [
    "DATALIST_KEYS", "INPUT_KINDS", "LIST_SUFFIXES", "NIFTI_SUFFIXES", "ClinicalInputs", "input_kind", "is_dicom_input",
    "list_inputs", "read_input_list",
]

#: ``input_kind`` values: decide from the files, or keep only 2D images or only volumes.
INPUT_KINDS = ("auto", "image", "volume")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _found_under(folder: Path) -> dict[Path, str | None]:
    """The inputs under ``folder`` and their kinds (:func:`input_kind`), depth first in sorted
    order: a subfolder holding DICOM files is one series (one input), any other is searched."""
    found: dict[Path, str | None] = {}
    for path in _visible(folder):
        kind = input_kind(path)
        if path.is_dir() and kind is None:
            found.update(_found_under(path))
        else:
            found[path] = kind
    return found


#: Input lists (:func:`read_input_list`): a CSV table with an ``image`` column, or JSON.
LIST_SUFFIXES = (".csv", ".json")
#: The lists of a MONAI datalist JSON read for inference, in order of preference.
DATALIST_KEYS = ("test", "testing", "validation", "training")


def _listed_kind(path: str) -> str | None:
    """:func:`input_kind` of a listed case; one that does not exist by its name alone."""
    if os.path.exists(path):
        return input_kind(path)
    name = path.lower()
    return "image" if name.endswith(IMAGE_SUFFIXES) else "volume" if name.endswith(NIFTI_SUFFIXES) else None


def read_input_list(path: str | os.PathLike) -> list[str]:
    """The cases a list file names, in its order, relative paths taken from the list's folder:
    a CSV table with an ``image`` column (MONAI's ``CSVDataset``), a JSON list of paths (or of
    items with ``image``), or a MONAI datalist (``load_decathlon_datalist``: its only list, else
    the first of :data:`DATALIST_KEYS` it holds)."""
    import json

    from monai.data import CSVDataset, load_decathlon_datalist

    path = Path(path)
    base = path.parent
    if path.suffix.lower() == ".csv":
        try:
            rows = list(CSVDataset(src=str(path), col_names=["image"]))
        except (KeyError, ValueError) as error:
            raise ValueError(f"{path}: not a CSV table with an 'image' column of input paths ({error})") from error
        return [os.path.normpath(os.path.join(base, str(row["image"]))) for row in rows]
    try:
        content = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path}: not a JSON list of inputs ({error})") from error
    if isinstance(content, dict):
        lists = [key for key, value in content.items() if isinstance(value, list)]
        key = lists[0] if len(lists) == 1 else next((k for k in DATALIST_KEYS if k in lists), None)
        if key is None:
            raise ValueError(f"{path}: a datalist with the lists {lists}: keep one, or name it one of {list(DATALIST_KEYS)}")
        items = load_decathlon_datalist(path, is_segmentation=False, data_list_key=key, base_dir=base)
        return [str(item["image"]) for item in items]
    if isinstance(content, list) and all(isinstance(item, (str, dict)) for item in content):
        try:
            images = [item if isinstance(item, str) else item["image"] for item in content]
        except KeyError:
            raise ValueError(f"{path}: an item of the list has no 'image'") from None
        return [os.path.normpath(os.path.join(base, str(image))) for image in images]
    raise ValueError(f"{path}: a JSON input list is a list of paths, of items with 'image', or a MONAI datalist")


def is_dicom_input(path: str | os.PathLike) -> bool:
    """Whether an input is DICOM: a DICOM file (:func:`medad.io.transforms.is_dicom_file`) or a
    folder holding DICOM files (a series)."""
    path = Path(path)
    if path.is_dir():
        return any(p.is_file() and is_dicom_file(p) for p in _visible(path))
    return is_dicom_file(path)


def input_kind(path: str | os.PathLike) -> str | None:
    """``"image"`` (PNG, JPEG, BMP, TIFF, single-frame colour DICOM), ``"volume"`` (NIfTI, any other
    DICOM file, folder holding DICOM files) or ``None`` (anything else).

    A single-frame colour DICOM (``SamplesPerPixel`` 3 or PALETTE COLOR: photographs,
    dermoscopy, endoscopy, secondary captures) is a 2D colour image, as a PNG of it would be
    (:func:`medad.io.transforms.is_colour_dicom_image`, from its header); multi-frame colour DICOM
    files are volumes, which the checks refuse with the reason."""
    path = Path(path)
    if path.is_dir():
        return "volume" if is_dicom_input(path) else None
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
    pydicom = import_pydicom()
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
    """The cases to run inference on: a folder's sorted (depth first), a list's in its order.

    ``path`` is one file (one case), a folder holding cases, searched through its subfolders:
    2D images (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``, ``.tif``, ``.tiff``), NIfTI files
    (``.nii``, ``.nii.gz``), DICOM files (``.dcm`` or any name with the DICOM prefix; single- or
    multi-frame) and DICOM series (folders of DICOM files of one series each). A folder whose
    files are all DICOM files of one series is itself one series. A single-frame colour DICOM
    file is a 2D image (:func:`input_kind`). Other files are ignored. Or ``path`` is a list of
    cases (:data:`LIST_SUFFIXES`, :func:`read_input_list`): every listed case is kept, a missing
    or unreadable one for the input checks to report.

    ``kind``: ``"auto"`` takes the kind of all the cases found and refuses a mix of 2D images and
    volumes (they run through different pipelines); ``"image"`` or ``"volume"`` keeps that kind.
    """
    if kind not in INPUT_KINDS:
        raise ValueError(f"input_kind must be one of {INPUT_KINDS}, got {kind!r}")
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"input not found: {root}")
    listed = root.is_file() and root.name.lower().endswith(LIST_SUFFIXES)
    if listed:
        # every listed case stays: one that is missing or unreadable is reported by the input checks
        found = {Path(p): _listed_kind(p) for p in read_input_list(root)}
    elif root.is_file():
        found = {root: input_kind(root)}
        if found[root] is None:
            raise ValueError(f"{root}: not a supported input (2D image, NIfTI or DICOM)")
    else:
        found = {p: k for p, k in _found_under(root).items() if k is not None}
    for folder in [p for p in found if p.is_dir()]:
        _check_one_series(folder)
    if not root.is_file():
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
    kinds = set(found.values()) - {None}
    if kind == "auto" and len(kinds) > 1:
        counts = {k: sum(v == k for v in found.values()) for k in sorted(kinds)}
        raise ValueError(
            f"{root} mixes 2D images and volumes ({counts}), which run through different pipelines: "
            "set input_kind to 'image' or 'volume' to run one kind"
        )
    chosen = kinds.pop() if kind == "auto" and kinds else kind
    if chosen == "auto":  # a list of nothing but unknown files: the checks report each
        chosen = "image"
    paths = [str(p) for p, k in found.items() if k == chosen or (listed and k is None)]
    _check_unique_outputs(paths)
    if not paths:
        raise FileNotFoundError(
            f"no {'inputs' if kind == 'auto' else kind + 's'} in {root} (2D images: {', '.join(IMAGE_SUFFIXES)}; "
            f"volumes: {', '.join(NIFTI_SUFFIXES)}, DICOM files and DICOM series folders)"
        )
    return ClinicalInputs(chosen, paths)
