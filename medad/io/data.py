"""Data lists for the BMAD layout used by MVFA, and few-shot selection from seed files.

Layout (one folder per data set under ``dataset_dir``)::

    <Name>_AD/{valid,test}/{good,Ungood}/img/<file>
    <Name>_AD/{valid,test}/Ungood/anomaly_mask/<file>   (or label/<file>, as BMAD names it)

Each item is a dictionary: ``image`` (path), ``mask`` (path, only where a mask file exists),
``label`` (0 normal, 1 abnormal), ``dataset`` (name) and ``has_mask``: whether the item has a
pixel annotation, a mask of its own or, for a normal image of a data set with masks, the
all-normal one. Items without (abnormal images whose mask is missing, data sets without
masks) count for image-level metrics and train the detection adapters only.
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from medad.io.files import content_sha256

__all__ = [
    "BMAD",
    "BMAD_DATASETS",
    "BMADDataset",
    "IMAGE_SUFFIXES",
    "MASK_FOLDERS",
    "SPLITS",
    "SourceSet",
    "bmad_datalist",
    "calibration_items",
    "data_layout",
    "dataset_has_masks",
    "fewshot_selection",
    "fitted_records",
    "leave_out_fitted",
    "list_datasets",
    "read_fewshot_seed",
    "seed_file_indices",
    "seed_files",
    "shares_pool",
    "source_datalist",
    "source_sets",
    "target_datalist",
]

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class BMADDataset:
    """What medad knows of one of MVFA's six BMAD data sets.

    Attributes:
        name: the data set's name (its folder is ``<name>_AD``).
        prompt: the word MVFA's prompts use for it.
        has_masks: pixel annotations in MVFA's protocol (pixel-level metrics).
        paper_name: its column name in MVFA's tables.
        download_folders: folder names it may have in the BMAD download, tried in order by
            ``scripts/prepare_bmad.py`` (from BMAD's README and code, and third-party loaders of
            the release; ``<name>_AD`` also accepts MVFA's own re-packing).
    """

    name: str
    prompt: str
    has_masks: bool
    paper_name: str
    download_folders: tuple[str, ...]


#: The registry of the six BMAD data sets MVFA uses, in the paper's order.
BMAD: dict[str, BMADDataset] = {
    dataset.name: dataset
    for dataset in (
        BMADDataset("Brain", "Brain", True, "BrainMRI", ("BraTS2021_slice", "Brain_AD", "Brain")),
        BMADDataset("Liver", "Liver", True, "LiverCT", ("hist_DIY", "Liver_AD", "Liver")),
        BMADDataset("Retina_RESC", "retinal OCT", True, "RESC", ("RESC", "Retina_RESC_AD", "Retina_RESC")),
        BMADDataset("Retina_OCT2017", "retinal OCT", False, "OCT17", ("OCT2017", "Retina_OCT2017_AD", "Retina_OCT2017")),
        BMADDataset(
            "Chest", "Chest X-ray film", False, "ChestXray", ("Chest-RSNA", "chest_xray", "RSNA", "Chest_AD", "Chest-AD", "Chest")
        ),
        BMADDataset(
            "Histopathology", "histopathological image", False, "HIS",
            ("camelyon16_256", "camelyon16", "camelyon", "Histopathology_AD", "Histopathology"),
        ),
    )
}
#: The six names, in the paper's order.
BMAD_DATASETS = tuple(BMAD)
#: Mask folder names: MVFA's re-packing, then BMAD's own (the first present is used).
MASK_FOLDERS = ("anomaly_mask", "label")
#: 2D image files medad reads (through PIL).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_SUFFIX = "_AD"


def _dataset_root(dataset_dir: str | os.PathLike, name: str) -> Path:
    root = Path(dataset_dir) / f"{name}{_SUFFIX}"
    if not root.is_dir():
        known = list_datasets(dataset_dir) if Path(dataset_dir).is_dir() else []
        raise FileNotFoundError(f"data set {name!r} not found: no folder {root} (found: {known})")
    return root


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _mask_folder(ungood: Path) -> Path | None:
    return next((ungood / name for name in MASK_FOLDERS if (ungood / name).is_dir()), None)


def list_datasets(dataset_dir: str | os.PathLike) -> list[str]:
    """Names of the BMAD data sets (``<Name>_AD`` folders) under ``dataset_dir``, sorted (none
    for a datalist file or a folder of the ``normal``/``abnormal`` layout)."""
    if not Path(dataset_dir).is_dir():
        return []
    return sorted(p.name[: -len(_SUFFIX)] for p in Path(dataset_dir).iterdir() if p.is_dir() and p.name.endswith(_SUFFIX))


def dataset_has_masks(dataset_dir: str | os.PathLike, name: str) -> bool:
    """Whether a data set has pixel annotations: a mask folder beside its abnormal images (BMAD,
    ``masks/`` of the folder layout), or masks in a datalist file."""
    layout = data_layout(dataset_dir, name)
    if layout == "bmad":
        root = _dataset_root(dataset_dir, name)
        return any(_mask_folder(root / split / "Ungood") is not None for split in ("test", "valid"))
    if layout == "folders":
        return any((base / "masks").is_dir() for base in (Path(dataset_dir), *(Path(dataset_dir) / s for s in SPLITS)))
    return any("mask" in entry for key in _DATALIST_KEYS.values() for entry in _datalist_json(dataset_dir).get(key, []))


#: The splits: ``valid`` (the few-shot support pool) and ``test`` (evaluation).
SPLITS = ("valid", "test")
#: The keys of a datalist file for each split (MONAI's datalist convention).
_DATALIST_KEYS = {"valid": "training", "test": "test"}


def data_layout(dataset_dir: str | os.PathLike, name: str) -> str:
    """Which layout ``dataset_dir`` holds the data set ``name`` in (see "Your own data" in the
    README): ``"datalist"`` (a MONAI datalist ``.json`` file), ``"bmad"`` (a ``<name>_AD`` folder)
    or ``"folders"`` (``normal/``, ``abnormal/``, optional ``masks/``, at the top or per split)."""
    root = Path(dataset_dir)
    if root.suffix.lower() == ".json":
        if not root.is_file():
            raise FileNotFoundError(f"datalist file not found: {root}")
        return "datalist"
    if (root / f"{name}{_SUFFIX}").is_dir():
        return "bmad"
    for base in (root, *(root / split for split in SPLITS)):
        if (base / "normal").is_dir() or (base / "abnormal").is_dir():
            return "folders"
    if root.is_dir() and list_datasets(root):
        _dataset_root(root, name)  # raises: another BMAD data set was asked for
    raise FileNotFoundError(
        f"{root}: no data set {name!r} in any layout medad reads: a folder {name}{_SUFFIX} (BMAD), normal/ and "
        "abnormal/ folders (optionally masks/, at the top or under valid/ and test/), or a datalist .json file"
    )


def _datalist_json(path: str | os.PathLike) -> dict:
    import json

    try:
        content = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable JSON datalist ({error})") from error
    if not isinstance(content, dict):
        raise ValueError(f"{path}: a datalist is a JSON object with 'training' and 'test' lists")
    return content


def _datalist_items(path: str | os.PathLike, name: str, split: str) -> list[dict]:
    """Items of a MONAI datalist file (paths relative to the file, read with MONAI's loader)."""
    from monai.data import load_decathlon_datalist

    key = _DATALIST_KEYS[split]
    content = _datalist_json(path)
    if key not in content:
        raise ValueError(f"{path}: no {key!r} list (the {split} split); it has {sorted(content)}")
    problems = []
    for number, entry in enumerate(content[key]):
        where = f"{path}: {key}[{number}]"
        if not isinstance(entry, dict) or "image" not in entry:
            orphan = isinstance(entry, dict) and "mask" in entry
            problems.append(f"{where}: no 'image'{' (a mask without an image)' if orphan else ''}: {entry!r}")
        elif isinstance(entry.get("label"), str):  # MONAI's segmentation datalists (Decathlon): label is a mask path
            problems.append(f"{where}: 'label' is a mask path; medad's 'label' is the image's class: write "
                            f"\"mask\": \"{entry['label']}\", \"label\": 1 (0 for a normal image without a lesion)")
        elif entry.get("label") not in (0, 1) or isinstance(entry.get("label"), bool):
            problems.append(f"{where}: 'label' must be 0 (normal) or 1 (abnormal), got {entry.get('label')!r}")
    if problems:
        raise ValueError("\n".join(problems))
    entries = load_decathlon_datalist(str(path), is_segmentation=False, data_list_key=key, base_dir=str(Path(path).parent))
    masked = any("mask" in entry for entry in entries)
    items = []
    for entry in entries:
        label = int(entry["label"])
        item = {"image": str(entry["image"]), "label": label, "dataset": name, "has_mask": masked and label == 0}
        if entry.get("mask"):
            item.update(mask=str(Path(path).parent / entry["mask"]), has_mask=True)  # an absolute mask stays as it is
        items.append(item)
    return items


def _folder_items(root: Path, name: str, split: str) -> list[dict]:
    """Items of the ``normal/`` + ``abnormal/`` (+ ``masks/``) layout, per split or at the top."""
    base = root / split if (root / split).is_dir() else root
    masks = base / "masks"
    items = [{"image": str(path), "label": 0, "dataset": name, "has_mask": masks.is_dir()} for path in _images(base / "normal")]
    for path in _images(base / "abnormal"):
        item = {"image": str(path), "label": 1, "dataset": name, "has_mask": False}
        if (masks / path.name).is_file():
            item.update(mask=str(masks / path.name), has_mask=True)
        items.append(item)
    if masks.is_dir():
        orphans = sorted({p.name for p in _images(masks)} - {Path(item["image"]).name for item in items if item["label"] == 1})
        if orphans:
            raise ValueError(f"{masks}: masks without an abnormal image of the same name in {base / 'abnormal'}: {orphans}")
    return items


def target_datalist(dataset_dir: str | os.PathLike, name: str, split: str = "test") -> list[dict]:
    """All items of one split (``valid`` or ``test``) of a data set in any layout medad reads
    (:func:`data_layout`): normal images first, then abnormal, each sorted as listed.

    A ``test`` split without normal or without abnormal images is refused here, before any
    evaluation runs (``ValueError`` naming the folder or file): image AUROC needs both classes."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    layout = data_layout(dataset_dir, name)
    if layout == "bmad":
        items = bmad_datalist(dataset_dir, name, split)
        if split == "test":
            root = _dataset_root(dataset_dir, name) / split
            for label, kind, folder in ((0, "normal", root / "good" / "img"), (1, "abnormal", root / "Ungood" / "img")):
                if not any(item["label"] == label for item in items):
                    raise ValueError(
                        f"{folder}: no {kind} images in the test split of {name!r}: evaluation needs both classes "
                        f"(image AUROC compares normal with abnormal scores); add {kind} images ({', '.join(IMAGE_SUFFIXES)}) there"
                    )
        return items
    items = _datalist_items(dataset_dir, name, split) if layout == "datalist" else _folder_items(Path(dataset_dir), name, split)
    if not items:
        raise FileNotFoundError(f"{dataset_dir}: no images in the {split} split of data set {name!r} ({layout} layout)")
    empty = [kind for label, kind in ((0, "normal"), (1, "abnormal")) if not any(i["label"] == label for i in items)]
    if split == "test" and empty:
        raise ValueError(f"{dataset_dir}: the test split of {name!r} has no {empty[0]} images: evaluation needs both classes")
    return sorted(items, key=lambda item: item["label"])  # stable: normal first, each as listed


def bmad_datalist(dataset_dir: str | os.PathLike, name: str, split: str = "test") -> list[dict]:
    """All items of one split of one data set: normal images first, then abnormal, each sorted."""
    root = _dataset_root(dataset_dir, name)
    has_masks = dataset_has_masks(dataset_dir, name)
    items = [
        {"image": str(path), "label": 0, "dataset": name, "has_mask": has_masks}
        for path in _images(root / split / "good" / "img")
    ]
    ungood = root / split / "Ungood"
    mask_dir = _mask_folder(ungood)
    for path in _images(ungood / "img"):
        item = {"image": str(path), "label": 1, "dataset": name, "has_mask": False}
        if mask_dir is not None and (mask_dir / path.name).is_file():
            item.update(mask=str(mask_dir / path.name), has_mask=True)
        items.append(item)
    if not items:
        raise FileNotFoundError(f"data set {name!r} has no images in split {split!r} under {root / split}")
    return items


class SourceSet(NamedTuple):
    """One zero-shot source data set: where it is and its name (also its prompt word,
    :func:`medad.model.prompts.prompt_name`), read as :func:`target_datalist` reads a target."""

    dataset_dir: str
    name: str


def _is_path(entry: str) -> bool:
    """Whether a ``sources`` entry is a path (it has a folder separator or ends in ``.json``), not a name."""
    return "/" in entry or os.sep in entry or entry.lower().endswith(".json")


def _source_from_path(path: str) -> SourceSet:
    """The source data set at ``path``: a datalist file (named by its stem), a BMAD ``<Name>_AD``
    folder (``Name``, in the folder above) or a folder of the ``normal``/``abnormal`` layout (its name)."""
    where = Path(path)
    if not where.exists():
        raise FileNotFoundError(f"source data set {path}: no such file or folder")
    if where.is_dir() and where.name.endswith(_SUFFIX) and where.name != _SUFFIX:
        return SourceSet(str(where.parent), where.name[: -len(_SUFFIX)])
    return SourceSet(path, where.stem if where.suffix.lower() == ".json" else where.name)


def _same_data(first: SourceSet, second: SourceSet) -> bool:
    """Whether two (dataset_dir, name) pairs are the same data (a BMAD folder holds several data
    sets, by name; a folder or datalist file of the other layouts holds one)."""
    if Path(first.dataset_dir).resolve() != Path(second.dataset_dir).resolve():
        return False
    return first.name == second.name or data_layout(first.dataset_dir, first.name) != "bmad"


def source_sets(
    dataset_dir: str | os.PathLike, target: str, sources: Sequence[str] | Mapping[str, str | os.PathLike] | None = None
) -> list[SourceSet]:
    """The zero-shot source data sets of ``target``, each checked to be readable in some layout
    (:func:`data_layout`), none of them the target's own data.

    Args:
        dataset_dir: where the target is (and data sets named without a path).
        target: the data set left out (zero-shot).
        sources: ``None`` or empty: every BMAD data set under ``dataset_dir`` but the target.
            A list: names of data sets under ``dataset_dir`` (the target's name is skipped) or
            paths (with a ``/``, or ending in ``.json``) of own data sets in any layout: a
            ``normal``/``abnormal`` folder or a datalist file, named by its folder or file name,
            or a BMAD ``<Name>_AD`` folder (``Name``). A mapping ``{name: path}`` names each
            data set (its prompt word) itself; the path is a folder or datalist file of any layout.

    Raises:
        FileNotFoundError: a source that is not there, or in no layout medad reads.
        ValueError: a source that is the target's own data, or no source at all.
    """
    if isinstance(sources, Mapping):
        candidates = [SourceSet(str(path), str(name)) for name, path in sources.items()]
    else:
        entries = [str(entry) for entry in (sources or list_datasets(dataset_dir))]
        candidates = [_source_from_path(e) if _is_path(e) else SourceSet(str(dataset_dir), e) for e in entries]
        candidates = [c for c, e in zip(candidates, entries) if _is_path(e) or e != target]
    own = SourceSet(str(dataset_dir), target)
    for source in candidates:
        data_layout(source.dataset_dir, source.name)  # raises naming the place and the layouts read
        if _same_data(source, own):
            raise ValueError(
                f"source data set {source.name!r} ({source.dataset_dir}) is the target's own data: zero-shot training "
                "leaves the target out; give other data sets as sources"
            )
    if not candidates:
        raise ValueError(
            f"no source data sets besides the target {target!r} under {dataset_dir}: give sources, names of BMAD data "
            "sets there or paths of own data sets (normal/abnormal folders, datalist .json files)"
        )
    return candidates


def source_datalist(
    dataset_dir: str | os.PathLike,
    target: str,
    sources: Sequence[str] | Mapping[str, str | os.PathLike] | None = None,
    split: str = "test",
) -> list[dict]:
    """Zero-shot training data: the ``split`` items (MVFA trains on the test splits; a folder
    without ``valid/`` and ``test/`` serves both) of every source data set of ``target``
    (:func:`source_sets`), in any layout; each item's ``dataset`` is its source's name."""
    return [item for source in source_sets(dataset_dir, target, sources) for item in target_datalist(*source, split)]


def _seed_file(path: str | os.PathLike) -> dict[int, dict[str, list[str]]]:
    """Every seed of an MVFA seed file: ``{index: {"a": abnormal files, "n": normal files}}``.

    Lines read ``a-<index>: f1 f2 ...`` (abnormal) and ``n-<index>: ...`` (normal)."""
    seeds: dict[int, dict[str, list[str]]] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        match = re.fullmatch(r"\s*([an])-(\d+):\s*(.*)", line)
        if match is None:
            raise ValueError(f"{path}:{number}: expected 'a-<i>: files' or 'n-<i>: files', got {line!r}")
        seeds.setdefault(int(match.group(2)), {})[match.group(1)] = match.group(3).split()
    return seeds


def seed_file_indices(path: str | os.PathLike) -> list[int]:
    """The seed indices an MVFA seed file defines with both an ``a-<i>:`` and an ``n-<i>:`` line, sorted.

    Raises:
        ValueError: a line is neither (naming the file and the line), or no index has both lines.
    """
    indices = sorted(index for index, picks in _seed_file(path).items() if set(picks) == {"a", "n"})
    if not indices:
        raise ValueError(f"{path}: no seed in the file: a seed needs both an 'a-<i>:' and an 'n-<i>:' line")
    return indices


#: SGGP's further support draws of one data set at k shots, beside MVFA's ``<k>-shot.txt``.
_SAMPLE_FILE = re.compile(r"shot\d+_sample(\d+)\.txt")


def seed_files(folder: str | os.PathLike, shot: int) -> list[Path]:
    """The seed files of one data set at ``shot`` shots in ``folder``, one support draw per seed
    they hold: MVFA's ``<shot>-shot.txt`` first, then SGGP's ``shot<shot>_sample<i>.txt`` by
    ``i`` (SGGP publishes ten draws per data set as ``4-shot.txt`` and ``shot4_sample1..9.txt``).
    Empty where the folder holds none.
    """
    folder = Path(folder)
    mvfa = [folder / f"{shot}-shot.txt"] if (folder / f"{shot}-shot.txt").is_file() else []
    samples = {int(match.group(1)): path for path in folder.glob(f"shot{shot}_sample*.txt") if (match := _SAMPLE_FILE.fullmatch(path.name))}
    return mvfa + [samples[i] for i in sorted(samples)]


def read_fewshot_seed(path: str | os.PathLike, index: int) -> tuple[list[str], list[str]]:
    """Abnormal and normal file names of seed ``index`` in an MVFA seed file (lines
    ``a-<index>: f1 f2 ...`` and ``n-<index>: ...``)."""
    picks = _seed_file(path).get(index, {})
    if set(picks) != {"a", "n"}:
        raise ValueError(f"{path}: seed index {index} needs both an 'a-{index}:' and an 'n-{index}:' line")
    return picks["a"], picks["n"]


def fewshot_selection(
    dataset_dir: str | os.PathLike,
    name: str,
    shot: int,
    seed_file: str | os.PathLike | None = None,
    seed_index: int = 0,
    seed: int = 0,
    abnormal_shots: int | None = None,
) -> list[dict]:
    """The support items of a data set, picked from its ``valid`` split: ``abnormal_shots``
    abnormal images (default ``shot``, MVFA's k + k; with or without masks) and ``shot`` normal ones.

    With ``seed_file`` (MVFA's ``<k>-shot.txt``) the listed files are used (its abnormal line is
    ignored with ``abnormal_shots=0``); otherwise they are drawn at random with ``seed``.
    Abnormal items come first. Every refusal names the mode that would fit.
    """
    abnormal_shots = shot if abnormal_shots is None else abnormal_shots
    if shot < 1 or abnormal_shots < 0:
        raise ValueError(f"shot must be positive and abnormal_shots at least 0, got shot={shot}, abnormal_shots={abnormal_shots}")
    valid = target_datalist(dataset_dir, name, "valid")
    by_class = {label: {Path(item["image"]).name: item for item in valid if item["label"] == label} for label in (0, 1)}
    wanted = {1: abnormal_shots, 0: shot}
    if seed_file is not None:
        abnormal, normal = read_fewshot_seed(seed_file, seed_index)
        chosen = []
        for label, names in ((1, abnormal if abnormal_shots else []), (0, normal)):
            missing = [n for n in names if n not in by_class[label]]
            if missing:
                raise FileNotFoundError(f"{seed_file}: files of seed {seed_index} not in {name}/valid: {missing}")
            if len(names) != wanted[label]:
                kind = "abnormal" if label else "normal"
                raise ValueError(
                    f"{seed_file}: seed {seed_index} lists {len(names)} {kind} files, expected {wanted[label]}: seed files "
                    "pick k of each class (abnormal_shots equal to shot, or 0 for normal-only adaptation); for other "
                    "numbers leave seed_dir unset to pick at random"
                )
            chosen += [by_class[label][n] for n in names]
        return chosen
    rng = random.Random(seed)
    chosen = []
    for label in (1, 0):
        pool = sorted(by_class[label])
        if len(pool) < wanted[label]:
            hint = (
                "set abnormal_shots to at most that, or to 0 for normal-only adaptation (with init_checkpoint a zero-shot model)"
                if label
                else "lower shot"
            )
            kind = "abnormal" if label else "normal"
            raise ValueError(
                f"{name}/valid has {len(pool)} {kind} images, fewer than {'abnormal_shots' if label else 'shot'}="
                f"{wanted[label]}: {hint}"
            )
        chosen += [by_class[label][n] for n in rng.sample(pool, wanted[label])]
    return chosen


def fitted_records(items: Sequence[dict], role: str, root: str | os.PathLike | None = None) -> list[dict]:
    """What a model stores of the images it is fitted on (:attr:`medad.model.checkpoint.ModelDescription.fitted`):
    per item its ``name`` (the path relative to ``root`` where it lies under it, else the file
    name: no folder of this machine is written into the model), the ``sha256`` of its bytes,
    its ``label`` and ``role`` (``"support"``, ``"calibration"``)."""
    records = []
    for item in items:
        path = Path(item["image"])
        try:
            name = str(path.resolve().relative_to(Path(root).resolve())) if root is not None else path.name
        except ValueError:
            name = path.name
        records.append({"name": name, "sha256": content_sha256(path), "label": int(item.get("label", -1)), "role": role})
    return records


def leave_out_fitted(items: Sequence[dict], fitted: Sequence[dict], what: str = "evaluation") -> tuple[list[dict], list[dict]]:
    """``items`` without those whose image the model was fitted on (same bytes as a record of
    ``fitted``), and the items left out; their number and roles are logged.

    This is what keeps every evaluation leak-free in every layout: the folder layout without
    ``valid/``/``test/`` folders draws support and calibration images from the very pool it
    evaluates."""
    roles = {record["sha256"]: record.get("role", "fitted") for record in fitted}
    if not roles:
        return list(items), []
    kept, left = [], []
    for item in items:
        role = roles.get(content_sha256(item["image"]))
        (kept if role is None else left).append(item if role is None else {**item, "role": role})
    if left:
        counts = {role: sum(item["role"] == role for item in left) for role in dict.fromkeys(item["role"] for item in left)}
        logger.warning(
            "%s leaves out %d of %d images the model was fitted on (%s)", what, len(left), len(items),
            ", ".join(f"{role}: {count}" for role, count in counts.items()),
        )
    return kept, left


def shares_pool(dataset_dir: str | os.PathLike, name: str) -> bool:
    """Whether the support pool (``valid``) and the evaluated images (``test``) are one pool: the
    folder layout without ``valid/`` and ``test/`` folders."""
    root = Path(dataset_dir)
    return data_layout(root, name) == "folders" and not any((root / split).is_dir() for split in SPLITS)


def calibration_items(
    dataset_dir: str | os.PathLike,
    name: str,
    fitted: Sequence[dict] = (),
    fraction: float = 0.5,
    seed: int = 0,
) -> list[dict]:
    """The images a site threshold is chosen on (:mod:`medad.engine.site`): the ``valid`` split of
    ``name`` without the images the model was fitted on. Where that pool is also the evaluated
    one (:func:`shares_pool`), a seeded draw of ``fraction`` of each class, so that the rest
    stays for evaluation (support, calibration and test then split the pool deterministically,
    and the model records which image went where)."""
    pool, _ = leave_out_fitted(target_datalist(dataset_dir, name, "valid"), fitted, "calibration")
    if not shares_pool(dataset_dir, name):
        return pool
    if not 0 < fraction < 1:
        raise ValueError(f"calibration_fraction must be between 0 and 1 when calibration and evaluation share {dataset_dir}, got {fraction}")
    rng = random.Random(seed)
    chosen = []
    for label in (0, 1):
        group = [item for item in pool if item["label"] == label]
        chosen += sorted(rng.sample(group, round(fraction * len(group))), key=lambda item: item["image"])
    return chosen
